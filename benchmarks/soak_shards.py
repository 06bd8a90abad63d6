"""Durability soak over WebDataset shards: SIGKILL `cocatk index SHARDS` at 5 moments of its run, rerun, check.

    python benchmarks/soak_shards.py                                  # 20 shards x 30 items, each moment twice
    python benchmarks/soak_shards.py --shards 20 --per-shard 30 --repeats 3 --random 0 --tag r3

The shards are written by webdataset's own TarWriter (img2dataset's layout: key.jpg photo-like JPEGs from
``_photos.py``, key.txt a caption, key.json url/width/height), indexed with the demo model on the CPU
(`--model demo --device cpu`, offline) and `--checkpoint-every 128`. An unkilled run into a reference index comes
first; a thread samples its committed row count (read-only SQLite, every 2 ms) to give the run's timeline. Then each
moment is a fresh index, one `cocatk index` killed (SIGKILL to its process group) when the moment comes:

- ``scan``: the first time the process holds a shard open (/proc/PID/fd, polled every 0.5 ms): the shard scan comes
  before anything is encoded, so nothing but the manifest is committed;
- ``first-checkpoint``: as soon as the first checkpoint's rows are committed;
- ``mid-run``: once half the items are committed;
- ``final-window``: once the last checkpoint before the final one is committed (rows >= total - 128, < total): the
  kill lands while the last items are encoded, before the final commit that also records the shards done;
- ``end``: once every row is committed (the final checkpoint), while the process still runs (FAISS file, manifest,
  exit).

``--random K`` adds K kills at seeded moments over 5-95% of the unkilled run. After each kill the same command runs
again to the end, then once more (which must encode nothing), then `cocatk check --json`. The
index's SQLite file is read, read-only, and compared with the reference by identity (``/abs/shard.tar#key``): every
item present exactly once, no other row, its vector equal to the reference's (max |d| over all items, float32, and
the FAISS file's vector equal to SQLite's), one member row and one dataset caption (the sample's txt) per item, every
shard recorded done; the first rerun encoded exactly the items the killed run had not committed. Exit status 1 if
any trial fails a check; the record is benchmarks/results/soak-shards-<machine>.json. Scratch data lives under
--work (default /tmp/soak-shards); COCATK_HOME and COCATK_CACHE point inside it. `cocatk` runs as
``python -m cocatk`` with this checkout first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, lscpu_model, machine_info, print_table, write_record
from _photos import make_photo

MODEL = ["--model", "demo", "--device", "cpu"]
MOMENTS = ["scan", "first-checkpoint", "mid-run", "final-window", "end"]


def cocatk(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cocatk", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cocatk", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def write_shards(folder: Path, shards: int, per_shard: int, size: tuple[int, int]) -> dict[str, str]:
    """img2dataset's layout through webdataset's TarWriter; returns identity -> caption (the txt field)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for s in range(shards):
        path = (folder / f"{s:05d}.tar").resolve()
        tmp = path.with_suffix(".tmp")
        with wds.TarWriter(str(tmp)) as w:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{n:09d}"
                buf = io.BytesIO()
                make_photo(n, *size).save(buf, "JPEG", quality=90)
                caption = f"a photo number {n} of shard {s}"
                meta = {"url": f"https://example.org/{key}.jpg", "width": size[0], "height": size[1], "key": key}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": caption, "json": json.dumps(meta).encode()})
                out[f"{path}#{key}"] = caption
        tmp.rename(path)
    return out


def ensure_shards(folder: Path, shards: int, per_shard: int, size: tuple[int, int]) -> dict[str, str]:
    stamp = folder / "written.json"
    want = {"shards": shards, "per_shard": per_shard, "size": list(size)}
    if stamp.is_file() and json.loads(stamp.read_text()).get("want") == want:
        return json.loads(stamp.read_text())["items"]
    shutil.rmtree(folder, ignore_errors=True)
    items = write_shards(folder, shards, per_shard, size)
    stamp.write_text(json.dumps({"want": want, "items": items}))
    return items


def rows(idx: Path) -> int | None:
    """Rows committed in the index, read-only; None before its SQLite file can be read."""
    db = idx / "index.sqlite"
    if not db.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    except sqlite3.Error:
        return None


