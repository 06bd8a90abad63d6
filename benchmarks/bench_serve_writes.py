"""`cocatk serve` while `cocatk index` writes to the same index: errors, latency beside the read-only figure, and
how soon the new files are searchable without a restart.

    python benchmarks/bench_serve_writes.py                 # demo model, 200 indexed + 1,000 added, 8 clients
    python benchmarks/bench_serve_writes.py --add 300 --clients 4 --seconds 15     # quicker

An index of ``--base`` generated photos (the shipped demo model, tokens cached) is served by `cocatk serve` in a
subprocess on 127.0.0.1. Phase "read-only": ``--clients`` threads send text searches (rerank on and off, alternating)
for ``--seconds``. Phase "with writes": the same clients while a `cocatk index NEW --index IDX` subprocess adds
``--add`` more photos in a new folder of the same index; a poller reads /api/health every 0.2 s. After the writer
exits: the seconds until /api/health counts every image, and whether ``/api/search?under=NEW`` returns hits from
the new folder (searchable without a restart). Reports every non-200 status by code, and p50/p99 per phase.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import ROOT, free_port, machine_info, percentile, print_table, stop_process, write_record

QUERIES = ["a red ball on grass", "a blue cube", "a dog on a beach", "two green shapes", "a yellow sky",
           "a cat asleep", "an orange square", "a purple circle"]  # fmt: skip


def _generate(folder: Path, n: int, seed: int) -> None:
    from cocatk.demo.scenes import generate_folder

    for part, start in enumerate(range(0, n, 500)):  # at most 630 distinct scenes per folder
        generate_folder(folder / f"part{part}", n=min(500, n - start), seed=seed * 1000 + part, manifest=False)


def _wait_up(base: str, proc: subprocess.Popen[bytes], log: Path) -> float:
    import httpx

    t = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"cocatk serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                return time.perf_counter() - t
        except httpx.TransportError:
            pass
        if time.perf_counter() - t > 300:
            raise RuntimeError("cocatk serve did not start within 300 s")
        time.sleep(0.2)


def run_clients(base: str, clients: int, stop: threading.Event) -> dict[str, Any]:
    """Searches from ``clients`` threads until ``stop``; latencies of 200s and a count of every status."""
    import httpx

    lat: list[float] = []
    statuses: Counter[str] = Counter()
    lock = threading.Lock()

    def worker(k: int) -> None:
        with httpx.Client(base_url=base, timeout=120) as c:
            i = k
            while not stop.is_set():
                q = QUERIES[i % len(QUERIES)]
                t = time.perf_counter()
                try:
                    r = c.get("/api/search", params={"q": q, "n": 10, "rerank": i % 2 == 0})
                    code = str(r.status_code)
                except httpx.TransportError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t
                with lock:
                    statuses[code] += 1
                    if code == "200":
                        lat.append(dt)
                i += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for th in threads:
        th.start()
    return {"threads": threads, "lat": lat, "statuses": statuses}


def finish(state: dict[str, Any], seconds: float) -> dict[str, Any]:
    for th in state["threads"]:
        th.join()
    lat = state["lat"]
    return {
        "requests": sum(state["statuses"].values()),
        "statuses": dict(state["statuses"]),
        "server_errors": sum(n for code, n in state["statuses"].items() if not code.startswith(("2", "4"))),
        "p50_ms": percentile(lat, 50) * 1000 if lat else None,
        "p99_ms": percentile(lat, 99) * 1000 if lat else None,
        "rps": len(lat) / seconds if seconds else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=200, help="photos indexed before the server starts")
    ap.add_argument("--add", type=int, default=1000, help="photos the writer adds while the server answers")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0, help="seconds of the read-only phase")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    import httpx

    start_machine = machine_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="cocatk-serve-writes-"))
    photos, new, idx = work / "photos" / "base", work / "photos" / "new", work / "idx"
    env = {**os.environ, "COCATK_HOME": str(work / "home"), "COCATK_CACHE": str(work / "cache"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cocatk = [sys.executable, "-m", "cocatk"]
    _generate(photos, args.base, seed=1)
    _generate(new, args.add, seed=2)  # generated before the run: the writer's time is indexing only
    demo = ["--model", "demo", "--device", "cpu"]
    subprocess.run([*cocatk, "index", str(photos), "--index", str(idx), *demo], env=env, check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    with open(log, "w") as log_f:
        proc = subprocess.Popen([*cocatk, "serve", "--index", str(idx), "--port", str(port), "--device", "cpu"],
                                env=env, stdout=log_f, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        startup_s = _wait_up(base, proc, log)
        warm = threading.Event()
        warm_state = run_clients(base, 1, warm)
        time.sleep(3)
        warm.set()
        finish(warm_state, 3)

        stop = threading.Event()
        state = run_clients(base, args.clients, stop)
        time.sleep(args.seconds)
        stop.set()
        read_only = finish(state, args.seconds)

        seen: list[tuple[float, int, int]] = []  # (seconds since the writer started, images, generation)
        stop = threading.Event()
        state = run_clients(base, args.clients, stop)
        t0 = time.perf_counter()
        writer = subprocess.Popen([*cocatk, "index", str(new), "--index", str(idx), *demo], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        with httpx.Client(base_url=base, timeout=60) as c:
            while writer.poll() is None:
                h = c.get("/api/health").json()
                seen.append((time.perf_counter() - t0, h["images"], h["generation"]))
                time.sleep(0.2)
            writer_s = time.perf_counter() - t0
            writer_err = writer.stderr.read() if writer.stderr else ""
            total = args.base + args.add
            visible_s = None
            while time.perf_counter() - t0 < writer_s + 60:
                h = c.get("/api/health").json()
                seen.append((time.perf_counter() - t0, h["images"], h["generation"]))
                if h["images"] == total:
                    visible_s = time.perf_counter() - t0 - writer_s
                    break
                time.sleep(0.2)
            stop.set()
            with_writes = finish(state, time.perf_counter() - t0)
            r = c.get("/api/search", params={"q": QUERIES[0], "n": 20, "rerank": False, "under": str(new)})
            new_hits = [h["path"] for h in r.json().get("hits", [])] if r.status_code == 200 else []
            searchable = r.status_code == 200 and bool(new_hits) and all(p.startswith(str(new)) for p in new_hits)
        server_log = log.read_text(errors="replace")
    finally:
        stop_process(proc)

    generations = sorted({g for _, _, g in seen})
    record = {
        "machine": start_machine,
        "args": {k: str(v) for k, v in vars(args).items()},
        "startup_s": startup_s,
        "read_only": read_only,
        "with_writes": with_writes,
        "writer": {
            "seconds": writer_s,
            "returncode": writer.returncode,
            "stderr_tail": writer_err[-1000:],
            "images_per_s": args.add / writer_s,
        },  # fmt: skip
        "generations_seen": generations,
        "visible_after_writer_s": visible_s,
        "new_folder_searchable": searchable,
        "server_tracebacks": server_log.count("Traceback"),
    }
    print_table(
        f"cocatk serve with a writer ({args.clients} clients, demo model, {args.base} + {args.add} photos)",
        ["phase", "requests", "non-200 by status", "5xx/transport", "p50 ms", "p99 ms"],
        [[name, d["requests"], {k: v for k, v in d["statuses"].items() if k != "200"} or "none",
          d["server_errors"], d["p50_ms"], d["p99_ms"]]
         for name, d in (("read-only", read_only), ("with writes", with_writes))],
    )  # fmt: skip
    print(
        f"writer: {writer_s:.1f} s ({args.add / writer_s:.1f} images/s), exit {writer.returncode}; generations "
        f"seen {generations}; all {args.base + args.add} images visible {visible_s} s after it exited; new "
        f"folder searchable without a restart: {searchable}; server tracebacks: {record['server_tracebacks']}"
    )
    print(f"record: {write_record('serve-writes', record)}")
    ok = (read_only["server_errors"] == 0 and with_writes["server_errors"] == 0 and writer.returncode == 0
          and searchable and visible_s is not None and record["server_tracebacks"] == 0)  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
