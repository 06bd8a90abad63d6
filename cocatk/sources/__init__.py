"""Collections that are not folders of files: the items of datasets, read where they lie.

:mod:`.webdataset` reads WebDataset tar shards (img2dataset's output: ``00000.tar`` holding ``key.jpg``,
``key.txt``, ``key.json``). An item's identity is ``/abs/shard.tar#key``; the index stores it in the same table as
file paths, and the member's byte range, so that it can be read again without scanning the shard.
"""

from __future__ import annotations

from .webdataset import (
    SHARD_SUFFIXES,
    Member,
    MemberRef,
    ShardScan,
    expand_paths,
    is_shard,
    item_identity,
    read_member,
    read_source,
    scan_shard,
    source_bytes,
    source_exists,
    source_name,
)

__all__ = [
    "SHARD_SUFFIXES",
    "Member",
    "MemberRef",
    "ShardScan",
    "expand_paths",
    "is_shard",
    "item_identity",
    "read_member",
    "read_source",
    "scan_shard",
    "source_bytes",
    "source_exists",
    "source_name",
]