def sources_done(idx: Path) -> int | None:
    """Shards recorded done in the index (the final checkpoint records them), read-only."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{idx / 'index.sqlite'}?mode=ro", uri=True, timeout=1)) as c:
            return int(c.execute("SELECT COUNT(*) FROM sources").fetchone()[0])
    except sqlite3.Error:
        return None


def read_index(idx: Path) -> dict[str, Any]:
    """Everything the checks need from an index's SQLite file and FAISS file, read-only."""
    import faiss

    db = sqlite3.connect(f"file:{idx / 'index.sqlite'}?mode=ro", uri=True)
    try:
        files = [
            (int(i), bytes(p).decode(), bytes(e)) for i, p, e in db.execute("SELECT id, path, embedding FROM files")
        ]
        members = db.execute("SELECT id, COUNT(*) FROM members GROUP BY id").fetchall()
        captions = db.execute("SELECT id, text FROM captions WHERE config = 'dataset'").fetchall()
        q = lambda sql: db.execute(sql).fetchone()[0]  # noqa: E731
        facts = {
            "orphan_members": q("SELECT COUNT(*) FROM members WHERE id NOT IN (SELECT id FROM files)"),
            "orphan_captions": q("SELECT COUNT(*) FROM captions WHERE id NOT IN (SELECT id FROM files)"),
            "sources_done": q("SELECT COUNT(*) FROM sources"),
            "generation": int(q("SELECT value FROM meta WHERE key = 'generation'")),
        }
    finally:
        db.close()
    gen = facts["generation"]
    faiss_vecs: dict[int, np.ndarray] = {}
    vf = idx / f"vectors.{gen}.faiss"
    if vf.is_file():
        fx = faiss.read_index(str(vf))
        for i, _, _ in files:
            with contextlib.suppress(RuntimeError):
                faiss_vecs[i] = fx.reconstruct(i)
    return {
        "files": files,
        "members": dict(members),
        "captions": captions,
        "faiss": faiss_vecs,
        "faiss_file": vf.name,
        **facts,
    }


