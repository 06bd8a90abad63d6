"""A FAISS index chosen by a memory budget, as autofaiss does (``cocatk index --max-index-memory 4G``).

autofaiss itself is not used: its releases pin ``numpy<2`` (cocatk runs on numpy 2), so this is a small chooser of
our own on the same plan: estimate the memory of each candidate factory for ``n`` vectors of ``d`` dimensions, take
the most accurate one that fits, then raise its search knob until recall@10 against exact search reaches a target
or a latency limit stops it, and record what was measured.

Candidates, most accurate first (:func:`candidates`): ``Flat`` (exact), ``IVF{k},Flat`` (only with a latency limit:
the same memory as Flat, faster), ``IVF{k},SQfp16``, ``IVF{k},SQ8``, ``IVF{k},SQ4``, then ``IVF{k},PQ{m}np`` for
``m = d/4, d/8, ...`` (from 10,000 vectors: FAISS trains each PQ sub-quantizer on 39 x 256 points; ``np``: without
the polysemous stage, 8x the training time for nothing a search here uses). ``k`` is the power of two nearest
``sqrt(n)`` (at least 39 vectors per list). Below :data:`MIN_COMPRESSED` vectors there is too
little to train a quantizer on, so the index stays ``Flat`` (exact, a few MB at most) and the record says why.

Memory (:func:`estimate_bytes`) is what a search process holds after reading the FAISS file: the codes (``Flat``
4d bytes a vector, ``SQfp16`` 2d, ``SQ8`` d, ``SQ4`` d/2, ``PQm`` m), the inverted lists' ids (8 bytes a vector),
the coarse centroids (4kd), codebooks and rotations, and cocatk's ``IDMap2`` (an 8-byte id and a ~48-byte reverse
map entry a vector). Measured on faiss-cpu 1.15 (200k x 128, a fresh process reading the file): within 3% of it
(``PQ..fs``: 10%). The budget bounds the index, not the peak of a build (which also holds the float32 vectors it
trains and adds).

Recall (:func:`held_out_queries`, :func:`recall_at_10`): queries are drawn from the indexed vectors themselves (a
seeded sample of :data:`HELD_OUT_QUERIES`), each moved off its source toward a "text-like" query: the source plus
an orthogonal random direction, normalised, so that the query's cosine with its source is :data:`QUERY_COSINE`
(0.5; a text query's best match is far from it, an image's near-duplicate close to 1). The ground truth is exact
inner-product search over every vector (``faiss.knn``); the source itself is dropped from both the truth and the
result (each is searched one deeper), so no query is credited for finding its own copy. Latency is the median wall
time of single-query searches (up to :data:`LATENCY_QUERIES`, at most ~2 s of them), the way ``cocatk search`` asks.

Tuning (:func:`tune`): ``nprobe`` (IVF) or ``efSearch`` (HNSW) doubles from 1 (16) until recall@10 reaches the
target (:data:`TARGET_RECALL`), the median latency passes ``max_query_ms`` (the last setting under it is kept) or the
knob reaches its cap (nprobe 256 or the list count); a target reached is bisected down to within 25% of the smallest
value that reaches it, a latency limit passed up to within 25% of the largest value under it; a plateau at the cap
keeps the smallest value within 0.005 of its best. Only a candidate that cannot answer within the limit at all (Flat,
or its smallest knob) gives way to the next one that fits; the best recall within the limit wins.

Example:
    >>> parse_size("1.5GiB")
    1610612736
    >>> format_size(estimate_bytes("IVF1024,SQ8", 1_000_000, 768))
    '796 MiB'
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from .vectors import PARAMS_ENV, VectorIndex, default_search_params, parse_search_params

#: recall@10 that tuning stops at (autofaiss's default target is 0.9 for its own queries; text-like ones are harder).
TARGET_RECALL = 0.95
#: Queries drawn from the data to measure recall (or every vector, when there are fewer).
HELD_OUT_QUERIES = 1000
#: Cosine between a held-out query and the vector it is drawn from.
QUERY_COSINE = 0.5
#: Single-query searches timed per setting (fewer when they take over ~2 s together).
LATENCY_QUERIES = 100
#: Fewer vectors than this keep the exact index: too few to train scalar ranges, k-means lists or PQ codebooks well.
MIN_COMPRESSED = 1000
#: Product quantizers need 2**8 centroids per sub-space trained on 39 points each (FAISS warns below that).
MIN_PQ = 39 * 256
#: Reverse-map entry of ``IndexIDMap2`` per vector in RAM (an unordered_map node and its bucket; not in the file).
IDMAP2_REV_BYTES = 48
#: Largest knob tried: ``nprobe`` 256 is ~1/4 of the lists at 1M; HNSW's ``efSearch`` 1024.
MAX_NPROBE = 256
MAX_EF_SEARCH = 1024
#: Candidates built at most per choice (each build trains and adds every vector).
MAX_CANDIDATES = 3

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int | float) -> int:
    """Bytes of a size text: ``"4G"``, ``"512M"``, ``"1.5GiB"``, ``"800MB"``, ``"1024"`` (bytes).

    Units are binary whichever way they are written (``G`` = ``GB`` = ``GiB`` = 2**30, as autofaiss reads them):
    a memory budget is RAM, and RAM comes in binary units.

    Raises:
        UsageError: not a positive size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        unit = ""
    else:
        m = _SIZE.match(str(text))
        if m is None:
            raise UsageError(
                f"cannot read {str(text)!r} as a memory size",
                hint="write a number with an optional unit K, M, G or T (binary), e.g. 4G, 512M or 1.5GiB",
            )
        value, unit = float(m.group(1)), m.group(2).upper()
    size = int(value * _UNITS[unit])
    if size < 1:
        raise UsageError(f"a memory budget must be positive, got {text!r}", hint="e.g. --max-index-memory 4G")
    return size


