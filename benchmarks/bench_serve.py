"""`cocatk serve` under load: HTTP latency and throughput against the library called directly, plus a soak.

    python benchmarks/bench_serve.py                  # tiny model, 200 images, 20 s per cell, 60 s soak
    python benchmarks/bench_serve.py --quick          # 10 s per cell, 20 s soak
    python benchmarks/bench_serve.py --models tiny,coca_ViT-B-32   # also open_clip's B-32 CoCa (random weights)

For each model: an index of ``--images`` generated PNGs (decoder tokens cached, as `cocatk index --cache-tokens`),
then `cocatk serve` started in a subprocess on 127.0.0.1 (a free port, loopback only). Cells: text search with and
without rerank (rerank_k 50, n 10) at 1, 4 and 16 concurrent clients (threads, one httpx client each), each cell
bounded by ``--seconds`` and ``--max-requests``. The baseline is the library in this process: ``search_index`` on
one ``Index`` with the same queries and the same number of threads, serialised by one lock exactly like the server
(one index, one lock: see cocatk/server/app.py), so the overhead column is HTTP + JSON + thread hand-off:
``(server p50 - library p50) / library p50``. The soak runs 16 clients (mixed rerank on/off) and reports errors and
the server's RSS at its start and end (psutil when installed, else /proc/PID/status VmRSS).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    ROOT,
    add_threads_option,
    free_port,
    machine_info,
    median,
    percentile,
    print_table,
    stop_process,
    write_record,
)

TINY = str(ROOT / "tests" / "data" / "coca_tiny.json")
QUERIES = ["a red bicycle", "a dog on a beach", "a city at night", "a bowl of fruit", "two people talking",
           "a snowy mountain", "a cat asleep", "an old car"]  # fmt: skip
CONCURRENCY = (1, 4, 16)


def make_images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        arr[: 10 + i % 60] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"g{i:05d}.png")


def rss_mb(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
    except Exception:
        return None
    return None


def run_clients(call: Any, clients: int, seconds: float, max_requests: int, rerank: bool | None) -> dict[str, Any]:
    """``clients`` threads calling ``call(worker_state, query, rerank)`` until the time or request budget is spent."""
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    budget = [max_requests]

    def worker(k: int) -> None:
        state: dict[str, Any] = {}
        j = 0
        while time.perf_counter() < deadline:
            with lock:
                if budget[0] <= 0:
                    break
                budget[0] -= 1
            q = QUERIES[(k + j) % len(QUERIES)]
            rr = rerank if rerank is not None else (k + j) % 2 == 0
            t = time.perf_counter()
            try:
                ok = call(state, q, rr)
            except Exception as e:  # a benchmark counts errors, it does not stop on them
                ok = f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t
            with lock:
                if ok is True:
                    lat.append(dt)
                else:
                    errors.append(str(ok))
            j += 1
        if "client" in state:
            state["client"].close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "errors": len(errors),
        "first_errors": errors[:3],
        "p50_ms": median(lat) * 1000 if lat else None,
        "p95_ms": percentile(lat, 95) * 1000 if lat else None,
        "rps": len(lat) / wall if wall else 0.0,
    }


def bench_model(name: str, pretrained: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    from cocatk.retrieval import Index
    from cocatk.retrieval.search import search_index

    photos, idx_dir = work / "photos", work / f"idx-{Path(name).stem}"
    if not photos.is_dir():
        make_images(photos, args.images)
    t = time.perf_counter()
    idx = Index.open(idx_dir, model=name, pretrained=pretrained, device=args.device, create=True)
    idx.update([photos], cache_tokens=True)
    index_s = time.perf_counter() - t

    port = free_port()
    env = {**os.environ, "COCATK_CACHE": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "cocatk", "serve", "--index", str(idx_dir), "--port", str(port)]
    cmd += ["--device", args.device] if args.device else []
    log = open(work / f"serve-{Path(name).stem}.log", "w")  # noqa: SIM115 - a file, not a pipe nobody drains
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    base = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cocatk serve exited: {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - t > 300:
                raise RuntimeError("cocatk serve did not start within 300 s")
            time.sleep(0.2)
        startup_s = time.perf_counter() - t

        def server_call(state: dict[str, Any], q: str, rerank: bool) -> bool | str:
            c = state.get("client")
            if c is None:  # one keep-alive client per thread (creating one costs ~30 ms: an SSL context)
                c = state["client"] = httpx.Client(base_url=base, timeout=120)
            r = c.get("/api/search", params={"q": q, "n": 10, "rerank": rerank, "rerank_k": 50})
            return True if r.status_code == 200 and len(r.json()["hits"]) == 10 else f"HTTP {r.status_code}"

        lib_lock = threading.Lock()

        def library_call(state: dict[str, Any], q: str, rerank: bool) -> bool | str:
            with lib_lock:  # one Index, one lock: what the server does
                res = search_index(idx, text=q, n=10, rerank=rerank, rerank_k=50)
            return True if len(res.hits) == 10 else "short"

        # warm both (first calls build caches, the first HTTP request opens connections)
        run_clients(server_call, 1, 5, 4, None)
        run_clients(library_call, 1, 5, 4, None)
        rows = []
        for rerank in (False, True):
            for clients in CONCURRENCY:
                lib = run_clients(library_call, clients, args.seconds, args.max_requests, rerank)
                srv = run_clients(server_call, clients, args.seconds, args.max_requests, rerank)
                over = (
                    (srv["p50_ms"] - lib["p50_ms"]) / lib["p50_ms"] * 100 if srv["p50_ms"] and lib["p50_ms"] else None
                )
                rows.append({"rerank": rerank, "clients": clients, "library": lib, "server": srv, "overhead_pct": over})
        rss_start = rss_mb(proc.pid)
        soak = run_clients(server_call, 16, args.soak, 10**9, None)
        soak.update({"seconds": args.soak, "clients": 16, "rss_start_mb": rss_start, "rss_end_mb": rss_mb(proc.pid)})
    finally:
        stop_process(proc)
        log.close()
        idx.close()
    return {"model": name, "pretrained": pretrained, "index_s": index_s, "startup_s": startup_s,
            "cells": rows, "soak": soak}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--models", default="tiny", help="comma-separated: tiny, or open_clip CoCa names")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per cell")
    ap.add_argument("--max-requests", type=int, default=2000, help="requests per cell at most")
    ap.add_argument("--soak", type=float, default=60.0, help="seconds of the 16-client soak")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="10 s per cell, 20 s soak")
    add_threads_option(ap)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.soak = 10.0, 20.0
    import torch

    torch.set_num_threads(args.threads)
    start = machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="cocatk-bench-serve-") as tmp:
        os.environ["COCATK_CACHE"] = str(Path(tmp) / "cache")
        for name in args.models.split(","):
            model = TINY if name == "tiny" else name
            results.append(bench_model(model, "none", args, Path(tmp)))
    for res in results:
        table = []
        for c in res["cells"]:
            lib, srv = c["library"], c["server"]
            table.append([
                "on" if c["rerank"] else "off", c["clients"], lib["p50_ms"], srv["p50_ms"], srv["p95_ms"],
                lib["rps"], srv["rps"], srv["errors"], c["overhead_pct"],
            ])  # fmt: skip
        print_table(
            f"{Path(res['model']).stem} ({args.images} images, n 10, rerank_k 50, {args.seconds:g} s per cell; "
            f"server start-up {res['startup_s']:.1f} s)",
            ["rerank", "clients", "lib p50 ms", "srv p50 ms", "srv p95 ms", "lib req/s", "srv req/s", "errors",
             "overhead %"],
            table,
        )  # fmt: skip
        s = res["soak"]
        print(f"soak: {s['seconds']:g} s x 16 clients: {s['requests']} requests, {s['errors']} errors, "
              f"p50 {s['p50_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms; server RSS {s['rss_start_mb']} -> "
              f"{s['rss_end_mb']} MB")  # fmt: skip
    record = {"settings": {k: v for k, v in vars(args).items()}, "results": results, "machine": start}
    write_record("serve", record)


if __name__ == "__main__":
    main()
