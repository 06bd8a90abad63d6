"""The reader of every kind of item: a file, a tar shard's member, a table's row; picked by the source's suffix.

Callers (the updater's shard plan, the encoders, the server, the rerank) use these functions and never look at
the kind themselves.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Sequence

from .base import MemberRef, ShardScan
from .tables import TABLE_SUFFIXES, Columns, hf_files, is_table, read_row, scan_table
from .webdataset import TAR_SUFFIXES, read_member, scan_shard

#: File suffixes read as dataset sources (their items are indexed, not the file).
SHARD_SUFFIXES = TAR_SUFFIXES + TABLE_SUFFIXES
_GLOB = re.compile(r"[*?\[]")


def is_shard(path: str | os.PathLike[str]) -> bool:
    """True for a path that names a dataset source (a WebDataset tar, a Parquet or Arrow file) by its suffix."""
    return os.fspath(path).lower().endswith(SHARD_SUFFIXES)


def scan_source(path: str, image_fields: Sequence[str], columns: Columns | None = None) -> ShardScan:
    """The items of the source at ``path``: a tar's samples (:func:`.webdataset.scan_shard`, images by
    ``image_fields``) or a table's rows (:func:`.tables.scan_table`, by ``columns``).

    Raises:
        OSError: it cannot be opened. UsageError, DatasetError: a table's named columns are wrong.
    """
    if is_table(path):
        return scan_table(path, columns or Columns())
    return scan_shard(path, image_fields)


def read_source(path: str, offset: int = -1, size: int = -1, field: str = "") -> bytes:
    """The bytes an encode job names: a whole file (``offset`` -1), ``size`` bytes at ``offset`` of a tar shard,
    or row ``offset`` of a table's column ``field``.

    Raises:
        OSError: they cannot be read.
    """
    if offset >= 0:
        return read_row(path, offset, field) if is_table(path) else read_member(path, offset, size)
    with open(path, "rb") as f:
        return f.read()


def source_exists(source: str | MemberRef) -> bool:
    """True when the file, or the source holding the item, is there."""
    return os.path.exists(source.shard if isinstance(source, MemberRef) else source)


def source_name(source: str | MemberRef) -> str:
    """The stored identity: the file's path, or ``shard#key``."""
    return source.identity if isinstance(source, MemberRef) else source


def source_bytes(source: str | MemberRef) -> bytes:
    """The image's bytes, from its file or its source.

    Raises:
        OSError: they cannot be read.
    """
    if isinstance(source, MemberRef):
        return read_source(source.shard, source.offset, source.size, source.field)
    return read_source(source)


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The shard lists people type, expanded: brace ranges as webdataset writes them (``shards/{00000..00127}.tar``,
    with the braceexpand package that webdataset uses) and globs (``data/*.tar``), when the text is not an existing
    path itself; ``hf:PATH`` and ``hf:NAME`` become their Arrow files (:func:`.tables.hf_files`). A pattern that
    matches nothing is kept as it is, so the caller reports it as missing."""
    out: list[str] = []
    for p in paths:
        text = os.fspath(p)
        if text.startswith("hf:"):
            out += hf_files(text) or [text]
            continue
        if os.path.exists(text) or not ("{" in text or _GLOB.search(text)):
            out.append(text)
            continue
        patterns = [text]
        if "{" in text:
            from braceexpand import braceexpand

            patterns = list(braceexpand(text))
        found: list[str] = []
        for pattern in patterns:
            if _GLOB.search(pattern):
                found += sorted(glob.glob(os.path.expanduser(pattern)))
            elif os.path.exists(os.path.expanduser(pattern)):
                found.append(pattern)
        out += found if found else [text]
    return out


__all__ = [
    "SHARD_SUFFIXES",
    "expand_paths",
    "is_shard",
    "read_source",
    "scan_source",
    "source_bytes",
    "source_exists",
    "source_name",
]
