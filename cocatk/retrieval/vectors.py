"""The FAISS side of an index: an ``IndexIDMap2`` whose ids are the SQLite row ids.

The default is exact inner product (``IDMap2,Flat`` with ``METRIC_INNER_PRODUCT``; embeddings are L2-normalised, so
scores are cosine similarities). Any FAISS factory string can replace ``Flat`` (``IVF4096,PQ64``, ``HNSW32``); it is
trained on a sample of the stored vectors. The file on disk is always a CPU index; when FAISS sees a GPU, searches
run on a GPU copy (falling back to the CPU when the index type or the id selector is not supported there).

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

        inner = faiss.downcast_index(self.index.index)
        if faiss.get_num_gpus() > 0 and isinstance(inner, faiss.IndexIVF):
            # k-means on the GPU (the documented clustering_index trick); the trained index stays on the CPU.
            with contextlib.suppress(Exception):  # pragma: no cover - GPU-specific
                inner.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(self.dim))
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
        return cls(faiss.downcast_index(index), factory)

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

    def remove(self, ids: np.ndarray) -> bool:
        """Remove ids; False when the index type cannot remove (HNSW): the caller rebuilds it."""
        faiss = _faiss()

        if len(ids) == 0:
            return True
        with self._lock:
            self._gpu = None
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
        if self._gpu is None:
            try:
                self._gpu = faiss.index_cpu_to_all_gpus(self.index)
            except Exception:  # index type without a GPU implementation (HNSW, IDMap2 on some builds)
                self._gpu_failed = True
                return self.index
        return self._gpu

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
        faiss = _faiss()

        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}", hint="ask for at least one result")
        q = _as_queries(queries, self.dim)
        if self.ntotal == 0:
            raise EmptyIndexError("the index holds no images", hint="run `cocatk index PATH` first")
        if id_selector is None:
            with self._lock:
                searcher = self._searcher()
            scores, ids = searcher.search(q, int(k))
        else:
            sel = id_selector
            if not isinstance(sel, faiss.IDSelector):
                sel = faiss.IDSelectorBatch(np.ascontiguousarray(np.asarray(sel), dtype=np.int64))
            inner = faiss.downcast_index(self.index.index)
            params = faiss.SearchParametersIVF(sel=sel) if isinstance(inner, faiss.IndexIVF) else None
            if params is None:
                params = (
                    faiss.SearchParametersHNSW(sel=sel)
                    if isinstance(inner, faiss.IndexHNSW)
                    else faiss.SearchParameters(sel=sel)
                )
            scores, ids = self.index.search(q, int(k), params=params)
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        return scores, ids.astype(np.int64, copy=False)


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


__all__ = ["DEFAULT_FACTORY", "VectorIndex", "min_training_points"]
