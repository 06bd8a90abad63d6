"""Durability soak: SIGKILL every index-writing `cocatk` command at seeded moments, rerun it, then `cocatk check`.

    python benchmarks/soak_durability.py                              # every command, 10 kills each, seed 29
    python benchmarks/soak_durability.py --commands index,forget --kills 4 --json /tmp/dur/out.json

Commands (the demo model on the CPU, so it runs offline): `index` (tokens cached, the default), `tokens` (an index
built with --no-cache-tokens, then `index --cache-tokens` fills the tokens in), `caption`, `forget` (one of two
roots), `compact` (after a forget, so VACUUM has work), `watch` (`index --watch`, killed while it picks up files
being added to a root; the rerun is a plain `cocatk index`) and `ray` (`index --ray local`; only when `import ray`
works). For each command an unkilled run is timed first, and a thread polls the index's SQLite write-ahead log
(every 2 ms) to find the write window: from the first change of the log to the last, plus 30 ms each side. The kill
moments are drawn with random.Random(seed): half over 5%-95% of the run (for `watch`, of the time from the first
added file until the watch has indexed them all), half over the write window, so that kills land while the command
commits and not only while it starts up.
The whole process group gets SIGKILL (Ray's workers with it). After each kill the same command is rerun to
completion, then `cocatk check --index IDX --json`, and the SQLite file is read (read-only) for extra invariants:
rows == vectors == image files expected, no duplicate paths, tokens and captions only for existing ids, nothing left
under a forgotten root, tokens (captions) for every row where the command makes them. A cell is `consistent`,
`inconsistent` (with the problems) or `rerun failed` (with the output's tail). Exit status 1 if any cell is not
consistent. Scratch data lives under --work (default /tmp/dur); COCATK_HOME and COCATK_CACHE point inside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import machine_info, print_table

ROOT = Path(__file__).resolve().parents[1]
COCATK = str(Path(sys.executable).with_name("cocatk"))
ALL = ["index", "tokens", "caption", "forget", "compact", "watch", "ray"]
MODEL = ["--model", "demo", "--device", "cpu"]


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([COCATK, *args], env=env, capture_output=True, text=True, timeout=timeout)


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [COCATK, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def gen(folder: Path, n: int, seed: int) -> None:
    from cocatk.demo.scenes import generate_folder

    if not folder.is_dir() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        generate_folder(folder, n=n, seed=seed, manifest=False)


def sqlite_facts(idx: Path) -> dict[str, Any]:
    """Counts read from the index's SQLite file, read-only."""
    db = sqlite3.connect(f"file:{idx / 'index.sqlite'}?mode=ro", uri=True)
    try:
        q = lambda s: db.execute(s).fetchone()[0]  # noqa: E731
        return {
            "rows": q("SELECT COUNT(*) FROM files"),
            "distinct_paths": q("SELECT COUNT(DISTINCT path) FROM files"),
            "tokens": q("SELECT COUNT(*) FROM tokens"),
            "orphan_tokens": q("SELECT COUNT(*) FROM tokens WHERE id NOT IN (SELECT id FROM files)"),
            "captions": q("SELECT COUNT(*) FROM captions"),
            "captioned_ids": q("SELECT COUNT(DISTINCT id) FROM captions"),
            "orphan_captions": q("SELECT COUNT(*) FROM captions WHERE id NOT IN (SELECT id FROM files)"),
            "generation": int(q("SELECT value FROM meta WHERE key = 'generation'")),
            "pages": q("PRAGMA page_count"),
            "free_pages": q("PRAGMA freelist_count"),
            "roots": sorted(bytes(r[0]).decode() for r in db.execute("SELECT path FROM roots")),
            "paths": [bytes(r[0]).decode() for r in db.execute("SELECT path FROM files")],
        }
    finally:
        db.close()


