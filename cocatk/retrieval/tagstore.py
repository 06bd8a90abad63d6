"""The SQL of zero-shot tags and of the XMP sidecars written with them (schema 5, :mod:`.migrations`).

Index layer: the tag feature (:mod:`.tags`), search (``--tag``) and the server (through
:class:`~.folder.IndexFolder`) call these functions with the index's :class:`~.store.Store` and never write SQL.
Writers call them inside an open transaction. A tag holds the content hash it was computed from; readers return only
tags whose hash is the file's current one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..paths import from_bytes, to_bytes

if TYPE_CHECKING:  # pragma: no cover
    from .store import Store

_CHUNK = 900


def ensure_config(store: Store, key: str, settings: dict[str, Any]) -> None:
    store.conn.execute(
        "INSERT OR IGNORE INTO tag_configs (key, settings, created_at) VALUES (?, ?, ?)",
        (key, json.dumps(settings, sort_keys=True), time.time()),
    )


def configs(store: Store) -> dict[str, dict[str, Any]]:
    """key -> settings, plus ``count`` (current tags with that key) and ``images`` (images with one), oldest
    first."""
    rows = store.conn.execute(
        "SELECT k.key, k.settings, COUNT(t.id), COUNT(DISTINCT t.id) FROM tag_configs k "
        "LEFT JOIN (SELECT t.* FROM tags t JOIN files f ON f.id = t.id AND f.hash = t.hash) t ON t.config = k.key "
        "GROUP BY k.key ORDER BY k.created_at, k.rowid"
    )
    return {key: {**json.loads(s), "count": int(n), "images": int(m)} for key, s, n, m in rows}


def latest_config(store: Store) -> str | None:
    row = store.conn.execute("SELECT key FROM tag_configs ORDER BY created_at DESC, rowid DESC LIMIT 1").fetchone()
    return row[0] if row else None


def replace_tags(store: Store, key: str, rows: Iterable[tuple[int, str, str, float, str]]) -> int:
    """Make ``rows`` (id, label, path, score, hash) the tags of ``key`` (in the open transaction); returns how
    many."""
    store.conn.execute("DELETE FROM tags WHERE config = ?", (key,))
    cur = store.conn.executemany(
        "INSERT INTO tags (id, config, label, path, score, hash) VALUES (?, ?, ?, ?, ?, ?)",
        ((i, key, lab, path, float(s), h) for i, lab, path, s, h in rows),
    )
    return int(cur.rowcount)


def tags_for_ids(store: Store, ids: Sequence[int], key: str | None = None) -> dict[int, list[dict[str, Any]]]:
    """id -> its current tags for ``key`` (default: the latest settings), best first: ``{label, path, score}``."""
    key = key or latest_config(store)
    out: dict[int, list[dict[str, Any]]] = {}
    if key is None:
        return out
    ids = [int(i) for i in ids]
    for i in range(0, len(ids), _CHUNK):
        part = ids[i : i + _CHUNK]
        q = ",".join("?" * len(part))
        for fid, label, path, score in store.conn.execute(
            f"SELECT t.id, t.label, t.path, t.score FROM tags t JOIN files f ON f.id = t.id AND f.hash = t.hash "
            f"WHERE t.config = ? AND t.id IN ({q}) ORDER BY t.id, t.score DESC, t.label",
            [key, *part],
        ):
            out.setdefault(int(fid), []).append({"label": label, "path": path, "score": round(float(score), 4)})
    return out


def ids_with_tag(store: Store, label: str, key: str | None = None) -> np.ndarray:
    """Sorted ids whose current tags (for ``key``, default the latest) include ``label`` (case-insensitive; a
    group of the hierarchy, ``Animal``, matches every label under it)."""
    key = key or latest_config(store)
    if key is None:
        return np.zeros(0, np.int64)
    rows = store.conn.execute(
        "SELECT DISTINCT t.id FROM tags t JOIN files f ON f.id = t.id AND f.hash = t.hash WHERE t.config = ? AND "
        "(t.label = ? COLLATE NOCASE OR ('|' || t.path || '|') LIKE ('%|' || ? || '|%')) ORDER BY t.id",
        (key, label, label.replace("%", "").replace("_", "")),
    )
    return np.fromiter((r[0] for r in rows), dtype=np.int64)


def label_counts(store: Store, key: str) -> list[tuple[str, str, int]]:
    """(label, path, images) of ``key``'s current tags, most common first."""
    rows = store.conn.execute(
        "SELECT t.label, t.path, COUNT(*) FROM tags t JOIN files f ON f.id = t.id AND f.hash = t.hash "
        "WHERE t.config = ? GROUP BY t.label, t.path ORDER BY COUNT(*) DESC, t.label",
        (key,),
    )
    return [(lab, path, int(n)) for lab, path, n in rows]


# ---- sidecars -----------------------------------------------------------------------------------------------
def put_sidecar(store: Store, path: str, image: str, key: str, record: dict[str, Any]) -> None:
    store.conn.execute(
        "INSERT OR REPLACE INTO sidecars (path, image, config, record, written_at) VALUES (?, ?, ?, ?, ?)",
        (to_bytes(path), to_bytes(image), key, json.dumps(record, sort_keys=True), time.time()),
    )


def sidecars(store: Store) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """sidecar path -> (image path, tag key, record) of every sidecar cocatk wrote."""
    rows = store.conn.execute("SELECT path, image, config, record FROM sidecars ORDER BY path")
    return {from_bytes(p): (from_bytes(i), k, json.loads(r)) for p, i, k, r in rows}


def drop_sidecar(store: Store, path: str) -> None:
    store.conn.execute("DELETE FROM sidecars WHERE path = ?", (to_bytes(path),))


__all__ = [
    "configs",
    "drop_sidecar",
    "ensure_config",
    "ids_with_tag",
    "label_counts",
    "latest_config",
    "put_sidecar",
    "replace_tags",
    "sidecars",
    "tags_for_ids",
]
