"""The numbered migrations of an index's SQLite schema (``PRAGMA user_version``), and how to run one.

Entry i of :data:`MIGRATIONS` brings the schema from version i to i + 1; :meth:`cocatk.retrieval.store.Store.open`
runs the missing ones in one transaction. A migration is never edited once released: a change is a new entry.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

#: Numbered migrations: entry i brings the schema from version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE roots (path TEXT PRIMARY KEY, added_at REAL NOT NULL);
    CREATE TABLE files (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT NOT NULL,
        embedding BLOB NOT NULL,
        indexed_at REAL NOT NULL
    );
    CREATE INDEX files_hash ON files (hash);
    CREATE TABLE tokens (id INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE, data BLOB NOT NULL);
    CREATE TABLE failures (
        path TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        size INTEGER,
        mtime_ns INTEGER,
        at REAL NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('generation', '0');
    """,
    # 2: paths become BLOBs holding the file name's bytes (a name that is not UTF-8 could not be stored as TEXT).
    # Tables are rebuilt (SQLite cannot change a column's type); ids and the AUTOINCREMENT counter are kept.
    """
    CREATE TABLE roots_v2 (path BLOB PRIMARY KEY, added_at REAL NOT NULL);
    INSERT INTO roots_v2 SELECT CAST(path AS BLOB), added_at FROM roots;
    DROP TABLE roots;
    ALTER TABLE roots_v2 RENAME TO roots;
    CREATE TABLE files_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        path BLOB NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT NOT NULL,
        embedding BLOB NOT NULL,
        indexed_at REAL NOT NULL
    );
    INSERT INTO files_v2 SELECT id, CAST(path AS BLOB), size, mtime_ns, hash, embedding, indexed_at FROM files;
    INSERT INTO sqlite_sequence (name, seq) SELECT 'files_v2', seq FROM sqlite_sequence
        WHERE name = 'files' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'files_v2');
    UPDATE sqlite_sequence SET seq = (SELECT MAX(seq) FROM sqlite_sequence WHERE name IN ('files', 'files_v2'))
        WHERE name = 'files_v2';
    DROP TABLE files;
    ALTER TABLE files_v2 RENAME TO files;
    CREATE INDEX files_hash ON files (hash);
    CREATE TABLE failures_v2 (
        path BLOB PRIMARY KEY,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        size INTEGER,
        mtime_ns INTEGER,
        at REAL NOT NULL
    );
    INSERT INTO failures_v2 SELECT CAST(path AS BLOB), reason, detail, size, mtime_ns, at FROM failures;
    DROP TABLE failures;
    ALTER TABLE failures_v2 RENAME TO failures;
    """,
    # 3: generated captions. One row per (file, caption settings); a caption describes the content it was made from
    # (`hash`): a changed file loses it, a removed file's go with it (ON DELETE CASCADE). `caption_configs` records the
    # model identity and generation settings behind each key. `captions_fts` is an FTS5 index over the texts, kept
    # in step by triggers (external content: the text is stored once).
    """
    CREATE TABLE caption_configs (key TEXT PRIMARY KEY, settings TEXT NOT NULL, created_at REAL NOT NULL);
    CREATE TABLE captions (
        cid INTEGER PRIMARY KEY,
        id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        config TEXT NOT NULL REFERENCES caption_configs (key),
        hash TEXT NOT NULL,
        text TEXT NOT NULL,
        logprob REAL,
        at REAL NOT NULL,
        UNIQUE (id, config)
    );
    CREATE INDEX captions_config ON captions (config);
    CREATE VIRTUAL TABLE captions_fts USING fts5(text, content='captions', content_rowid='cid');
    CREATE TRIGGER captions_ai AFTER INSERT ON captions BEGIN
        INSERT INTO captions_fts (rowid, text) VALUES (new.cid, new.text);
    END;
    CREATE TRIGGER captions_ad AFTER DELETE ON captions BEGIN
        INSERT INTO captions_fts (captions_fts, rowid, text) VALUES ('delete', old.cid, old.text);
    END;
    CREATE TRIGGER captions_au AFTER UPDATE ON captions BEGIN
        INSERT INTO captions_fts (captions_fts, rowid, text) VALUES ('delete', old.cid, old.text);
        INSERT INTO captions_fts (rowid, text) VALUES (new.cid, new.text);
    END;
    """,
    # Collections that are datasets (cocatk.sources): a shard is recorded done with its size and mtime, so that a
    # rerun skips it unread; a member row says where an item's bytes lie (``source``: the shard's path as bytes, as
    # files.path) and keeps the sample's JSON field. Its text field (the caption) is a caption row, setting "dataset".
    """
    CREATE TABLE sources (
        path BLOB PRIMARY KEY,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        items INTEGER NOT NULL,
        done_at REAL NOT NULL
    );
    CREATE TABLE members (
        id INTEGER PRIMARY KEY REFERENCES files (id) ON DELETE CASCADE,
        source BLOB NOT NULL,
        key TEXT NOT NULL,
        field TEXT NOT NULL,
        offset INTEGER NOT NULL,
        size INTEGER NOT NULL,
        meta TEXT
    );
    CREATE INDEX members_source ON members (source);
    """,
    # 5: zero-shot tags (`cocatk tag`). One row per (file, tag settings, label) with the label's probability and the
    # content it was computed from (`hash`: a file whose content changed has stale tags until the next run);
    # `tag_configs` records the model, vocabulary and rule behind each key. `sidecars` records every XMP sidecar
    # cocatk wrote (what it added, and the bytes it found there), so `cocatk tag --remove-xmp` can undo it exactly;
    # it outlives the file's row (no foreign key): a sidecar stays undoable after its image leaves the index.
    """
    CREATE TABLE tag_configs (key TEXT PRIMARY KEY, settings TEXT NOT NULL, created_at REAL NOT NULL);
    CREATE TABLE tags (
        id INTEGER NOT NULL REFERENCES files (id) ON DELETE CASCADE,
        config TEXT NOT NULL REFERENCES tag_configs (key) ON DELETE CASCADE,
        label TEXT NOT NULL,
        path TEXT NOT NULL,
        score REAL NOT NULL,
        hash TEXT NOT NULL,
        PRIMARY KEY (id, config, label)
    );
    CREATE INDEX tags_label ON tags (config, label COLLATE NOCASE);
    CREATE TABLE sidecars (
        path BLOB PRIMARY KEY,
        image BLOB NOT NULL,
        config TEXT NOT NULL,
        record TEXT NOT NULL,
        written_at REAL NOT NULL
    );
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def statements(script: str) -> Iterable[str]:
    """The SQL statements of a migration script, whole (a trigger's body holds semicolons of its own)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf.strip()
            buf = ""
    if buf.strip():
        yield buf.strip()


__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "statements"]
