"""Image indexes: discovery and safe decoding feed an incremental indexer that keeps a SQLite store (the source of
truth) and a FAISS index (ids == SQLite row ids) in step. The index layer is :mod:`cocatk.retrieval.folder`;
:class:`~cocatk.retrieval.index.Index` composes it with the features."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "Index": ".index",
    "IndexFolder": ".folder",
    "IndexReport": ".index",
    "CheckReport": ".index",
    "Store": ".store",
    "VectorIndex": ".vectors",
}

__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

__all__ = list(_LAZY)