def verify(idx: Path, env: dict[str, str], spec: dict[str, Any]) -> tuple[bool, list[str], dict[str, Any]]:
    """`cocatk check --json` plus the invariants of ``spec`` (expected rows, roots, tokens, captions)."""
    problems: list[str] = []
    c = run(["check", "--index", str(idx), "--json"], env)
    try:
        rep = json.loads(c.stdout)
    except ValueError:
        return False, [f"check rc={c.returncode}, no JSON: {(c.stdout + c.stderr)[-400:]}"], {}
    problems += [f"check: {p}" for p in rep.get("problems", [])]
    if c.returncode != (0 if rep.get("ok") else 1):
        problems.append(f"check exit {c.returncode} with ok={rep.get('ok')}")
    f = sqlite_facts(idx)
    exp = spec["rows"]
    if not (f["rows"] == rep.get("files") == rep.get("vectors") == exp):
        problems.append(f"rows {f['rows']} / check files {rep.get('files')} / vectors {rep.get('vectors')} != {exp}")
    if f["distinct_paths"] != f["rows"]:
        problems.append(f"duplicate paths: {f['rows'] - f['distinct_paths']}")
    if f["orphan_tokens"]:
        problems.append(f"{f['orphan_tokens']} token rows without a file")
    if f["orphan_captions"]:
        problems.append(f"{f['orphan_captions']} captions without a file")
    if spec.get("tokens") is not None and f["tokens"] != spec["tokens"]:
        problems.append(f"tokens {f['tokens']} != {spec['tokens']}")
    if spec.get("captions") is not None and (f["captions"], f["captioned_ids"]) != (spec["captions"],) * 2:
        problems.append(f"captions {f['captions']} (ids {f['captioned_ids']}) != {spec['captions']}")
    for gone in spec.get("forgotten", []):
        n = sum(p.startswith(gone + "/") for p in f["paths"])
        if n or gone in f["roots"]:
            problems.append(f"{n} rows (root listed: {gone in f['roots']}) under forgotten {gone}")
    if spec.get("roots") is not None and f["roots"] != sorted(spec["roots"]):
        problems.append(f"roots {f['roots']} != {sorted(spec['roots'])}")
    facts = {k: v for k, v in f.items() if k != "paths"}
    facts["check"] = {k: rep.get(k) for k in ("ok", "files", "vectors", "tokens")}
    return not problems, problems, facts


