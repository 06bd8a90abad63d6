"""The captions table (migration 3): stale on a content change, gone with the file, copied with a copy, FTS5."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from cocatk.retrieval.store import MIGRATIONS, SCHEMA_VERSION, Store


def _store(tmp_path: Path) -> Store:
    store = Store.open(tmp_path, create=True)
    store.begin()
    for i, name in enumerate(["a", "b", "c"], start=1):
        store.insert_file(f"/p/{name}.jpg", 1, 1, f"h{i}", np.ones(4, np.float32))
    store.ensure_caption_config("k1", {"model": "m", "generation": {"strategy": "beam"}})
    store.ensure_caption_config("k2", {"model": "m", "generation": {"strategy": "greedy"}})
    store.put_caption(1, "k1", "h1", "a red circle left of a blue square", -3.0)
    store.put_caption(2, "k1", "h2", "a green triangle", -1.0)
    store.put_caption(2, "k2", "h2", "a green triangle above a red square", -2.0)
    store.commit()
    return store


def test_captions_follow_their_files(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.caption_match("red").tolist() == [1, 2] and store.caption_match("triangle").tolist() == [2]
    assert store.caption_match('"red circle"').tolist() == [1] and store.caption_match("tri*").tolist() == [2]
    assert [r.id for r in store.uncaptioned("k1")] == [3] and [r.id for r in store.uncaptioned("k2")] == [1, 3]
    assert store.captions_for_ids([1, 2, 3], "k1") == {1: "a red circle left of a blue square", 2: "a green triangle"}
    assert store.captions_for_ids([2])[2] == "a green triangle above a red square"  # the most recent settings
    assert {k: v["count"] for k, v in store.caption_configs().items()} == {"k1": 2, "k2": 1}

    store.begin()
    store.copy_captions(2, 3)  # row 3 gets row 2's content (a duplicate): its captions too
    store.update_content(1, 2, 2, "h9", np.ones(4, np.float32))  # new content: the old caption is stale
    store.delete_files([2])  # removed: its captions go (ON DELETE CASCADE) and leave the FTS index
    store.commit()
    assert store.captions_for_ids([1, 2, 3], "k1") == {3: "a green triangle"}
    assert store.caption_match("red").tolist() == [3] and store.caption_match("circle").tolist() == []
    assert store.caption_count() == 2
    rows = store.conn.execute("SELECT COUNT(*) FROM captions_fts").fetchone()[0]
    assert rows == 2  # the FTS index holds exactly the live captions
    with pytest.raises(sqlite3.OperationalError):
        store.caption_match('"unbalanced')
    store.close()


def test_migration_3_adds_captions_to_a_version_2_index(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    for v in range(2):
        conn.executescript(f"BEGIN; {MIGRATIONS[v]}; PRAGMA user_version = {v + 1}; COMMIT;")
    conn.execute("INSERT INTO files VALUES (7, x'2f702f612e6a7067', 1, 2, 'h', x'00000000', 0)")
    conn.close()
    store = Store.open(tmp_path)
    assert store.schema_version == SCHEMA_VERSION and store.ids().tolist() == [7]
    store.begin()
    store.ensure_caption_config("k", {})
    store.put_caption(7, "k", "h", "a black square", None)
    store.commit()
    assert store.caption_match("square").tolist() == [7]
    store.close()