def format_size(n: float) -> str:
    """``"1.0 GiB"``, ``"790 MiB"``, ``"12.5 KiB"``, ``"512 B"`` (binary units, as :func:`parse_size` reads)."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


# ---- memory -----------------------------------------------------------------------------------------------------
def _split(factory: str) -> list[str]:
    """Top-level comma-separated parts (``Refine(SQ8)`` keeps its comma-free argument)."""
    parts, depth, cur = [], 0, ""
    for ch in factory:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch == "("
        depth -= ch == ")"
        cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def _code(part: str, d: int) -> tuple[float, float] | None:
    """(bytes per vector, fixed bytes) of an encoding part, or None when ``part`` is not one."""
    if part == "Flat":
        return 4.0 * d, 0.0
    if part in ("SQfp16", "SQbf16"):
        return 2.0 * d, 0.0
    m = re.fullmatch(r"SQ([468])", part)
    if m:
        return math.ceil(int(m.group(1)) * d / 8), 2 * 4.0 * d  # per-dimension min and range
    m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs|np)?", part)
    if m:
        sub, bits = int(m.group(1)), int(m.group(2) or 8)
        return math.ceil(sub * bits / 8), (2**bits) * d * 4.0  # codebooks: 2**bits centroids of d/m in each of m
    return None


def estimate_bytes(factory: str, n: int, d: int, *, in_memory: bool = True) -> int:
    """Bytes of cocatk's ``IDMap2,<factory>`` index holding ``n`` vectors of ``d`` dimensions.

    Args:
        factory: a FAISS factory string made of ``OPQm[_o]``/``PCA o`` transforms, ``IVFk`` (or ``IVFk_HNSWm``),
            ``HNSWm``, an encoding (``Flat``, ``SQfp16``, ``SQ8``, ``SQ6``, ``SQ4``, ``PQm[xb][fs|np]``) and a refine
            stage (``RFlat``, ``Refine(<encoding>)``).
        in_memory: what a process holds after reading the file (True) or the file's size (False: without the
            reverse id map that ``IDMap2`` rebuilds on load).

    Raises:
        UsageError: a factory part this estimate does not know.
    """
    per, fixed = 8.0 + (IDMAP2_REV_BYTES if in_memory else 0), 1024.0  # id map; headers
    dim = d
    encoded = False
    for part in _split(factory):
        m_opq = re.fullmatch(r"OPQ(\d+)(?:_(\d+))?", part)
        m_pca = re.fullmatch(r"PCAR?(\d+)", part)
        m_ivf = re.fullmatch(r"IVF(\d+)(?:_HNSW(\d+))?", part)
        m_hnsw = re.fullmatch(r"HNSW(\d+)(?:_\w+)?", part)
        m_ref = re.fullmatch(r"Refine\((.+)\)", part)
        if m_opq or m_pca:
            out = int((m_opq.group(2) or dim) if m_opq else m_pca.group(1))  # type: ignore[union-attr]
            fixed += 4.0 * dim * out + 4.0 * out
            dim = out
        elif part in ("L2norm", "RR") or re.fullmatch(r"Pad\d+", part):
            pass
        elif m_ivf:
            k = int(m_ivf.group(1))
            per += 8.0  # the inverted lists store an id beside each code
            fixed += 4.0 * k * dim + (8.0 * int(m_ivf.group(2)) * k if m_ivf.group(2) else 0.0)
        elif m_hnsw:
            links = int(m_hnsw.group(1))
            # level 0 holds 2M neighbours (int32), each higher level M with probability 1/M; a level and an offset
            per += 8.0 * links + 4.0 * links / max(links - 1, 1) + 12.0
            if part == _split(factory)[-1]:  # HNSW32 alone stores the vectors flat
                per += 4.0 * dim
                encoded = True
        elif part == "RFlat" or m_ref:
            code = _code(m_ref.group(1) if m_ref else "Flat", d)
            if code is None:
                raise _unknown(factory, part)
            per, fixed = per + code[0], fixed + code[1]  # the refine stage stores the original vectors
        else:
            code = _code(part, dim)
            if code is None:
                raise _unknown(factory, part)
            per, fixed = per + code[0], fixed + code[1]
            encoded = True
    if not encoded:
        raise _unknown(factory, factory)
    return int(per * n + fixed)


def _unknown(factory: str, part: str) -> UsageError:
    return UsageError(
        f"cannot estimate the memory of FAISS factory '{factory}' (part '{part}')",
        hint="use Flat, IVFk,Flat, IVFk,SQ8, IVFk,PQm, HNSWm or a refine of these",
    )


# ---- candidates -------------------------------------------------------------------------------------------------
def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest sqrt(n), 16 to 65,536, at least 39 vectors a list."""
    k = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1.0)))
    k = min(max(k, 16), 65536)
    while k > 16 and n < 39 * k:
        k //= 2
    return k