def verify(
    idx: Path, env: dict[str, str], ref: dict[str, np.ndarray], captions: dict[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """The problems of ``idx`` against the reference vectors by identity (empty: consistent), and its figures."""
    problems: list[str] = []
    c = cocatk(["check", "--index", str(idx), "--json"], env)
    try:
        rep = json.loads(c.stdout)
    except ValueError:
        return [f"check rc={c.returncode}, no JSON: {(c.stdout + c.stderr)[-300:]}"], {}
    if not rep.get("ok") or c.returncode != 0:
        problems.append(f"check: rc {c.returncode}, {rep.get('problems')}")
    d = read_index(idx)
    paths = [p for _, p, _ in d["files"]]
    dup = len(paths) - len(set(paths))
    if dup:
        problems.append(f"{dup} duplicate identities")
    missing = set(ref) - set(paths)
    extra = set(paths) - set(ref)
    if missing or extra:
        problems.append(f"{len(missing)} items missing, {len(extra)} rows not in the reference")
    maxd = 0.0
    by_id = {}
    for i, p, blob in d["files"]:
        by_id[i] = p
        if p in ref:
            v = np.frombuffer(blob, dtype="<f4")
            maxd = max(maxd, float(np.abs(v - ref[p]).max()))
            fv = d["faiss"].get(i)
            if fv is None or not np.array_equal(fv, v):
                problems.append(f"FAISS vector of {p} differs from SQLite's or is absent")
                break
    if maxd != 0.0:
        problems.append(f"vectors differ from the reference: max |d| {maxd:.3g}")
    bad_members = [i for i in by_id if d["members"].get(i) != 1]
    if bad_members:
        problems.append(f"{len(bad_members)} items without exactly one member row")
    cap_count: dict[int, int] = {}
    wrong_caption = 0
    for i, text in d["captions"]:
        cap_count[i] = cap_count.get(i, 0) + 1
        wrong_caption += by_id.get(i) is not None and captions.get(by_id[i]) != text
    if any(cap_count.get(i) != 1 for i in by_id) or wrong_caption:
        problems.append(f"dataset captions: {sum(cap_count.get(i) != 1 for i in by_id)} items without exactly one, "
                        f"{wrong_caption} wrong")  # fmt: skip
    if d["orphan_members"] or d["orphan_captions"]:
        problems.append(f"{d['orphan_members']} member rows and {d['orphan_captions']} captions without a file")
    figures = {
        "rows": len(paths),
        "distinct": len(set(paths)),
        "max_abs_d": maxd,
        "sources_done": d["sources_done"],
        "check": {k: rep.get(k) for k in ("ok", "files", "vectors")},
        "faiss_file": d["faiss_file"],
    }
    return problems, figures


def shard_open(pid: int, folder: Path) -> str | None:
    """A shard of ``folder`` that process ``pid`` holds open now, if any."""
    prefix = str(folder.resolve()) + os.sep
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith(prefix) and target.endswith(".tar"):
                return target
    return None


def kill_when(
    args: list[str], env: dict[str, str], ready: Callable[[subprocess.Popen], Any], every: float, limit: float
) -> dict[str, Any]:
    """Start ``args``, poll ``ready(proc)`` every ``every`` s, SIGKILL the group when it returns a truthy value (or
    at ``limit`` s): when, what ``ready`` saw, and whether the process was still running."""
    p = spawn(args, env)
    t0 = time.monotonic()
    seen = None
    while p.poll() is None and time.monotonic() - t0 < limit:
        seen = ready(p)
        if seen:
            break
        time.sleep(every)
    at = time.monotonic() - t0
    running = p.poll() is None
    kill_group(p)
    return {"kill_at_s": round(at, 3), "saw": seen, "running_at_kill": running, "rc": p.returncode}


def timeline(args: list[str], env: dict[str, str], idx: Path) -> tuple[float, list[tuple[float, int]], str]:
    """The unkilled run: its duration and (seconds, committed rows) at each change of the count."""
    marks: list[tuple[float, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def poll() -> None:
        last = None
        while not stop.is_set():
            n = rows(idx)
            if n is not None and n != last:
                marks.append((round(time.monotonic() - t0, 3), n))
                last = n
            time.sleep(0.002)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    r = cocatk(args, env)
    dt = time.monotonic() - t0
    stop.set()
    th.join()
    if r.returncode != 0:
        raise SystemExit(f"the unkilled run failed: {(r.stdout + r.stderr)[-2000:]}")
    return dt, marks, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--per-shard", type=int, default=30)
    ap.add_argument("--size", default="320x240", help="photo size WxH")
    ap.add_argument("--checkpoint-every", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="kills per moment")
    ap.add_argument("--random", type=int, default=5, help="extra kills at seeded moments over the run")
    ap.add_argument("--seed", type=int, default=30)
    ap.add_argument("--moments", default=",".join(MOMENTS), help=f"a comma list of {','.join(MOMENTS)}")
    ap.add_argument("--work", type=Path, default=Path("/tmp/soak-shards"))
    ap.add_argument("--tag", default=None, help="suffix of the record's name in benchmarks/results")
    args = ap.parse_args()
    moments = [m.strip() for m in args.moments.split(",") if m.strip()]
    if set(moments) - set(MOMENTS):
        ap.error(f"unknown moments {sorted(set(moments) - set(MOMENTS))}")
    w, h = (int(x) for x in args.size.split("x"))
    work = args.work
    env = dict(os.environ, COCATK_HOME=str(work / "home"), COCATK_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("COCATK_INDEX", None)

    info = machine_info()
    info["lscpu_model"] = lscpu_model()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"CPU: {info['lscpu_model'] or info['cpu']}, {info['cores']} cores, load {info['loadavg']}", flush=True)
    t = time.monotonic()
    shard_dir = work / "shards"
    captions = ensure_shards(shard_dir, args.shards, args.per_shard, (w, h))
    total = len(captions)
    print(f"{args.shards} shards x {args.per_shard} items ({total}) in {shard_dir} ({time.monotonic() - t:.1f} s)")
    spec = str(shard_dir.resolve() / f"{{{0:05d}..{args.shards - 1:05d}}}.tar")  # quoted: cocatk expands it

    def index_args(idx: Path) -> list[str]:
        return ["index", spec, "--index", str(idx), *MODEL, "--checkpoint-every", str(args.checkpoint_every)]

    # warm-up: the first index under a fresh COCATK_CACHE exports the demo text tower to ONNX; not in any timing
    warm = work / "warm"
    shutil.rmtree(warm, ignore_errors=True)
    r = cocatk(["index", str(shard_dir.resolve() / "00000.tar"), "--index", str(warm), *MODEL], env)
    assert r.returncode == 0, r.stdout + r.stderr

    ref_idx = work / "ref"
    shutil.rmtree(ref_idx, ignore_errors=True)
    dur, marks, _ = timeline([*index_args(ref_idx), "--json"], env, ref_idx)
    ref_data = read_index(ref_idx)
    ref = {p: np.frombuffer(e, dtype="<f4").copy() for _, p, e in ref_data["files"]}
    assert len(ref) == total, f"the reference holds {len(ref)} of {total} items"
    print(f"unkilled run {dur:.2f} s; committed rows over time (s: rows): {marks}", flush=True)

    every = args.checkpoint_every
    last_intermediate = ((total - 1) // every) * every
    idx = work / "idx"
    plans: list[tuple[str, Callable[[subprocess.Popen], Any] | None, float]] = []
    trigger: dict[str, Callable[[subprocess.Popen], Any]] = {
        "scan": lambda p: shard_open(p.pid, shard_dir),
        "first-checkpoint": lambda p: (n := rows(idx)) and n >= 1 and n,
        "mid-run": lambda p: (n := rows(idx)) and n >= total // 2 and n,
        "final-window": lambda p: (n := rows(idx)) and n >= last_intermediate and n,
        "end": lambda p: (n := rows(idx)) and n >= total and n,
    }
    for m in moments:
        plans += [(m, trigger[m], 0.0005 if m == "scan" else 0.002)] * args.repeats
    rng = random.Random(f"{args.seed}:shards")
    for at in sorted(rng.uniform(0.05, 0.95) * dur for _ in range(args.random)):
        plans.append((f"random {at:.2f} s", None, at))  # killed at that many seconds

    trials: list[dict[str, Any]] = []
    for name, ready, when in plans:
        shutil.rmtree(idx, ignore_errors=True)
        load = os.getloadavg()[0]
        if ready is None:
            res = kill_when(index_args(idx), env, lambda p: None, 0.001, when)
        else:
            res = kill_when(index_args(idx), env, ready, when, 600)
        before, shards_done = rows(idx), sources_done(idx)
        t1 = time.monotonic()
        r1 = cocatk([*index_args(idx), "--json"], env)
        rerun_s = time.monotonic() - t1
        r2 = cocatk([*index_args(idx), "--json"], env)
        res.update(
            moment=name,
            load_before=round(load, 2),
            rows_before_rerun=before,
            shards_done_before_rerun=shards_done,
            rerun_s=round(rerun_s, 2),
        )
        problems: list[str] = []
        for label, rr in (("rerun", r1), ("second rerun", r2)):
            if rr.returncode != 0:
                problems.append(f"{label} exit {rr.returncode}: {(rr.stdout + rr.stderr)[-400:]}")
        if not problems:
            rep1, rep2 = json.loads(r1.stdout), json.loads(r2.stdout)
            done = before or 0
            res["rerun"] = {k: rep1.get(k) for k in ("encoded", "new", "unchanged", "removed", "total")}
            res["second_rerun"] = {k: rep2.get(k) for k in ("encoded", "new", "unchanged", "removed", "total")}
            if (rep1["encoded"], rep1["unchanged"], rep1["total"]) != (total - done, done, total):
                problems.append(f"rerun encoded {rep1['encoded']} / unchanged {rep1['unchanged']}, expected "
                                f"{total - done} / {done}")  # fmt: skip
            if (rep2["encoded"], rep2["unchanged"], rep2["total"]) != (0, total, total):
                problems.append(f"second rerun encoded {rep2['encoded']}, unchanged {rep2['unchanged']}")
            more, figures = verify(idx, env, ref, captions)
            problems += more
            res["figures"] = figures
            if figures.get("sources_done") != args.shards:
                problems.append(f"{figures.get('sources_done')} shards recorded done of {args.shards}")
        res["problems"] = problems
        res["outcome"] = "consistent" if not problems else "FAILED"
        trials.append(res)
        print(f"  {name}: killed at {res['kill_at_s']} s (saw {res['saw']!r}, running {res['running_at_kill']}), "
              f"rows before rerun {before}, shards done {shards_done}; rerun {rerun_s:.1f} s: {res['outcome']} "
              f"{'; '.join(problems)[:400]}",
              flush=True)  # fmt: skip

    table = []
    for m in [*moments, "random"]:
        ts = [t for t in trials if t["moment"] == m or (m == "random" and t["moment"].startswith("random"))]
        if not ts:
            continue
        table.append([
            m,
            len(ts),
            ", ".join(f"{t['kill_at_s']:.2f}" for t in ts),
            ", ".join(str(t["rows_before_rerun"]) for t in ts),
            ", ".join(str(t["shards_done_before_rerun"]) for t in ts),
            sum(not t["running_at_kill"] for t in ts),
            ", ".join(str((t.get("rerun") or {}).get("encoded")) for t in ts),
            sum(t["outcome"] == "consistent" for t in ts),
            max((t.get("figures") or {}).get("max_abs_d", float("nan")) for t in ts),
        ])  # fmt: skip
    print_table(
        f"shards soak: {args.shards} shards x {args.per_shard} items, demo model, --checkpoint-every {every}; "
        f"unkilled run {dur:.2f} s",
        ["moment", "kills", "kill at s", "rows before rerun", "shards done before", "exited first", "rerun encoded",
         "consistent", "max |d| vs ref"],
        table,
    )  # fmt: skip
    failed = sum(t["outcome"] != "consistent" for t in trials)
    record = {
        "commit": commit.stdout.strip() or "unknown (not a git checkout)",
        "lscpu_model": info["lscpu_model"],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "items": total,
        "unkilled_s": round(dur, 3),
        "timeline": marks,
        "trials": trials,
        "failed": failed,
        "machine": info,
    }
    write_record("soak-shards" + (f"-{args.tag}" if args.tag else ""), record)
    print(f"{len(trials) - failed}/{len(trials)} consistent; load average {os.getloadavg()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
