"""Collections that are not folders of files: the items of datasets, read where they lie.

:mod:`.webdataset` reads WebDataset tar shards (img2dataset's output: ``00000.tar`` holding ``key.jpg``,
``key.txt``, ``key.json``); :mod:`.tables` reads image tables (Parquet files, and the Arrow files of Hugging Face
datasets, ``hf:PATH`` / ``hf:NAME``). An item's identity is ``/abs/shard.tar#key`` or ``/abs/file.parquet#ROW``;
the index stores it in the same table as file paths, with where the item lies, so that it can be read again
without scanning its source. :mod:`.items` picks the reader by the source's suffix.
"""

from __future__ import annotations

from .base import Member, MemberRef, ShardScan, item_identity
from .items import (
    SHARD_SUFFIXES,
    expand_paths,
    is_shard,
    read_source,
    scan_source,
    source_bytes,
    source_exists,
    source_name,
)
from .tables import Columns, offline, scan_table
from .webdataset import read_member, scan_shard

__all__ = [
    "SHARD_SUFFIXES",
    "Columns",
    "Member",
    "MemberRef",
    "ShardScan",
    "expand_paths",
    "is_shard",
    "item_identity",
    "offline",
    "read_member",
    "read_source",
    "scan_shard",
    "scan_source",
    "scan_table",
    "source_bytes",
    "source_exists",
    "source_name",
]
