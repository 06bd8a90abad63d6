"""The FAISS side of an index: an ``IndexIDMap2`` whose ids are the SQLite row ids.

The default is exact inner product (``IDMap2,Flat`` with ``METRIC_INNER_PRODUCT``; embeddings are L2-normalised, so
scores are cosine similarities). Any FAISS factory string can replace ``Flat`` (``IVF4096,PQ64``, ``HNSW32``); it is
trained on a sample of the stored vectors. The file on disk is always a CPU index; when FAISS sees a GPU, searches
run on a GPU copy (falling back to the CPU when the index type or the id selector is not supported there) and IVF
k-means trains on the GPU.

Large collections (:data:`LARGE_FACTORIES`): an inverted file of compressed codes with a refine stage,
``IVF{nlist},PQ{m}x4fs,RFlat`` (or ``Refine(SQfp16)``/``Refine(SQ8)`` to hold less memory): the PQ codes find
``k * k_factor`` candidates fast, the refine stage re-scores them exactly. Search-time knobs (``nprobe``,
``k_factor``, ``efSearch``) have defaults from :func:`default_search_params` and can be set per index
(:meth:`VectorIndex.set_search_params`) or for every index with ``COCATK_FAISS_PARAMS="nprobe=64,k_factor=64"``.

faiss is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmptyIndexError, IndexCorruptError, MissingDependencyError, UsageError

DEFAULT_FACTORY = "Flat"
#: At most this many vectors train a quantizer (FAISS itself subsamples IVF training to 256 points per list).
MAX_TRAIN = 200_000
#: Search-time knobs for every index, e.g. ``nprobe=64,k_factor=16`` (see :func:`default_search_params`).
PARAMS_ENV = "COCATK_FAISS_PARAMS"
#: ``--faiss`` values for large collections of 768-d embeddings (benchmarks/bench_large_index.py, RESULTS.md
#: "Scaling plan"): bytes per vector in RAM and the measured or expected recall@10 on text-like queries.
LARGE_FACTORIES = {
    "1M": "IVF1024,PQ96x4fs,RFlat",  # 3.3 kB/vector: codes for speed, exact re-scoring
    "10M": "IVF16384,PQ96x4fs,Refine(SQfp16)",  # ~1.7 kB/vector: 17 GB of RAM
    "100M": "IVF65536,PQ96x4fs,Refine(SQ8)",  # ~0.96 kB/vector: 96 GB of RAM (or shard it)
}


def _faiss() -> Any:
    """The faiss module; MissingDependencyError when no FAISS build is installed (faiss is an extra of cocatk)."""
    try:
        import faiss
    except ImportError as e:
        raise MissingDependencyError(
            f"FAISS is not installed ({e})",
            hint="pip install 'cocatk[cpu]' (CPU) or 'cocatk[cuda12]' (NVIDIA GPU, CUDA 12)",
        ) from e
    return faiss


def min_training_points(factory: str) -> int:
    """Fewest vectors a factory can be trained on (IVF lists, 2**nbits PQ/SQ codes); 0 when no training is needed."""
    need = 0
    for m in re.finditer(r"IVF(\d+)", factory):
        need = max(need, int(m.group(1)))
    for m in re.finditer(r"PQ\d+(?:x(\d+))?", factory):
        need = max(need, 2 ** int(m.group(1) or 8))
    return need


def default_search_params(factory: str) -> dict[str, float]:
    """Search-time knobs for a factory: ``nprobe`` (IVF lists visited: about 1/8 of the lists, 16 to 256),
    ``k_factor`` (refine stage: ``k * k_factor`` candidates re-scored) and ``efSearch`` (HNSW), overridden by
    ``$COCATK_FAISS_PARAMS``. Chosen with benchmarks/bench_large_index.py for recall@10 >= 0.95 on text-like queries
    at 1M vectors: ``IVF1024,PQ96x4fs,RFlat`` with nprobe 128 and k_factor 128 reaches 0.963 at 2.9 ms a query
    (exact search: 328 ms), ``Refine(SQ8)`` 0.950; the previous 1/16 and 32 gave 0.84 there."""
    params: dict[str, float] = {}
    m = re.search(r"IVF(\d+)", factory)
    if m:
        params["nprobe"] = float(min(256, max(16, int(m.group(1)) // 8)))
    if "Refine" in factory or "RFlat" in factory:
        # Re-scoring k x 128 candidates exactly is ~1M multiply-adds for k = 10 (768-d): cheap next to the scan;
        # the PQ codes alone rank too coarsely for a smaller pool at 1M (recall 0.84 with 32, 0.93 with 64).
        params["k_factor"] = 128.0
    if "HNSW" in factory:
        params["efSearch"] = 128.0
    params.update(parse_search_params(os.environ.get(PARAMS_ENV, "")))
    return params


def parse_search_params(text: str) -> dict[str, float]:
    """``"nprobe=64,k_factor=16"`` -> ``{"nprobe": 64.0, "k_factor": 16.0}``; UsageError on anything else."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            if key.strip() not in ("nprobe", "k_factor", "efSearch"):
                raise ValueError(key)
            out[key.strip()] = float(value)
        except ValueError:
            raise UsageError(
                f"bad FAISS search parameter {part!r}",
                hint="use nprobe=N, k_factor=N and efSearch=N, comma-separated (e.g. nprobe=64,k_factor=16)",
            ) from None
    return out


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise UsageError(
            f"expected queries of shape (Q, {dim}), got {tuple(np.shape(queries))}",
            hint="encode the queries with the model that built the index",
        )
    return np.ascontiguousarray(q, dtype=np.float32)


