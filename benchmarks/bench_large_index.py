"""Large collections: recall@10 and latency of IVF-PQ factories with a refine stage, against exact search.

    python benchmarks/bench_large_index.py               # 1M vectors of D = 768 (tens of minutes on 2 cores)
    python benchmarks/bench_large_index.py --n 100000    # a quick look

Data and queries as in bench_search.py: image-like stored vectors (wide clusters in a cone) and *text-like* queries
(the modality gap), recall against the exact top-10 of ``IDMap2,Flat``. Each factory is built through
``VectorIndex.build`` (trained on a seeded sample of at most 200k vectors, then every vector added), saved (the
file size over n is the memory per vector: FAISS holds in RAM what it writes), and searched with its default knobs
(``default_search_params``) and a few others, set with ``VectorIndex.set_search_params``. Latency: one query at a
time, p50 over 200 queries, after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "2")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import numpy as np  # noqa: E402
from _common import add_threads_option, machine_info, median, print_table, write_record  # noqa: E402
from bench_search import DIM, K, make_data, recall_at_k  # noqa: E402

#: (factory, knob settings to try); the first setting of each is the factory's default.
PLANS: list[tuple[str, list[str]]] = [
    (
        "IVF1024,PQ96x4fs,RFlat",
        [
            "",
            "nprobe=16,k_factor=8",
            "nprobe=64,k_factor=16",
            "nprobe=64,k_factor=64",
            "nprobe=128,k_factor=64",
            "nprobe=128,k_factor=128",
        ],
    ),  # fmt: skip
    ("IVF1024,PQ96x4fs,Refine(SQ8)", ["", "nprobe=64,k_factor=64", "nprobe=128,k_factor=128"]),
    ("IVF1024,PQ96x4fs", ["", "nprobe=64"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--factories", nargs="*", default=None, help="only these factories (default: all of PLANS)")
    add_threads_option(ap)
    args = ap.parse_args()

    from cocatk.retrieval.vectors import VectorIndex, default_search_params

    n = args.n
    t = time.perf_counter()
    base, queries, _ = make_data(n, args.queries)
    print(f"data: {n:,} x {DIM} in {time.perf_counter() - t:.1f} s", flush=True)
    ids = np.arange(n, dtype=np.int64)
    exact = VectorIndex.build(DIM, "Flat", ids, base)
    t = time.perf_counter()
    _, truth = exact.search(queries, K)
    lat_exact = _latency(exact, queries)
    print(f"exact: {lat_exact:.1f} ms/query p50 (truth in {time.perf_counter() - t:.1f} s)", flush=True)
    rows: list[dict[str, Any]] = [
        {
            "factory": "Flat",
            "params": "",
            "build_s": 0.0,
            "bytes_per_vector": DIM * 4 + 8,
            "recall_at_10": 1.0,
            "p50_ms": lat_exact,
        }
    ]
    del exact
    plans = [p for p in PLANS if not args.factories or p[0] in args.factories]
    for factory, settings in plans:
        t = time.perf_counter()
        vi = VectorIndex.build(DIM, factory, ids, base)
        build = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "x.faiss"
            vi.save(path)
            per_vector = path.stat().st_size / n
        defaults = default_search_params(factory)
        for setting in settings:
            vi.search_params = dict(defaults)
            if setting:
                vi.set_search_params(setting)
            _, got = vi.search(queries, K)
            row = {
                "factory": factory,
                "params": ",".join(f"{k}={v:g}" for k, v in vi.search_params.items())
                + ("" if setting else " (default)"),
                "build_s": build,
                "bytes_per_vector": per_vector,
                "recall_at_10": recall_at_k(got, truth),
                "p50_ms": _latency(vi, queries),
            }
            rows.append(row)
            print(f"  {row}", flush=True)
        del vi
    print_table(
        f"recall@{K} vs exact, {n:,} x {DIM}, text-like queries",
        ["factory", "search params", "build s", "bytes/vector", "recall@10", "p50 ms"],
        [
            [
                r["factory"],
                r["params"],
                f"{r['build_s']:.0f}",
                f"{r['bytes_per_vector']:.0f}",
                f"{r['recall_at_10']:.3f}",
                f"{r['p50_ms']:.2f}",
            ]
            for r in rows
        ],
    )
    record = {"n": n, "dim": DIM, "queries": args.queries, "rows": rows, "machine": machine_info()}
    print("record:", write_record("large-index", record))


def _latency(vi: Any, queries: np.ndarray, n: int = 200) -> float:
    vi.search(queries[:1], K)
    times = []
    for i in range(min(n, len(queries))):
        t = time.perf_counter()
        vi.search(queries[i : i + 1], K)
        times.append((time.perf_counter() - t) * 1000)
    return median(times)


if __name__ == "__main__":
    main()
