"""What an index folder and its roots look like: file names, defaults, the progress callback, root paths.

Shared by :mod:`~cocatk.retrieval.index` (the folder) and :mod:`~cocatk.retrieval.updater` (the update), which both
import this module and not each other's internals at run time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UsageError

#: Files per checkpoint: a killed run loses at most this much work.
DEFAULT_CHECKPOINT_EVERY = 256
#: ``--cache-tokens`` is refused when the cache would exceed this (bytes = images x T x D x 2).
DEFAULT_TOKEN_CACHE_LIMIT_GB = 8.0
#: flock'ed by the single writer.
LOCK_NAME = "index.lock"
#: A readable copy of the manifest (SQLite holds the authoritative one).
MANIFEST_NAME = "manifest.json"

#: progress(stage, done, total): stage is "model" (loading), "scan" (total None until the scan ends) or "index"
#: (files processed of the files to look at).
ProgressCallback = Callable[[str, int, "int | None"], None]


def vector_file_name(generation: int) -> str:
    """The FAISS file holding exactly the vectors of checkpoint ``generation``."""
    return f"vectors.{generation}.faiss"


def is_under(path: str, roots: Sequence[str]) -> bool:
    """True when ``path`` is one of ``roots`` or lies below one (paths absolute and resolved)."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def resolve_roots(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Absolute, resolved, de-duplicated roots for ``cocatk index PATH...``.

    Raises:
        UsageError: a path does not exist (checked before anything is created or changed).
    """
    from ..sources import expand_paths

    roots = []
    for p in expand_paths(paths):  # shards/{00000..00127}.tar and data/*.tar, as webdataset names shards
        path = Path(p).expanduser()
        if not path.exists():
            raise UsageError(f"{p} does not exist", hint="pass existing image files or folders")
        roots.append(str(path.resolve()))
    return sorted(set(roots))


def json_failure(failure: dict[str, str]) -> dict[str, str]:
    """A failure for JSON: ``path`` (+ ``path_b64`` for a name that is not UTF-8), ``reason``, ``detail``."""
    from ..paths import json_path

    return {**json_path(failure["path"]), "reason": failure["reason"], "detail": failure["detail"]}


__all__ = [
    "DEFAULT_CHECKPOINT_EVERY",
    "DEFAULT_TOKEN_CACHE_LIMIT_GB",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "ProgressCallback",
    "is_under",
    "json_failure",
    "resolve_roots",
    "vector_file_name",
]
