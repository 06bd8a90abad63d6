"""What every kind of dataset source yields: its items (:class:`Member`), one scan's outcome (:class:`ShardScan`),
and where an indexed item lies (:class:`MemberRef`). No reading here: :mod:`.webdataset` and :mod:`.tables` read,
and :mod:`.items` picks the reader by the source's suffix."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Member:
    """One item of a source, by its image: the key (a tar sample's key, a table's row number), the image's field
    (a tar member's extension, a table's column), where it lies (a tar member's byte offset, a table's row), its
    size in bytes, and its text (``txt`` field, caption column) and metadata (``json`` field, the table's other
    columns) when it has them."""

    key: str
    field: str
    offset: int
    size: int
    text: str | None = None
    meta: dict[str, Any] | None = None


@dataclass
class ShardScan:
    """What a scan found: the items with an image, the ones it skipped and why, and ``error`` (where reading
    stopped) for a truncated or unreadable source."""

    path: str
    size: int
    mtime_ns: int
    members: list[Member] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    error: str | None = None
    kind: str = "webdataset"


@dataclass(frozen=True)
class MemberRef:
    """Where an indexed item's image lies: in source ``shard``, item ``key``, at ``offset`` (a tar's byte offset,
    a table's row) with ``size`` bytes, in ``field`` (a table's image column; a tar's member extension)."""

    shard: str
    key: str
    offset: int
    size: int
    field: str = ""

    @property
    def identity(self) -> str:
        return item_identity(self.shard, self.key)


def item_identity(shard: str, key: str) -> str:
    """The stored identity of item ``key`` of ``shard`` (an absolute, resolved path): ``shard#key``."""
    return f"{shard}#{key}"


__all__ = ["Member", "MemberRef", "ShardScan", "item_identity"]