def candidates(n: int, d: int, max_query_ms: float | None = None) -> list[str]:
    """Factories worth trying for ``n`` vectors of ``d`` dimensions, most accurate first (see the module doc)."""
    if n < MIN_COMPRESSED:
        return ["Flat"]
    k = nlist_for(n)
    out = ["Flat"]
    if max_query_ms is not None:
        out.append(f"IVF{k},Flat")
    out += [f"IVF{k},SQfp16", f"IVF{k},SQ8", f"IVF{k},SQ4"]
    if n >= MIN_PQ:
        m = d // 4
        while m >= 4:
            if d % m == 0:
                out.append(f"IVF{k},PQ{m}np")  # np: no polysemous training (8x the training time, no gain here)
            m //= 2
    return out


# ---- measuring --------------------------------------------------------------------------------------------------
def held_out_queries(
    vectors: np.ndarray, count: int = HELD_OUT_QUERIES, seed: int = 0, cosine: float = QUERY_COSINE
) -> tuple[np.ndarray, np.ndarray]:
    """(queries (Q, d) float32 unit vectors, positions (Q,) of their sources in ``vectors``): see the module doc."""
    n, d = vectors.shape
    q = min(count, n)
    rng = np.random.default_rng(seed)
    src = np.sort(rng.choice(n, size=q, replace=False)) if q else np.zeros(0, np.int64)
    v = np.asarray(vectors[src], dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    noise = rng.standard_normal((q, d)).astype(np.float32)
    noise -= np.sum(noise * v, axis=1, keepdims=True) * v  # orthogonal to the source
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    out = v + math.sqrt(1.0 / cosine**2 - 1.0) * noise  # cos(out, v) = cosine
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32), src.astype(np.int64)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Positions (Q, k) of the exact top-k by inner product (``faiss.knn``: BLAS in blocks, no index built)."""
    import faiss

    k = min(k, len(vectors))
    _, pos = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    return pos.astype(np.int64)


def recall_at_10(found: np.ndarray, truth: np.ndarray, sources: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |found ∩ truth| / |truth|, over the first ``k`` ids of each that are not the query's
    source (and not FAISS's -1 padding)."""
    if len(truth) == 0:
        return 1.0
    total = 0.0
    for f, t, s in zip(found, truth, sources, strict=True):
        want = [i for i in t if i != s][:k]
        got = [i for i in f if i != s and i >= 0][:k]
        total += len(set(got) & set(want)) / max(len(want), 1)
    return total / len(truth)


