"""Search latency and ANN recall: cocatk's exact FAISS index vs raw ``faiss.IndexFlatIP`` vs numpy brute force.

    python benchmarks/bench_search.py            # 10k, 100k, 1M vectors of D = 768 (about 5 minutes on 2 cores)
    python benchmarks/bench_search.py --quick    # 10k and 100k

Stored vectors are image-like: wide clusters (1,000 centres) inside a cone (a shared mean direction), cosine ~0.45
to their centre and ~0.05 between unrelated vectors. Queries are *text-like*: drawn from a different distribution, as
CLIP-style text embeddings are (the "modality gap"): a cluster centre scaled down, a little of the mean, a shared
offset direction and noise, so a query's best cosine with the stored vectors is ~0.25 (near-duplicates: ~0.9).
Recall measured with stored vectors (slightly perturbed) as queries flatters ANN indexes; it is printed beside the
text-like recall to show by how much.

Exact search, three ways (timed interleaved, one query of each in turn):

- ``cocatk``: ``cocatk.retrieval.vectors.VectorIndex`` (``IDMap2,Flat``, inner product), the index ``cocatk index``
  writes, searched through its ``search`` method (score/id post-processing included).
- ``faiss``: a raw ``faiss.IndexFlatIP``.
- ``numpy``: ``base @ q`` then ``argpartition`` top-k and a sort of the k (one BLAS call per batch).

Approximate search: ``IVF1024,Flat`` (built through ``VectorIndex.build``, trained on a sample of at most 200k
stored vectors) at several ``nprobe``; ``IVF1024,PQ64`` and ``HNSW32`` up to 100k vectors only (their builds take
minutes at 100k on one core, far longer at 1M); recall@10 against the exact top-10.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

# BLAS reads its thread count when numpy loads, so --threads is applied before the import.
_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import numpy as np  # noqa: E402
from _common import add_threads_option, machine_info, median, percentile, print_table, write_record  # noqa: E402

DIM = 768
K = 10
N_CLUSTERS = 1000


def make_data(n: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored (n, D), text-like queries (Q, D), stored-like queries (Q, D)), all float32 and L2-normalised.

    Stored: wide clusters inside a cone (a shared mean direction), like CLIP image embeddings: cosine ~0.45 to their
    cluster centre, ~0.2 between unrelated images. Text-like queries: a cluster centre, scaled down, plus a shared
    offset (the modality gap) and noise, so their best cosine with the stored vectors is ~0.3.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CLUSTERS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    mean = rng.standard_normal(DIM).astype(np.float32)
    mean /= np.linalg.norm(mean)
    base = np.empty((n, DIM), np.float32)
    chunk = 100_000
    for i in range(0, n, chunk):  # chunked so the temporary noise stays small at 1M
        m = min(chunk, n - i)
        x = (
            0.5 * mean
            + centres[rng.integers(0, N_CLUSTERS, m)]
            + 0.072 * rng.standard_normal((m, DIM), dtype=np.float32)
        )
        base[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    gap = rng.standard_normal(DIM).astype(np.float32)
    gap /= np.linalg.norm(gap)
    owners = rng.integers(0, N_CLUSTERS, n_queries)
    q = 0.5 * centres[owners] + 0.2 * mean + 0.6 * gap + 0.04 * rng.standard_normal((n_queries, DIM), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    near = base[rng.integers(0, n, n_queries)] + 0.02 * rng.standard_normal((n_queries, DIM), dtype=np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    return base, q.astype(np.float32), near.astype(np.float32)


def numpy_search(base: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ base.T  # (Q, n)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-top, axis=1)
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(part, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth, strict=False)]))


def bench_exact(n: int, base: np.ndarray, queries: np.ndarray, n_single: int, batch: int) -> tuple[list, np.ndarray]:
    import faiss

    from cocatk.retrieval.vectors import VectorIndex

    t = time.perf_counter()
    vi = VectorIndex.build(DIM, "Flat", np.arange(n, dtype=np.int64), base)
    build_cocatk = time.perf_counter() - t
    t = time.perf_counter()
    raw = faiss.IndexFlatIP(DIM)
    raw.add(base)
    build_raw = time.perf_counter() - t
    # numpy searches a zero-copy view of the raw index's storage: one 3 GB copy fewer at 1M.
    xb = faiss.rev_swig_ptr(raw.get_xb(), n * DIM).reshape(n, DIM)
    methods = {
        "cocatk VectorIndex (IDMap2,Flat)": lambda q: vi.search(q, K),
        "faiss IndexFlatIP": lambda q: raw.search(q, K),
        "numpy argpartition": lambda q: numpy_search(xb, q, K),
    }
    single: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up
        fn(queries[:1])
    names = list(methods)
    for i in range(n_single):
        # Rotate the order: whichever runs right after another method pays for its cache and thread wake-up.
        for name in names[i % 3 :] + names[: i % 3]:
            t = time.perf_counter()
            methods[name](queries[i : i + 1])
            single[name].append(time.perf_counter() - t)
    batched: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Any] = {}
    for r in range(1 if n >= 1_000_000 else 3):
        for name in names[r % 3 :] + names[: r % 3]:
            t = time.perf_counter()
            results[name] = methods[name](queries[:batch])
            batched[name].append(time.perf_counter() - t)
    truth = results["faiss IndexFlatIP"][1]
    rows = []
    for name in methods:
        same = float(np.mean(results[name][1] == truth))
        rows.append(
            {
                "n": n,
                "method": name,
                "build_s": build_cocatk if name.startswith("cocatk") else build_raw if name.startswith("faiss") else 0,
                "p50_ms": median(single[name]) * 1e3,
                "p95_ms": percentile(single[name], 95) * 1e3,
                "single_queries": n_single,
                "batch": batch,
                "qps": batch / median(batched[name]),
                "same_ids_as_faiss": same,
            }
        )
    base_p50 = rows[1]["p50_ms"]
    base_qps = rows[1]["qps"]
    for r in rows:
        r["p50_vs_faiss"] = r["p50_ms"] / base_p50
        r["qps_vs_faiss"] = r["qps"] / base_qps
    _, exact_truth = raw.search(queries, K)
    return rows, exact_truth


def bench_ann(
    n: int, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, near: np.ndarray, near_truth: np.ndarray
) -> list[dict[str, Any]]:
    import faiss

    from cocatk.retrieval.vectors import VectorIndex

    plans: list[tuple[str, str, list[int]]] = [("IVF1024,Flat", "nprobe", [1, 8, 32])]
    if n <= 100_000:
        # Both take minutes to build on one core at 100k (PQ64 training: 5 min); at 1M, tens of minutes.
        plans.append(("IVF1024,PQ64", "nprobe", [8, 32]))
        plans.append(("HNSW32", "efSearch", [16, 64, 128]))
    rows = []
    ids = np.arange(n, dtype=np.int64)
    for factory, knob, values in plans:
        t = time.perf_counter()
        vi = VectorIndex.build(DIM, factory, ids, base)
        build = time.perf_counter() - t
        inner = faiss.downcast_index(vi.index.index)
        for v in values:
            if knob == "nprobe":
                inner.nprobe = v
            else:
                inner.hnsw.efSearch = v
            t = time.perf_counter()
            _, got = vi.search(queries, K)
            dt = time.perf_counter() - t
            _, got_near = vi.search(near, K)
            rows.append(
                {
                    "n": n,
                    "factory": factory,
                    "param": f"{knob}={v}",
                    "build_s": build,
                    "recall_at_10_text_like": recall_at_k(got, truth),
                    "recall_at_10_stored_like": recall_at_k(got_near, near_truth),
                    "qps": len(queries) / dt,
                }
            )
            print(f"  n={n:>9,} {factory:14s} {knob}={v:<4d} {rows[-1]}", flush=True)
        del vi
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k only")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--no-ann", action="store_true")
    add_threads_option(ap)
    args = ap.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    record: dict[str, Any] = {
        "machine": machine_info(),
        "dim": DIM,
        "k": K,
        "threads": args.threads,
        "data": f"stored: normalise(0.5*mean + centre (one of {N_CLUSTERS}) + 0.072*N(0, I)); text-like queries: "
        "normalise(0.5*centre + 0.2*mean + 0.6*offset + 0.04*N(0, I)); stored-like: stored + 0.02*N(0, I)",
        "exact": [],
        "ann": [],
    }
    for n in sizes:
        t = time.perf_counter()
        base, queries, near = make_data(n, 1000)
        print(f"n={n:,}: data in {time.perf_counter() - t:.1f} s", flush=True)
        own = (queries @ base[:2000].T).max(axis=1).mean()
        record.setdefault("query_max_cosine_first2k", {})[str(n)] = float(own)
        n_single = 200 if n <= 100_000 else 20
        rows, truth = bench_exact(n, base, queries, n_single, batch=256)
        for r in rows:
            print(f"  {r}", flush=True)
        record["exact"].extend(rows)
        if not args.no_ann and n >= 100_000:
            _, near_truth = numpy_search(base, near, K)
            record["ann"].extend(bench_ann(n, base, queries, truth, near, near_truth))
        del base, queries, near

    print_table(
        f"exact top-{K} search, D = {DIM} (single-query p50/p95 in ms, batched QPS with 256 queries)",
        ["n", "method", "p50 ms", "p95 ms", "QPS", "p50 / faiss", "QPS / faiss", "same ids"],
        [
            [
                r["n"],
                r["method"],
                r["p50_ms"],
                r["p95_ms"],
                r["qps"],
                r["p50_vs_faiss"],
                r["qps_vs_faiss"],
                r["same_ids_as_faiss"],
            ]
            for r in record["exact"]
        ],
    )
    if record["ann"]:
        print_table(
            f"approximate search: recall@{K} vs exact (1,000 queries)",
            ["n", "factory", "param", "build s", "recall text-like", "recall stored-like", "QPS"],
            [
                [
                    r["n"],
                    r["factory"],
                    r["param"],
                    r["build_s"],
                    r["recall_at_10_text_like"],
                    r["recall_at_10_stored_like"],
                    r["qps"],
                ]
                for r in record["ann"]
            ],
        )
    write_record("search", record)


if __name__ == "__main__":
    main()
