"""The SQL of dataset items (schema 4, :mod:`.migrations`): shards recorded done, and where each item's bytes lie.

Index layer: the features (:mod:`.shards`, the updater, the server through :class:`~.folder.IndexFolder`) call these
functions with the index's :class:`~.store.Store` and never write SQL. Writers call them inside the updater's open
transaction, so a member row commits with its file row (``members.id`` cascades from ``files``). A sample's caption
(its ``txt`` field) is not here: it is a caption row with the settings key :data:`DATASET_CAPTIONS`, so ``--match``,
the page and ``/knn-service`` find it as they find generated captions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..paths import from_bytes, to_bytes
from ..sources import MemberRef

if TYPE_CHECKING:  # pragma: no cover
    from ..sources import Member
    from .store import Store

_CHUNK = 900
#: The caption settings key of the captions that came with a dataset (a sample's ``txt`` field).
DATASET_CAPTIONS = "dataset"
#: Its settings, as ``caption_configs`` records them.
DATASET_CAPTION_SETTINGS = {"source": "the dataset's own caption (a sample's txt field)"}


def done_sources(store: Store) -> dict[str, tuple[int, int, int]]:
    """path -> (size, mtime_ns, items) of every source recorded complete."""
    rows = store.conn.execute("SELECT path, size, mtime_ns, items FROM sources").fetchall()
    return {from_bytes(p): (int(s), int(m), int(n)) for p, s, m, n in rows}


def mark_done(store: Store, path: str, kind: str, size: int, mtime_ns: int, items: int) -> None:
    store.conn.execute(
        "INSERT OR REPLACE INTO sources (path, kind, size, mtime_ns, items, done_at) VALUES (?, ?, ?, ?, ?, ?)",
        (to_bytes(path), kind, size, mtime_ns, items, time.time()),
    )


def forget_done(store: Store, paths: Sequence[str]) -> None:
    store.conn.executemany("DELETE FROM sources WHERE path = ?", [(to_bytes(p),) for p in paths])


def put_member(store: Store, file_id: int, source: str, member: Member) -> None:
    """Record (or move) row ``file_id`` as ``member`` of shard ``source``."""
    meta = json.dumps(member.meta, ensure_ascii=False, sort_keys=True) if member.meta is not None else None
    store.conn.execute(
        "INSERT OR REPLACE INTO members (id, source, key, field, offset, size, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (file_id, to_bytes(source), member.key, member.field, member.offset, member.size, meta),
    )


def member_sources(store: Store) -> dict[str, str]:
    """The stored path (identity) of every dataset item -> the shard that holds it."""
    rows = store.conn.execute("SELECT f.path, m.source FROM members m JOIN files f ON f.id = m.id").fetchall()
    return {from_bytes(p): from_bytes(src) for p, src in rows}


def member_ids(store: Store, sources: Sequence[str]) -> set[int]:
    """The row ids of the items of these shards."""
    out: set[int] = set()
    for i in range(0, len(sources), _CHUNK):
        part = [to_bytes(s) for s in sources[i : i + _CHUNK]]
        q = ",".join("?" * len(part))
        out |= {int(r[0]) for r in store.conn.execute(f"SELECT id FROM members WHERE source IN ({q})", part)}
    return out


def locations(store: Store, ids: Sequence[int]) -> dict[int, MemberRef]:
    """id -> location of the ids that are dataset items (files are absent)."""
    out: dict[int, MemberRef] = {}
    ids = [int(i) for i in ids]
    for i in range(0, len(ids), _CHUNK):
        part = ids[i : i + _CHUNK]
        q = ",".join("?" * len(part))
        for fid, src, key, off, size, fld in store.conn.execute(
            f"SELECT id, source, key, offset, size, field FROM members WHERE id IN ({q})", part
        ):
            out[int(fid)] = MemberRef(from_bytes(src), key, int(off), int(size), fld or "")
    return out


def item_meta(store: Store, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """id -> the sample's JSON field (``key.json``: url, width, height, ...) of the items that have one."""
    out: dict[int, dict[str, Any]] = {}
    ids = [int(i) for i in ids]
    for i in range(0, len(ids), _CHUNK):
        part = ids[i : i + _CHUNK]
        q = ",".join("?" * len(part))
        for fid, meta in store.conn.execute(f"SELECT id, meta FROM members WHERE id IN ({q}) AND meta IS NOT NULL",
                                            part):  # fmt: skip
            out[int(fid)] = json.loads(meta)
    return out


__all__ = [
    "DATASET_CAPTIONS",
    "DATASET_CAPTION_SETTINGS",
    "done_sources",
    "forget_done",
    "item_meta",
    "locations",
    "mark_done",
    "member_ids",
    "member_sources",
    "put_member",
]