def query_latency_ms(vi: VectorIndex, queries: np.ndarray, k: int = 10, limit_s: float = 2.0) -> float:
    """Median milliseconds of single-query searches (up to :data:`LATENCY_QUERIES`, ~``limit_s`` in all)."""
    if len(queries) == 0 or vi.ntotal == 0:
        return 0.0
    vi.search(queries[:1], k)  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    for i in range(min(LATENCY_QUERIES, len(queries))):
        t = time.perf_counter()
        vi.search(queries[i : i + 1], k)
        times.append((time.perf_counter() - t) * 1000)
        if time.perf_counter() - start > limit_s and len(times) >= 3:
            break
    return float(np.median(times))


def _knob(factory: str) -> tuple[str, list[int]] | None:
    m = re.search(r"IVF(\d+)", factory)
    if m:
        cap = min(MAX_NPROBE, int(m.group(1)))
        return "nprobe", [v for v in (2**i for i in range(17)) if v <= cap]
    if "HNSW" in factory:
        return "efSearch", [v for v in (2**i for i in range(4, 11)) if v <= MAX_EF_SEARCH]
    return None


@dataclass
class Tuned:
    """One candidate after tuning: its knobs and what they measured (``curve``: (value, recall, ms or None))."""

    factory: str
    estimated_bytes: int
    search_params: dict[str, float]
    recall_at_10: float
    query_ms: float
    curve: list[list[float | None]] = field(default_factory=list)
    stopped_by: str = "target"  # "target", "latency", "cap" or "exact"
    build_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {**asdict(self), "recall_at_10": round(self.recall_at_10, 4), "query_ms": round(self.query_ms, 3)}
        d["build_s"] = round(self.build_s, 2)
        d["curve"] = [[c[0], round(c[1] or 0.0, 4), None if c[2] is None else round(c[2], 3)] for c in self.curve]
        return d