class LogWatcher:
    """Record when ``idx/index.sqlite-wal`` changes (size or mtime), in seconds since :meth:`start`."""

    def __init__(self, idx: Path, every: float = 0.002) -> None:
        self.wal, self.every = idx / "index.sqlite-wal", every
        self.changes: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> LogWatcher:
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.changes

    def _poll(self) -> None:
        last = None
        while not self._stop.is_set():
            try:
                st = os.stat(self.wal)
                now = (st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                now = None
            if now != last and now is not None and now[0] > 0:  # an open creates an empty log: not a write
                self.changes.append(time.monotonic() - self.t0)
            last = now
            time.sleep(self.every)


def _window(changes: list[float], duration: float, pad: float = 0.03) -> tuple[float, float] | None:
    if not changes:
        return None
    return max(0.0, changes[0] - pad), min(duration, changes[-1] + pad)


class Cell:
    """One command of the matrix: how to prepare a fresh index, the command, its rerun, and what must hold after."""

    def __init__(self, name: str, work: Path, env: dict[str, str], data: dict[str, Any]):
        self.name, self.work, self.env, self.d = name, work / "cells" / name, env, data
        self.idx = self.work / "idx"

    # a base index, built once per command and copied before each try
    def base(self) -> Path | None:
        d, b = self.d, self.work / "base"
        if self.name in ("index", "ray", "watch"):
            pass
        if self.name == "tokens":
            self._build(b, [str(d["big"])], ["--no-cache-tokens"])
        elif self.name == "caption":
            self._build(b, [str(d["small"])], [])
        elif self.name == "forget":
            self._build(b, [str(d["big"] / "a"), str(d["big"] / "b")], [])
        elif self.name == "compact":
            self._build(b, [str(d["big"] / "a"), str(d["big"] / "b")], [])
            r = run(["forget", str(d["big"] / "b"), "--index", str(b)], self.env)
            assert r.returncode == 0, r.stdout + r.stderr
        elif self.name == "watch":
            self._build(b, [str(d["watch"])], [])
        else:
            return None
        return b

    def _build(self, b: Path, paths: list[str], extra: list[str]) -> None:
        if (b / "index.sqlite").exists():
            return
        r = run(["index", *paths, "--index", str(b), *MODEL, *extra], self.env)
        assert r.returncode == 0, r.stdout + r.stderr

    def fresh(self, base: Path | None) -> None:
        shutil.rmtree(self.idx, ignore_errors=True)
        if base is not None:
            shutil.copytree(base, self.idx)
        if self.name == "watch":
            shutil.rmtree(self.d["watch"] / "new", ignore_errors=True)

    def args(self) -> list[str]:
        d, i = self.d, ["--index", str(self.idx)]
        return {
            "index": ["index", str(d["big"]), *i, *MODEL],
            "tokens": ["index", str(d["big"]), *i, *MODEL, "--cache-tokens"],
            "caption": ["caption", *i, "--device", "cpu"],
            "forget": ["forget", str(d["big"] / "b"), *i],
            "compact": ["compact", *i],
            "watch": ["index", str(d["watch"]), *i, *MODEL, "--watch"],
            "ray": ["index", str(d["ray"]), *i, *MODEL, "--ray", "local"],
        }[self.name]

    def rerun_args(self) -> list[str]:
        return [a for a in self.args() if a != "--watch"]

    def spec(self) -> dict[str, Any]:
        d = self.d
        big, small, nw = d["n_big"], d["n_small"], d["n_watch"] + d["n_new"]
        return {
            "index": {"rows": big, "tokens": big, "roots": [str(d["big"])]},
            "tokens": {"rows": big, "tokens": big},
            "caption": {"rows": small, "tokens": small, "captions": small},
            "forget": {"rows": big // 2, "tokens": big // 2, "forgotten": [str(d["big"] / "b")]},
            "compact": {"rows": big // 2, "tokens": big // 2, "forgotten": [str(d["big"] / "b")]},
            "watch": {"rows": nw, "tokens": nw},
            "ray": {"rows": d["n_ray"], "roots": [str(d["ray"])]},
        }[self.name]

    # watch: start it, wait for "watching", then add files; the clock starts at the first added file
    def _watch_start(self) -> tuple[subprocess.Popen, list[str], threading.Event]:
        p = spawn(self.args(), self.env)
        lines: list[str] = []
        ready = threading.Event()

        def reader() -> None:
            for line in p.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if line.startswith("watching") or " watching " in line:
                    ready.set()
            ready.set()

        threading.Thread(target=reader, daemon=True).start()
        ready.wait(120)
        return p, lines, ready

    def _add_files(self) -> threading.Thread:
        src, dst = self.d["new_src"], self.d["watch"] / "new"

        def copier() -> None:
            dst.mkdir(parents=True, exist_ok=True)
            for f in sorted(src.iterdir()):
                shutil.copy2(f, dst / f.name)
                time.sleep(0.005)

        t = threading.Thread(target=copier)
        t.start()
        return t

    def _generation(self) -> int:
        try:
            return sqlite_facts(self.idx)["generation"]
        except sqlite3.Error:
            return -1

    def progress(self) -> tuple[int, ...] | None:
        """What a committed write changes: generation, rows, tokens, captions, and the database's page and free-page
        counts (a VACUUM changes only those); None before the SQLite file exists."""
        try:
            f = sqlite_facts(self.idx)
        except sqlite3.Error:
            return None
        return f["generation"], f["rows"], f["tokens"], f["captions"], f["pages"], f["free_pages"]

    def _rows(self) -> int:
        try:
            return sqlite_facts(self.idx)["rows"]
        except sqlite3.Error:
            return -1

    def baseline(self, base: Path | None) -> tuple[float, tuple[float, float] | None]:
        """The unkilled run: its duration and its write window (None when the log never changed)."""
        self.fresh(base)
        if self.name == "watch":
            p, lines, _ = self._watch_start()
            watcher = LogWatcher(self.idx).start()
            t0 = time.monotonic()
            cp = self._add_files()
            want = self.spec()["rows"]
            while self._rows() < want and time.monotonic() - t0 < 300:
                time.sleep(0.05)
            dt = time.monotonic() - t0
            kill_group(p)
            cp.join()
            return dt, _window(watcher.stop(), dt)
        watcher = LogWatcher(self.idx).start()
        t0 = time.monotonic()
        r = run(self.args(), self.env)
        dt = time.monotonic() - t0
        changes = watcher.stop()
        assert r.returncode == 0, f"unkilled {self.name} failed: {(r.stdout + r.stderr)[-2000:]}"
        ok, probs, _ = verify(self.idx, self.env, self.spec())
        assert ok, f"unkilled {self.name} is not consistent: {probs}"
        return dt, _window(changes, dt)

    def trial(self, base: Path | None, at: float) -> dict[str, Any]:
        self.fresh(base)
        cp = None
        if self.name == "watch":
            p, lines, _ = self._watch_start()
            cp = self._add_files()
        else:
            p, _lines = spawn(self.args(), self.env), []
        time.sleep(at)
        exited = p.poll() is not None
        kill_group(p)
        if cp is not None:
            cp.join()  # the files all land before the rerun
        rows_before = self._rows()
        gen_before = self._generation()
        progress_before = self.progress()
        r = run(self.rerun_args(), self.env)
        out = (r.stdout + r.stderr).strip()
        res: dict[str, Any] = {
            "kill_at_s": round(at, 3),
            "exited_before_kill": exited,
            "rows_before_rerun": rows_before,
            "generation_before_rerun": gen_before,
            "progress_before_rerun": progress_before,
            "rerun_rc": r.returncode,
            "rerun_tail": out[-600:],
        }
        # A forget killed after its commit is done: the rerun is refused (exit 2, "is not a root"), as it should be.
        done_already = self.name == "forget" and r.returncode == 2 and "is not a root" in out
        res["rerun_refused_as_done"] = done_already
        if r.returncode != 0 and not done_already:
            res["outcome"], res["problems"] = "rerun failed", [out[-600:]]
            return res
        ok, probs, facts = verify(self.idx, self.env, self.spec())
        res.update(outcome="consistent" if ok else "inconsistent", problems=probs, facts=facts)
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="kills per command")
    ap.add_argument("--seed", type=int, default=29, help="seed of the kill moments")
    ap.add_argument("--commands", default="all", help=f"all, or a comma list of {','.join(ALL)}")
    ap.add_argument("--json", type=Path, default=None, help="write every cell's record here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dur"), help="scratch folder (photos, indexes, home)")
    ap.add_argument("--photos", type=int, default=1200, help="photos of index/tokens/forget/compact (two folders)")
    ap.add_argument("--caption-photos", type=int, default=120, help="photos of the caption command")
    ap.add_argument("--watch-new", type=int, default=300, help="files added while `index --watch` runs")
    ap.add_argument("--ray-photos", type=int, default=300, help="photos of `index --ray local`")
    args = ap.parse_args()
    cmds = ALL if args.commands == "all" else [c.strip() for c in args.commands.split(",") if c.strip()]
    bad = set(cmds) - set(ALL)
    if bad:
        ap.error(f"unknown commands {sorted(bad)}")

    info = machine_info()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["lscpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "")
    except OSError:
        pass
    print(f"CPU: {info.get('lscpu_model') or info['cpu']}, {info['cores']} cores; seed {args.seed}, {args.kills} kills")

    work = args.work
    env = dict(
        os.environ,
        COCATK_HOME=str(work / "home"),
        COCATK_CACHE=str(work / "cache"),
        RAY_TMPDIR=str(work / "ray"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("COCATK_INDEX", None)
    half = args.photos // 2
    data: dict[str, Any] = {
        "big": work / "data" / "big",
        "small": work / "data" / "small",
        "watch": work / "data" / "watch",
        "new_src": work / "data" / "new_src",
        "ray": work / "data" / "ray",
        "n_big": 2 * half,
        "n_small": args.caption_photos,
        "n_watch": half,
        "n_new": args.watch_new,
        "n_ray": args.ray_photos,
    }
    gen(data["big"] / "a", half, 1)
    gen(data["big"] / "b", half, 2)
    gen(data["small"], args.caption_photos, 3)
    gen(data["watch"] / "a", half, 4)
    gen(data["new_src"], args.watch_new, 5)
    gen(data["ray"], args.ray_photos, 6)

    # warm-up: the first index under a fresh COCATK_CACHE exports the text tower to ONNX (once per model, ~10 s);
    # done here so that no unkilled timing includes it
    r = run(["index", str(data["small"]), "--index", str(work / "warm"), *MODEL], env)
    assert r.returncode == 0, r.stdout + r.stderr
    ray_ok = subprocess.run([sys.executable, "-c", "import ray"], capture_output=True).returncode == 0
    record: dict[str, Any] = {"seed": args.seed, "kills": args.kills, "machine": info, "cells": {}}
    rows = []
    failed = False
    for name in cmds:
        if name == "ray" and not ray_ok:
            record["cells"][name] = {"outcome": "not run (import ray fails)"}
            rows.append([name, "-", "-", "-", "-", "-", "-", "not run (import ray fails)"])
            continue
        cell = Cell(name, work, env, data)
        base = cell.base()
        base_progress = None
        if base is not None:
            cell.fresh(base)
            base_progress = cell.progress()
        dur, window = cell.baseline(base)
        rng = random.Random(f"{args.seed}:{name}")
        in_window = args.kills // 2 if window is not None else 0
        moments = sorted(
            [rng.uniform(0.05, 0.95) * dur for _ in range(args.kills - in_window)]
            + [rng.uniform(*window) for _ in range(in_window)]  # type: ignore[misc]
        )
        wtext = "none" if window is None else f"{window[0]:.3f}-{window[1]:.3f} s"
        print(f"{name}: unkilled run {dur:.2f} s, write window {wtext}; kills at {[round(m, 3) for m in moments]}",
              flush=True)  # fmt: skip
        trials = []
        for k, at in enumerate(moments):
            t = cell.trial(base, at)
            p = t["progress_before_rerun"]  # an empty new index (generation 0, no rows) is not progress yet
            t["committed_before_kill"] = p is not None and p != base_progress and (base is not None or p[0] > 0)
            trials.append(t)
            print(
                f"  kill {k + 1}/{len(moments)} at {at:.2f} s: {t['outcome']}"
                f" (rows before rerun {t['rows_before_rerun']}, generation {t['generation_before_rerun']}"
                f"{', after a commit' if t['committed_before_kill'] else ''})"
                f" {'; '.join(t['problems'])[:300]}",
                flush=True,
            )
        counts: dict[str, int] = {}
        for t in trials:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        failed |= any(t["outcome"] != "consistent" for t in trials)
        mid = sum(t["committed_before_kill"] and not t["exited_before_kill"] for t in trials)
        record["cells"][name] = {"unkilled_s": round(dur, 3), "write_window_s": window, "trials": trials,
                                 "counts": counts, "killed_after_a_commit": mid}  # fmt: skip
        rows.append(
            [
                name,
                f"{dur:.2f}",
                wtext,
                len(trials),
                mid,
                counts.get("consistent", 0),
                counts.get("inconsistent", 0),
                counts.get("rerun failed", 0),
            ]
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print_table(
        "durability: command x kills x outcome",
        [
            "command",
            "unkilled s",
            "write window",
            "kills",
            "after a commit",
            "consistent",
            "inconsistent",
            "rerun failed",
        ],
        rows,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
