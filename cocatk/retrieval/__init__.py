"""Image indexes: discovery and safe decoding feed an incremental indexer that keeps a SQLite store (the source of
truth) and a FAISS index (ids == SQLite row ids) in step. See :mod:`cocatk.retrieval.index`."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Index": "index",
    "IndexReport": "index",
    "CheckReport": "index",
    "Store": "store",
    "VectorIndex": "vectors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cocatk.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = list(_LAZY)
