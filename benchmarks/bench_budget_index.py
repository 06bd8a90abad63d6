"""An index chosen by a memory budget (``cocatk index --max-index-memory``): what it picks and what it delivers.

    nice python benchmarks/bench_budget_index.py                      # 1M x 768, budget 1 GiB (~6 min, 1 thread)
    python benchmarks/bench_budget_index.py --n 100000 --budget 100M  # a quick look

Data as in bench_search.py: 1M image-like unit vectors of D = 768 (wide clusters in a cone), generated in chunks.
:func:`cocatk.retrieval.budget.choose_index` gets the vectors and the budget and does everything ``cocatk index``
does at its final checkpoint: estimate each candidate, build the most accurate one that fits, tune its knob on
1,000 held-out queries drawn from the vectors (each moved to cosine 0.5 from its source, the source dropped from
the lists) until recall@10 reaches 0.95, and record it. Reported beside that:

- the index's real size: the FAISS file, the RSS growth of this process across the choice (the build's leftovers
  included) and the RSS of a fresh process that only reads the file (what a search process holds);
- recall@10 of the chosen index and knobs on bench_search's *text-like* queries (a cluster centre, the modality gap
  offset and noise: a different distribution from the held-out ones), against exact search over all vectors, so the
  held-out estimate can be checked against queries it did not tune on;
- build and choice time, ms/query (median of single-query searches), the machine and its load average before.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import numpy as np  # noqa: E402
from _common import add_threads_option, machine_info, print_table, write_record  # noqa: E402
from bench_search import DIM, K, make_data  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


_READ = """
import sys
import faiss
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
before = rss()
index = faiss.read_index(sys.argv[1])
print(rss() - before, index.ntotal)
"""


def fresh_read_rss(path: Path) -> int:
    """RSS growth of a new process that reads the FAISS file (what a search process holds for the index)."""
    out = subprocess.run([sys.executable, "-c", _READ, str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--budget", default="1G")
    ap.add_argument("--max-query-ms", type=float, default=None)
    ap.add_argument("--queries", type=int, default=1000, help="text-like check queries (held-out ones: 1,000)")
    add_threads_option(ap)
    args = ap.parse_args()

    import faiss

    from cocatk.retrieval.budget import choose_index, describe, estimate_bytes, format_size, parse_size, recall_at_10

    faiss.omp_set_num_threads(args.threads)
    start = machine_info()  # the load average before anything runs
    cpu = lscpu_model()
    print(f"{cpu}, {start['cores']} cores, load average {start['loadavg']} before", flush=True)
    budget = parse_size(args.budget)
    n = args.n
    t = time.perf_counter()
    base, text_queries, _ = make_data(n, args.queries)
    print(f"data: {n:,} x {DIM} float32 ({format_size(base.nbytes)}) in {time.perf_counter() - t:.1f} s", flush=True)
    ids = np.arange(n, dtype=np.int64)

    rss0 = rss_bytes()
    t = time.perf_counter()
    choice, vi = choose_index(
        ids, base, budget, max_query_ms=args.max_query_ms, progress=lambda s: print(s, flush=True)
    )
    choose_s = time.perf_counter() - t
    rss_delta = rss_bytes() - rss0
    print(describe(choice.to_dict()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chosen.faiss"
        vi.save(path)
        file_bytes = path.stat().st_size
        read_rss = fresh_read_rss(path)

    # The chosen index on queries it was not tuned on: bench_search's text-like ones, exact truth over all vectors.
    t = time.perf_counter()
    _, truth = faiss.knn(text_queries, base, K, metric=faiss.METRIC_INNER_PRODUCT)
    truth_s = time.perf_counter() - t
    _, found = vi.search(text_queries, K)
    no_source = np.full(len(text_queries), -1, np.int64)  # these queries have no source vector to drop
    text_recall = recall_at_10(found, truth.astype(np.int64), no_source, K)

    est_file = estimate_bytes(choice.factory, n, DIM, in_memory=False)
    rows: list[list[Any]] = [
        ["chosen factory", choice.factory],
        ["search params", ", ".join(f"{k}={v:g}" for k, v in choice.search_params.items()) or "-"],
        ["budget", format_size(budget)],
        ["estimated (in RAM)", format_size(choice.estimated_bytes)],
        ["estimated file", format_size(est_file)],
        ["FAISS file", format_size(file_bytes)],
        ["RSS of a fresh reader", format_size(read_rss)],
        ["RSS growth across the choice", format_size(rss_delta)],
        ["build s (train + add)", f"{sum(t['build_s'] for t in choice.tried):.1f}"],
        ["choice s (truth, builds, tuning)", f"{choose_s:.1f}"],
        ["recall@10, held-out queries", f"{choice.recall_at_10:.3f} ({choice.queries:,} queries)"],
        ["recall@10, text-like queries", f"{text_recall:.3f} ({len(text_queries):,} queries)"],
        ["ms/query (median, 1 at a time)", f"{choice.query_ms:.2f}"],
    ]
    print_table(f"--max-index-memory {args.budget}, {n:,} x {DIM}", ["", "value"], rows)
    for tried in choice.tried:
        print(f"  tried {tried['factory']}: stopped by {tried['stopped_by']}; (knob, recall, ms): {tried['curve']}")
    record = {
        "n": n,
        "dim": DIM,
        "budget": args.budget,
        "budget_bytes": budget,
        "max_query_ms": args.max_query_ms,
        "threads": args.threads,
        "cpu_lscpu": cpu,
        "choice": choice.to_dict(),
        "estimated_bytes": choice.estimated_bytes,
        "estimated_file_bytes": est_file,
        "file_bytes": file_bytes,
        "fresh_read_rss_bytes": read_rss,
        "rss_delta_bytes": rss_delta,
        "build_s": round(sum(t["build_s"] for t in choice.tried), 2),
        "choose_s": round(choose_s, 2),
        "recall_at_10_held_out": choice.recall_at_10,
        "recall_at_10_text_like": round(text_recall, 4),
        "text_like_queries": len(text_queries),
        "text_like_truth_s": round(truth_s, 2),
        "query_ms": choice.query_ms,
        "machine": start,
    }
    name = "budget-index" + (f"-{args.max_query_ms:g}ms" if args.max_query_ms is not None else "")
    print("record:", write_record(name, record))


if __name__ == "__main__":
    main()