class VectorIndex:
    """A FAISS ``IndexIDMap2`` plus its factory string.

    Attributes:
        index: the CPU ``faiss.IndexIDMap2`` (the object that is saved).
        factory: the factory of the wrapped index (``"Flat"`` by default).
    """

    def __init__(self, index: Any, factory: str) -> None:
        self.index = index
        self.factory = factory
        self._gpu: Any = None
        self._gpu_failed = False
        self._lock = threading.Lock()
        self._owner: Any = None
        self._id_array: np.ndarray | None = None  # the id map as numpy (external id of each internal position)
        self.search_params = default_search_params(factory)

    def set_search_params(self, params: str | dict[str, float]) -> None:
        """Change search-time knobs, e.g. ``"nprobe=128,k_factor=32"`` (more recall, more latency)."""
        new = parse_search_params(params) if isinstance(params, str) else {k: float(v) for k, v in params.items()}
        with self._lock:
            self.search_params = {**self.search_params, **new}
            self._gpu = None

    # ---- construction ------------------------------------------------------------------------------------------
    @staticmethod
    def _make(dim: int, factory: str) -> Any:
        faiss = _faiss()

        try:
            return faiss.index_factory(int(dim), f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        except Exception as e:
            raise UsageError(
                f"FAISS cannot build index factory '{factory}': {str(e).splitlines()[0][:160]}",
                hint="use a FAISS factory string such as Flat, HNSW32, IVF1024,Flat or IVF4096,PQ64",
            ) from e

    @classmethod
    def validate_factory(cls, dim: int, factory: str) -> None:
        """Raise UsageError when ``factory`` is not a valid FAISS factory for ``dim``."""
        cls._make(dim, factory)

    @classmethod
    def create(cls, dim: int, factory: str = DEFAULT_FACTORY) -> VectorIndex:
        """An empty index (untrained when the factory needs training)."""
        return cls(cls._make(dim, factory), factory)

    @classmethod
    def build(cls, dim: int, factory: str, ids: np.ndarray, vectors: np.ndarray, seed: int = 0) -> VectorIndex:
        """Build from stored vectors: train on a seeded sample when needed, then add everything.

        Raises:
            UsageError: the factory needs more training vectors than there are.
        """
        vi = cls.create(dim, factory)
        if not vi.is_trained:
            need = min_training_points(factory)
            if len(vectors) < max(need, 1):
                raise UsageError(
                    f"FAISS factory '{factory}' needs at least {max(need, 1)} vectors to train, the index has "
                    f"{len(vectors)}",
                    hint="use the default exact index (drop --faiss) or a smaller factory (e.g. HNSW32, "
                    "IVF64,Flat) until the collection grows",
                )
            sample = vectors
            if len(vectors) > MAX_TRAIN:
                pick = np.random.default_rng(seed).choice(len(vectors), MAX_TRAIN, replace=False)
                sample = vectors[np.sort(pick)]
            vi._train(np.ascontiguousarray(sample, dtype=np.float32))
        if len(ids):
            vi.add(vectors, ids)
        return vi

    def _train(self, sample: np.ndarray) -> None:
        faiss = _faiss()

        ivf = _ivf_of(faiss, self.index.index)
        if ivf is not None and faiss.get_num_gpus() > 0:
            # k-means on the GPU (the documented clustering_index trick, also under a refine or a pre-transform);
            # the trained index stays on the CPU. Inner product: the coarse quantizer of an IP index is IP too.
            with contextlib.suppress(Exception):  # pragma: no cover - GPU-specific
                flat = (
                    faiss.IndexFlatIP(ivf.d)
                    if ivf.metric_type == faiss.METRIC_INNER_PRODUCT
                    else faiss.IndexFlatL2(ivf.d)
                )
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
        self.index.train(sample)

    @classmethod
    def load(cls, path: Path, factory: str) -> VectorIndex:
        faiss = _faiss()

        try:
            index = faiss.read_index(str(path))
        except Exception as e:
            raise IndexCorruptError(
                f"cannot read {path}: {e}", hint="delete the file; it is rebuilt from SQLite"
            ) from e
        vi = cls(faiss.downcast_index(index), factory)
        # downcast_index returns a second, non-owning wrapper: keep the owning one alive, or FAISS frees the index
        # when this function returns (seen as a garbage dimension on a reloaded refine index).
        vi._owner = index
        return vi

    def save(self, path: Path) -> None:
        """Write atomically: temp file, fsync, ``os.replace``, fsync of the folder."""
        faiss = _faiss()

        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self.index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def ids(self) -> np.ndarray:
        """The ids held, in insertion order (int64)."""
        faiss = _faiss()

        return faiss.vector_to_array(self.index.id_map).astype(np.int64, copy=False)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (exact for Flat, decoded approximations for PQ/SQ)."""
        return np.stack([self.index.reconstruct(int(i)) for i in ids]) if len(ids) else np.zeros((0, self.dim))

    # ---- changes -----------------------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        with self._lock:
            self.index.add_with_ids(vecs, np.ascontiguousarray(ids, dtype=np.int64))
            self._gpu = None
            self._id_array = None

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; False when the index type cannot remove correctly (HNSW, IVF, refine): the caller rebuilds
        it from the stored vectors.

        IVF is refused on purpose: ``IndexIDMap2.remove_ids`` compacts its id map, assuming the wrapped index
        renumbers the vectors that remain (as Flat does); an IVF keeps their old labels, so every later search
        would return the ids of other files (measured: ids shifted by the number removed).
        """
        faiss = _faiss()

        if len(ids) == 0:
            return True
        if _ivf_of(faiss, self.index.index) is not None or _refine_of(faiss, self.index.index) is not None:
            return False
        with self._lock:
            self._gpu = None
            self._id_array = None
            try:
                self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
            except RuntimeError:
                return False
        return True

    # ---- search ------------------------------------------------------------------------------------------------
    def _searcher(self) -> Any:
        faiss = _faiss()

        if self._gpu_failed or faiss.get_num_gpus() == 0:
            return self.index
        if self._gpu is None:  # pragma: no cover - GPU-specific (no GPU where the tests run)
            try:
                gpu = faiss.index_cpu_to_all_gpus(self.index)
                if "nprobe" in self.search_params:
                    faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", self.search_params["nprobe"])
                self._gpu = gpu
            except Exception:  # index type without a GPU implementation (HNSW, refine, IDMap2 on some builds)
                self._gpu_failed = True
                return self.index
        return self._gpu

    def _ids_of_positions(self) -> np.ndarray:
        if self._id_array is None:
            self._id_array = self.ids().copy()
        return self._id_array

    def _params(self, faiss: Any, index: Any, sel: Any, keep: list[Any]) -> Any:
        """SearchParameters for ``index`` (the index inside the IDMap2) carrying the knobs and the selector of
        internal positions; nested parameter objects are kept alive in ``keep`` (FAISS holds raw pointers)."""
        index = faiss.downcast_index(index)
        p = self.search_params
        if isinstance(index, faiss.IndexRefine):
            out = faiss.IndexRefineSearchParameters()
            out.k_factor = float(p.get("k_factor", 1.0))
            out.base_index_params = self._params(faiss, index.base_index, sel, keep)
        elif isinstance(index, faiss.IndexPreTransform):
            out = faiss.SearchParametersPreTransform()
            out.index_params = self._params(faiss, index.index, sel, keep)
        elif isinstance(index, faiss.IndexIVF):
            out = faiss.SearchParametersIVF()
            out.nprobe = int(p.get("nprobe", index.nprobe))
        elif isinstance(index, faiss.IndexHNSW):
            out = faiss.SearchParametersHNSW()
            out.efSearch = int(p.get("efSearch", index.hnsw.efSearch))
        else:
            out = faiss.SearchParameters()
        if sel is not None and not isinstance(out, faiss.IndexRefineSearchParameters):
            out.sel = sel  # the refine stage only re-scores what its base index found
        keep.append(out)
        return out

    def _search_inner(self, q: np.ndarray, k: int, id_selector: Any) -> tuple[np.ndarray, np.ndarray]:
        """Search the wrapped index with our knobs and an id selector translated to internal positions, then map
        positions back to ids (IndexIDMap2 translates the selector only at its own level, not into a refine's base
        index, and does not pass the knobs)."""
        faiss = _faiss()

        keep: list[Any] = []
        sel = None
        if id_selector is not None:
            if isinstance(id_selector, faiss.IDSelector):
                sel = faiss.IDSelectorTranslated(self.index.id_map, id_selector)
                keep.append(id_selector)
            else:
                allowed = np.asarray(id_selector, dtype=np.int64)
                positions = np.flatnonzero(np.isin(self._ids_of_positions(), allowed)).astype(np.int64)
                sel = faiss.IDSelectorBatch(positions)
            keep.append(sel)
        params = self._params(faiss, self.index.index, sel, keep)
        scores, pos = self.index.index.search(q, int(k), params=params)
        ids = np.where(pos >= 0, self._ids_of_positions()[np.maximum(pos, 0)], -1)
        return scores, ids

    def search(self, queries: np.ndarray, k: int, id_selector: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product.

        Args:
            queries: (Q, D) float32 (a single (D,) vector is accepted), L2-normalised.
            k: hits per query; rows are padded with score -inf / id -1 when fewer vectors match.
            id_selector: restrict to some ids: a ``faiss.IDSelector`` or an array of allowed ids. Searches with a
                selector run on the CPU.

        Returns:
            (scores float32 (Q, k), ids int64 (Q, k)), best first.

        Raises:
            EmptyIndexError: no vectors. UsageError: bad shapes or k < 1.
        """
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}", hint="ask for at least one result")
        q = _as_queries(queries, self.dim)
        if self.ntotal == 0:
            raise EmptyIndexError("the index holds no images", hint="run `cocatk index PATH` first")
        with self._lock:
            searcher = self._searcher() if id_selector is None else self.index
            if searcher is not self.index:  # pragma: no cover - GPU-specific
                scores, ids = searcher.search(q, int(k))
            elif id_selector is None and not self.search_params:
                scores, ids = self.index.search(q, int(k))  # Flat: nothing to set
            else:
                scores, ids = self._search_inner(q, int(k), id_selector)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64, copy=False)


def _ivf_of(faiss: Any, index: Any) -> Any:
    """The IndexIVF inside ``index`` (through IDMap, refine and pre-transform wrappers), or None."""
    index = faiss.downcast_index(index)
    for _ in range(4):
        if isinstance(index, faiss.IndexIVF):
            return index
        inner = getattr(index, "base_index", None) or getattr(index, "index", None)
        if inner is None:
            return None
        index = faiss.downcast_index(inner)
    return None


def _refine_of(faiss: Any, index: Any) -> Any:
    index = faiss.downcast_index(index)
    inner = faiss.downcast_index(getattr(index, "index", index))
    return inner if isinstance(inner, faiss.IndexRefine) else None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


__all__ = [
    "DEFAULT_FACTORY",
    "LARGE_FACTORIES",
    "PARAMS_ENV",
    "VectorIndex",
    "default_search_params",
    "min_training_points",
    "parse_search_params",
]
