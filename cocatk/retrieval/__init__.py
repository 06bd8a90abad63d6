"""Image indexes: discovery and safe decoding feed an incremental indexer that keeps a SQLite store (the source of
truth) and a FAISS index (ids == SQLite row ids) in step. See :mod:`cocatk.retrieval.index`."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "Index": ".index",
    "IndexReport": ".index",
    "CheckReport": ".index",
    "Store": ".store",
    "VectorIndex": ".vectors",
}

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

__all__ = list(_LAZY)