def tune(
    vi: VectorIndex,
    queries: np.ndarray,
    truth_ids: np.ndarray,
    source_ids: np.ndarray,
    *,
    target: float = TARGET_RECALL,
    max_query_ms: float | None = None,
    k: int = 10,
) -> Tuned:
    """Raise ``vi``'s search knob until recall@k reaches ``target`` or a query takes over ``max_query_ms``; leave
    the chosen knobs set on ``vi`` and return them with their measures."""
    base = {key: v for key, v in default_search_params(vi.factory).items() if key == "k_factor"}
    knob = _knob(vi.factory)
    est = estimate_bytes(vi.factory, vi.ntotal, vi.dim)

    def measure(params: dict[str, float], timed: bool) -> tuple[float, float | None]:
        vi.search_params = {}
        vi.set_search_params(params)  # also drops a GPU copy, which holds the knobs it was made with
        _, found = vi.search(queries, k + 1)
        recall = recall_at_10(found, truth_ids, source_ids, k)
        return recall, (query_latency_ms(vi, queries, k) if timed else None)

    if knob is None:
        recall, ms = measure(base, True)
        return Tuned(vi.factory, est, base, recall, ms or 0.0, [[None, recall, ms]], "exact")
    name, ladder = knob
    curve: list[list[float | None]] = []
    best: tuple[dict[str, float], float, float | None] | None = None
    stopped = "cap"
    lo = None  # the largest value measured under the target (within the latency limit)
    for value in ladder:
        params = {**base, name: float(value)}
        recall, ms = measure(params, max_query_ms is not None)
        curve.append([float(value), recall, ms])
        if max_query_ms is not None and ms is not None and ms > max_query_ms:
            stopped = "latency"
            if best is None:  # even the smallest setting is too slow: keep it, the caller compares
                best = (params, recall, ms)
            break
        best = (params, recall, ms)
        if recall >= target:
            stopped = "target"
            break
        lo = value
    if stopped == "latency" and lo is not None and best is not None and best[0][name] == lo:
        # The doubling stepped past the limit: bisect for the largest value still within it.
        slow = int(curve[-1][0] or lo)
        while slow - lo > max(1, lo // 4):
            mid = (lo + slow) // 2
            params = {**base, name: float(mid)}
            recall, ms = measure(params, True)
            curve.append([float(mid), recall, ms])
            if ms is not None and max_query_ms is not None and ms <= max_query_ms:
                lo, best = mid, (params, recall, ms)
                if recall >= target:
                    break
            else:
                slow = mid
    if stopped == "target" and lo is not None and best is not None:
        # Doubling overshoots by up to 2x the work: bisect down to within a quarter of the last value that missed.
        hi = int(best[0][name])
        while hi - lo > max(1, lo // 4):
            mid = (lo + hi) // 2
            params = {**base, name: float(mid)}
            recall, ms = measure(params, max_query_ms is not None)
            curve.append([float(mid), recall, ms])
            if recall >= target and (max_query_ms is None or ms is None or ms <= max_query_ms):
                hi, best = mid, (params, recall, ms)
            else:
                lo = mid
    if stopped == "cap":  # the codes limit recall, not the knob: the smallest value within 0.005 of the most
        top = max(p[1] for p in curve if p[1] is not None)
        value = min(p[0] for p in curve if p[1] is not None and p[1] >= top - 0.005 and p[0] is not None)
        point = next(p for p in curve if p[0] == value)
        best = ({**base, name: float(value)}, float(point[1] or 0.0), point[2])
    assert best is not None  # the ladder is never empty
    params, recall, ms = best
    vi.search_params = {}
    vi.set_search_params(params)
    if ms is None:
        ms = query_latency_ms(vi, queries, k)
        for point in curve:
            if point[0] == params.get(name):
                point[2] = ms
    curve.sort(key=lambda p: p[0] or 0.0)
    return Tuned(vi.factory, est, params, recall, ms, curve, stopped)


# ---- the choice -------------------------------------------------------------------------------------------------
@dataclass
class BudgetChoice:
    """What :func:`choose_index` chose and measured; :meth:`to_dict` is ``manifest["budget"]``."""

    factory: str
    search_params: dict[str, float]
    recall_at_10: float
    queries: int
    query_ms: float
    estimated_bytes: int
    budget_bytes: int
    max_query_ms: float | None
    items: int
    dim: int
    target_recall: float = TARGET_RECALL
    fits: bool = True
    why: str | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recall_at_10"] = round(float(self.recall_at_10), 4)
        d["query_ms"] = round(float(self.query_ms), 3)
        d["seconds"] = round(float(self.seconds), 2)
        return d

    def describe(self) -> str:
        """``IVF1024,SQ8 nprobe=16 (chosen for 1.0 GiB: est 790 MiB, recall@10 0.96 on 1,000 held-out queries,
        2.1 ms/query)``."""
        return describe(self.to_dict())


def describe(budget: dict[str, Any]) -> str:
    """One line for a recorded ``manifest["budget"]`` (what ``cocatk info`` shows)."""
    knobs = " ".join(f"{k}={v:g}" for k, v in sorted(budget.get("search_params", {}).items()))
    limit = f", {budget['max_query_ms']:g} ms limit" if budget.get("max_query_ms") is not None else ""
    text = (
        f"{budget['factory']}{' ' + knobs if knobs else ''} (chosen for {format_size(budget['budget_bytes'])}"
        f"{limit}: est {format_size(budget['estimated_bytes'])}, recall@10 {budget['recall_at_10']:.2f} on "
        f"{budget['queries']:,} held-out queries, {_ms(budget['query_ms'])} ms/query, {budget['items']:,} vectors)"
    )
    return text + (f"; {budget['why']}" if budget.get("why") else "")


def _ms(ms: float) -> str:
    return f"{ms:.2f}" if ms < 1 else f"{ms:.1f}"


def choose_index(
    ids: np.ndarray,
    vectors: np.ndarray,
    budget_bytes: int,
    *,
    max_query_ms: float | None = None,
    target: float = TARGET_RECALL,
    n_queries: int = HELD_OUT_QUERIES,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[BudgetChoice, VectorIndex]:
    """Choose, build and tune the FAISS index of ``vectors`` (ids ``ids``) for a memory budget.

    Args:
        ids: int64 (n,) row ids. vectors: float32 (n, d), L2-normalised.
        budget_bytes: the memory the index may hold (:func:`estimate_bytes`, in RAM).
        max_query_ms: a latency limit per single query; None: recall decides alone.
        target: recall@10 at which tuning stops.
        progress: told one line per candidate built (they take minutes at a million vectors).

    Returns:
        (the choice, the built and tuned :class:`VectorIndex`).

    Example:
        >>> choice, vi = choose_index(ids, x, parse_size("64M"))     # doctest: +SKIP
        >>> choice.factory, choice.search_params, choice.recall_at_10  # doctest: +SKIP
        ('IVF128,SQ8', {'nprobe': 16.0}, 0.962)
    """
    t0 = time.perf_counter()
    n, d = vectors.shape
    k = min(10, max(n - 1, 1))
    queries, src = held_out_queries(vectors, n_queries, seed=seed)
    truth = ids[exact_neighbours(vectors, queries, k + 1)] if len(queries) else np.zeros((0, k), np.int64)
    source_ids = ids[src]
    fitting, why, fits = [], None, True
    for f in candidates(n, d, max_query_ms):
        est = estimate_bytes(f, n, d)
        if est <= budget_bytes:
            fitting.append(f)
    if n < MIN_COMPRESSED:
        fitting = ["Flat"]
        if estimate_bytes("Flat", n, d) > budget_bytes:
            fits = False
            why = (f"{n:,} vectors are too few to train a compressed index (at least {MIN_COMPRESSED:,}); the exact "
                   f"index ({format_size(estimate_bytes('Flat', n, d))}) is over the budget")  # fmt: skip
    elif not fitting:
        smallest = min(candidates(n, d, max_query_ms), key=lambda f: estimate_bytes(f, n, d))
        fitting, fits = [smallest], False
        why = (f"no index of {n:,} x {d} fits {format_size(budget_bytes)}; the smallest, {smallest} "
               f"({format_size(estimate_bytes(smallest, n, d))}), is used")  # fmt: skip

    def rank(t: Tuned) -> tuple[bool, float]:  # within the latency limit first, then recall (else speed)
        within = max_query_ms is None or t.query_ms <= max_query_ms
        return (within, t.recall_at_10 if within else -t.query_ms)

    tried: list[Tuned] = []
    best: Tuned | None = None
    vi: VectorIndex | None = None
    for f in fitting[:MAX_CANDIDATES]:
        if progress is not None:
            progress(f"building {f} for {n:,} vectors (est {format_size(estimate_bytes(f, n, d))})")
        tb = time.perf_counter()
        built = VectorIndex.build(d, f, ids, vectors, seed=seed)
        build_s = time.perf_counter() - tb
        t = tune(built, queries, truth, source_ids, target=target, max_query_ms=max_query_ms, k=k)
        t.build_s = build_s
        tried.append(t)
        if best is None or rank(t) > rank(best):
            best, vi = t, built  # only the best so far stays in memory
        del built
        if max_query_ms is None or t.query_ms <= max_query_ms:
            # Within the limit (or none): the next candidate is coarser, and measured no faster per probe
            # (1M x 768 at 10 ms: SQ8 0.918, SQ4 0.735, PQ192 0.573), so it is not built.
            break
    assert best is not None and vi is not None  # at least one candidate is always built
    if not rank(best)[0]:
        why = (why + "; " if why else "") + f"no setting answers within {max_query_ms:g} ms; the fastest is used"
    elif best.recall_at_10 < target and why is None:
        why = f"recall@10 {best.recall_at_10:.2f} is below the {target:g} target at this budget"
    vi.search_params = {}
    vi.set_search_params(best.search_params)
    choice = BudgetChoice(
        factory=best.factory,
        search_params={k_: float(v) for k_, v in best.search_params.items()},
        recall_at_10=float(best.recall_at_10),
        queries=len(queries),
        query_ms=float(best.query_ms),
        estimated_bytes=int(best.estimated_bytes),
        budget_bytes=int(budget_bytes),
        max_query_ms=None if max_query_ms is None else float(max_query_ms),
        items=int(n),
        dim=int(d),
        target_recall=float(target),
        fits=fits,
        why=why,
        tried=[t.to_dict() for t in tried],
        seconds=time.perf_counter() - t0,
    )
    return choice, vi


# ---- the recorded choice ----------------------------------------------------------------------------------------
def rechoose_reason(manifest: dict[str, Any], n: int, budget_bytes: int, max_query_ms: float | None) -> str | None:
    """Why the index recorded in ``manifest`` needs choosing again for ``n`` vectors, or None to keep it.

    Chosen again: none chosen yet; the factory was changed since; another budget or latency limit; the count has
    doubled or halved since the choice; the chosen factory no longer fits at ``n``; the last choice was over the
    budget and the count moved. Otherwise the factory and knobs stay and new vectors are added to it.
    """
    if n <= 0:
        return None
    b = manifest.get("budget")
    if not b:
        return "no index chosen yet"
    if b.get("factory") != manifest.get("factory"):
        return "the factory was changed since the choice"
    if int(b.get("budget_bytes", 0)) != int(budget_bytes) or b.get("max_query_ms") != max_query_ms:
        return "the budget changed"
    items = int(b.get("items", 0))
    if n > 2 * items:
        return f"the index grew from {items:,} to {n:,} vectors"
    if 2 * n < items:
        return f"the index shrank from {items:,} to {n:,} vectors"
    if b.get("fits", True) and estimate_bytes(b["factory"], n, int(b.get("dim", 0))) > budget_bytes:
        return f"{b['factory']} no longer fits at {n:,} vectors"
    if not b.get("fits", True) and n != items:
        return "the last choice was over the budget"
    return None


def plan_choice(
    manifest: dict[str, Any], n: int, max_index_memory: int | None, max_query_ms: float | None
) -> tuple[int, float | None, str | None] | None:
    """(budget bytes, latency limit, a notice for long work or None) when an update of an index of ``n`` vectors
    must choose its factory: with the budget given now, or the one recorded; None to keep what is there."""
    recorded = manifest.get("budget") or {}
    want = max_index_memory or recorded.get("budget_bytes")
    if not want:
        return None
    limit = max_query_ms if max_index_memory else recorded.get("max_query_ms")
    reason = rechoose_reason(manifest, n, int(want), limit)
    if reason is None:
        return None
    notice = (
        f"choosing the FAISS index of {n:,} vectors for {format_size(int(want))} ({reason}): building and "
        "measuring candidates"
        if n >= MIN_COMPRESSED
        else None
    )
    return int(want), limit, notice


def check_budget_options(
    max_index_memory: str | int | None, max_query_ms: float | None, faiss_factory: str | None
) -> int | None:
    """The budget in bytes (None: none given), or a UsageError for options that do not go together."""
    if max_index_memory is not None and faiss_factory:
        raise UsageError(
            "--faiss names the FAISS index and --max-index-memory chooses one: give one of them",
            hint="drop --faiss to let the budget choose, or drop --max-index-memory to use that factory",
        )
    if max_query_ms is not None and (max_index_memory is None or not max_query_ms > 0):
        raise UsageError(
            "--max-query-ms limits a choice by budget: it needs --max-index-memory and a positive number",
            hint="add --max-index-memory SIZE (e.g. 4G), and give the limit in milliseconds (e.g. 10)",
        )
    return None if max_index_memory is None else parse_size(max_index_memory)


def check_budget(n: int, d: int, budget_bytes: int) -> None:
    """Refuse a budget that no candidate index of ``n`` vectors fits (before any image is read).

    Raises:
        UsageError: with the smallest size that would do.
    """
    if n < MIN_COMPRESSED:
        return  # the exact index is kept whatever the budget (a few MB at most), and the record says why
    smallest = min(estimate_bytes(f, n, d) for f in candidates(n, d))
    if smallest > budget_bytes:
        raise UsageError(
            f"no FAISS index of {n:,} vectors of {d} dimensions fits in {format_size(budget_bytes)} (the smallest "
            f"needs {format_size(smallest)})",
            hint=f"raise --max-index-memory to at least {format_size(smallest * 1.05)}",
        )


def recorded_search_params(manifest: dict[str, Any]) -> dict[str, float]:
    """The knobs chosen by budget for the manifest's factory, less those ``$COCATK_FAISS_PARAMS`` sets (the
    environment wins, as it does over :func:`~cocatk.retrieval.vectors.default_search_params`)."""
    b = manifest.get("budget") or {}
    if b.get("factory") != manifest.get("factory"):
        return {}
    env = parse_search_params(os.environ.get(PARAMS_ENV, ""))
    return {k: float(v) for k, v in (b.get("search_params") or {}).items() if k not in env}


def apply_recorded_params(vi: VectorIndex, manifest: dict[str, Any]) -> VectorIndex:
    """Set the knobs recorded by a budget choice on ``vi`` (loaded or rebuilt for the manifest); return it."""
    params = recorded_search_params(manifest)
    if params:
        vi.set_search_params(params)
    return vi


__all__ = [
    "HELD_OUT_QUERIES", "MIN_COMPRESSED", "QUERY_COSINE", "TARGET_RECALL", "BudgetChoice", "apply_recorded_params",
    "candidates", "check_budget", "check_budget_options", "choose_index", "describe", "estimate_bytes",
    "exact_neighbours", "format_size", "held_out_queries", "nlist_for", "parse_size", "plan_choice", "recall_at_10",
    "rechoose_reason", "recorded_search_params", "tune",
]  # fmt: skip
