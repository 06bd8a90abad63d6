"""The SQLite store of an index folder: the source of truth for files, embeddings, tokens, failures and manifest.

One row per indexed file; its ``id`` (INTEGER PRIMARY KEY AUTOINCREMENT, never reused) is the FAISS id. The
float32 embedding of every row is kept here as a BLOB, so the FAISS file can always be rebuilt from this database
(see :mod:`cocatk.retrieval.index` for the crash ordering). The database runs in WAL mode with
``synchronous=FULL``; a writer groups its changes into explicit transactions (checkpoints).

Tables (schema version :data:`SCHEMA_VERSION`, numbered migrations in :data:`MIGRATIONS`, ``PRAGMA user_version``):

- ``meta(key, value)``: ``manifest`` (JSON) and ``generation`` (bumped by every committed checkpoint).
- ``roots(path, added_at)``: the folders and files given to ``cocatk index``.
- ``files(id, path, size, mtime_ns, hash, embedding, indexed_at)``: ``path`` is the file name's exact bytes (a BLOB,
  so that names that are not UTF-8 round-trip; see :mod:`cocatk.paths`); ``hash`` is blake2b-128 of the content;
  ``embedding`` is D float32 values (little-endian, L2-normalised).
- ``tokens(id, data)``: with ``--cache-tokens``, the decoder tokens of file ``id``, (T, D) float16.
- ``failures(path, reason, detail, size, mtime_ns, at)``: files that could not be decoded in the last run.
- ``captions(cid, id, config, hash, text, logprob, at)`` with ``caption_configs(key, settings)`` and the FTS5 index
  ``captions_fts``: generated captions per file and generation settings (``cocatk caption``).
- ``sources``, ``members``: dataset items (:mod:`.sourcestore`); ``tags``, ``tag_configs``, ``sidecars``: zero-shot
  tags and the XMP sidecars written with them (:mod:`.tagstore`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexCorruptError, IndexMismatchError, IndexReadOnlyError
from ..paths import from_bytes, to_bytes
from .migrations import MIGRATIONS, SCHEMA_VERSION, statements

DB_NAME = "index.sqlite"

# SQLite limits host parameters per statement (32766 on modern builds, 999 on old ones).
_CHUNK = 900


@dataclass(frozen=True)
class FileRow:
    """One indexed file (without its embedding)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str


def _chunks(values: Sequence[Any], n: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(values), n):
        yield values[i : i + n]


#: The largest row id SQLite holds (a signed 64-bit integer); FAISS's ids are int64 too.
MAX_ROW_ID = 2**63 - 1


def _row_ids(ids: Iterable[int]) -> list[int]:
    """The distinct ids, sorted, that can be rows (0 <= id <= 2^63-1): any other id (FAISS's -1 padding, a client's
    id past int64, which sqlite3 would refuse with OverflowError) is simply not in the store."""
    return sorted({i for i in ids if 0 <= i <= MAX_ROW_ID})


class Store:
    """The SQLite side of an index. Not thread-safe: use it from one thread (the indexer's main thread).

    Writers call :meth:`begin` / :meth:`commit` around their changes; readers just call the query methods (each runs
    in its own implicit read transaction and sees the last committed checkpoint).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        #: True when the folder is not writable by this user (see :meth:`open`).
        self.read_only = False

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path, create: bool = False) -> Store:
        """Open (and migrate) ``folder/index.sqlite``; create it when ``create``.

        A folder this user cannot write (a read-only mount, another user's index) is opened read-only: the queries
        work and :meth:`begin` raises :class:`IndexReadOnlyError`, as does a schema that would need a migration.
        """
        path = folder / DB_NAME
        if not create and not path.is_file():
            raise FileNotFoundError(path)
        if path.is_file() and not _writable(folder, path):
            return cls._open_read_only(folder, path)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn, path)
            store._migrate()
        except sqlite3.OperationalError as e:
            if _is_read_only(e):
                raise read_only_error(folder) from e
            raise _corrupt(folder, path, e) from e
        except sqlite3.DatabaseError as e:
            raise _corrupt(folder, path, e) from e
        return store

    @classmethod
    def _open_read_only(cls, folder: Path, path: Path) -> Store:
        # WAL needs the -shm file, which a reader cannot create in a read-only folder. Without a -wal file every
        # committed checkpoint is in the main file and nobody here can write it: read it as immutable.
        wal = path.with_name(path.name + "-wal")
        shm = path.with_name(path.name + "-shm")
        has_log = wal.is_file() and wal.stat().st_size > 0
        if has_log and not shm.is_file():  # immutable would not see the log's checkpoints: refuse, never read stale
            raise IndexReadOnlyError(
                f"index {folder} is read-only here and holds a write-ahead log that only a writable open can apply",
                hint=f"open it once where it is writable (chmod -R u+w {folder}; `cocatk check --index {folder}`)",
            )
        immutable = not has_log
        uri = path.resolve().as_uri() + ("?immutable=1" if immutable else "?mode=ro")
        try:
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30.0)
            store = cls(conn, path)
            store.read_only = True
            version = store.schema_version
        except sqlite3.DatabaseError as e:
            raise _corrupt(folder, path, e) from e
        if version > SCHEMA_VERSION:
            store._migrate()  # raises IndexMismatchError
        if version < SCHEMA_VERSION:
            conn.close()
            raise IndexReadOnlyError(
                f"index {folder} has schema version {version} and this cocatk needs {SCHEMA_VERSION}, "
                "but the folder is not writable, so it cannot be upgraded",
                hint=f"make it writable (chmod -R u+w {folder}) and run `cocatk info --index {folder}` once",
            )
        return store

    def _migrate(self) -> None:
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise IndexMismatchError(
                f"index schema version {version} is newer than this cocatk understands ({SCHEMA_VERSION})",
                hint="upgrade cocatk (pip install -U cocatk), or build a new index in another --index folder",
            )
        if version == SCHEMA_VERSION:
            return
        # Rebuilding a table must not cascade into the rows that reference it (tokens -> files): foreign keys are
        # off while migrating (the pragma is a no-op inside a transaction, so it is set around them) and checked after.
        self.conn.execute("PRAGMA foreign_keys=OFF")
        try:
            # Two processes may open a new index at once (a writer creating it, a reader polling it): the version is
            # read again under the write lock, so each migration runs exactly once.
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
                for v in range(version, SCHEMA_VERSION):
                    for statement in statements(MIGRATIONS[v]):
                        self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version = {v + 1}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
        finally:
            self.conn.execute("PRAGMA foreign_keys=ON")
        bad = self.conn.execute("PRAGMA foreign_key_check").fetchall()
        if bad:  # pragma: no cover - a migration bug, never user data
            raise IndexCorruptError(f"migration left {len(bad)} dangling rows", hint="report this as a cocatk bug")

    def close(self) -> None:
        self.conn.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    # ---- transactions ------------------------------------------------------------------------------------------
    def begin(self) -> None:
        if self.read_only:
            raise read_only_error(self.path.parent)
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _is_read_only(e):
                raise read_only_error(self.path.parent) from e
            raise

    def commit(self) -> None:
        self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """The reads inside see one committed checkpoint (a read transaction: WAL keeps this reader's view while a
        writer commits), as an export across several queries needs. Inside an open transaction: that one."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    # ---- meta --------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def manifest(self) -> dict[str, Any] | None:
        """The stored manifest; None for a stub (no model recorded yet).

        Raises:
            IndexCorruptError: the stored manifest is not JSON or not a manifest (found by tests/test_properties.py:
                a damaged one raised JSONDecodeError, or AttributeError in `cocatk info`).
        """
        value = self.get_meta("manifest")
        if value is None:
            return None
        try:
            manifest = json.loads(value)
        except ValueError as e:
            raise self._bad_manifest(f"it is not JSON ({e})") from e
        problem = manifest_problem(manifest)
        if problem:
            raise self._bad_manifest(problem)
        return manifest

    def _bad_manifest(self, why: str) -> IndexCorruptError:
        folder = self.path.parent
        return IndexCorruptError(
            f"the manifest stored in {self.path} is damaged: {why}",
            hint=f"move {folder} away and re-run `cocatk index PATH --index {folder}`",
        )

    def set_manifest(self, manifest: dict[str, Any]) -> None:
        self.set_meta("manifest", json.dumps(manifest, sort_keys=True))

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    def bump_generation(self) -> int:
        gen = self.generation + 1
        self.set_meta("generation", str(gen))
        return gen

    # ---- roots -------------------------------------------------------------------------------------------------
    def add_roots(self, roots: Iterable[str]) -> None:
        now = time.time()
        rows = [(to_bytes(r), now) for r in roots]
        self.conn.executemany("INSERT OR IGNORE INTO roots (path, added_at) VALUES (?, ?)", rows)

    def roots(self) -> list[str]:
        return [from_bytes(r[0]) for r in self.conn.execute("SELECT path FROM roots ORDER BY path")]

    def remove_root(self, root: str) -> None:
        self.conn.execute("DELETE FROM roots WHERE path = ?", (to_bytes(root),))

    # ---- files -------------------------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    def ids(self) -> np.ndarray:
        """Every file id, sorted (int64)."""
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM files ORDER BY id")), dtype=np.int64)

    def file_rows(self) -> dict[str, FileRow]:
        """Every indexed file by path (no embeddings)."""
        rows = self.conn.execute("SELECT id, path, size, mtime_ns, hash FROM files")
        out = {}
        for r in rows:
            path = from_bytes(r[1])
            out[path] = FileRow(int(r[0]), path, int(r[2]), int(r[3]), r[4])
        return out

    def ids_under(self, path: str) -> np.ndarray:
        """Ids of the files at or below ``path`` (absolute; stored paths are absolute and resolved), sorted."""
        exact = to_bytes(path).rstrip(b"/") or b"/"
        prefix = exact.rstrip(b"/") + b"/"
        # A range scan on the UNIQUE path index: the paths that start with "dir/" sort in ["dir/", "dir0").
        upper = prefix[:-1] + bytes([prefix[-1] + 1])
        rows = self.conn.execute(
            "SELECT id FROM files WHERE path = ? OR (path >= ? AND path < ?) ORDER BY id", (exact, prefix, upper)
        )
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def id_for_hash(self, content_hash: str) -> int | None:
        row = self.conn.execute("SELECT id FROM files WHERE hash = ? LIMIT 1", (content_hash,)).fetchone()
        return None if row is None else int(row[0])

    def insert_file(self, path: str, size: int, mtime_ns: int, content_hash: str, embedding: np.ndarray) -> int:
        cur = self.conn.execute(
            "INSERT INTO files (path, size, mtime_ns, hash, embedding, indexed_at) VALUES (?, ?, ?, ?, ?, ?)",
            (to_bytes(path), size, mtime_ns, content_hash, _blob(embedding), time.time()),
        )
        return int(cur.lastrowid)  # type: ignore[arg-type]

    def update_content(self, file_id: int, size: int, mtime_ns: int, content_hash: str, embedding: np.ndarray) -> None:
        """New content for a known row; its captions described the old content and go."""
        self.conn.execute(
            "UPDATE files SET size = ?, mtime_ns = ?, hash = ?, embedding = ?, indexed_at = ? WHERE id = ?",
            (size, mtime_ns, content_hash, _blob(embedding), time.time(), file_id),
        )
        self.conn.execute("DELETE FROM captions WHERE id = ? AND hash != ?", (file_id, content_hash))

    def update_stat(self, file_id: int, size: int, mtime_ns: int, path: str | None = None) -> None:
        """New size/mtime (content unchanged), and a new path for a moved file."""
        if path is None:
            self.conn.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?", (size, mtime_ns, file_id))
        else:
            self.conn.execute(
                "UPDATE files SET size = ?, mtime_ns = ?, path = ? WHERE id = ?",
                (size, mtime_ns, to_bytes(path), file_id),
            )

    def delete_files(self, ids: Sequence[int]) -> None:
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM tokens WHERE id IN ({marks})", chunk)
            self.conn.execute(f"DELETE FROM files WHERE id IN ({marks})", chunk)

    def clear(self) -> None:
        """Delete every file row, token and failure (inside the caller's transaction); roots stay."""
        self.conn.execute("DELETE FROM tokens")
        self.conn.execute("DELETE FROM files")
        self.conn.execute("DELETE FROM failures")

    def sizes_for_ids(self, ids: Sequence[int]) -> dict[int, int]:
        """``{id: size in bytes}`` of the indexed files ``ids`` (unknown ids are left out)."""
        out: dict[int, int] = {}
        for chunk in _chunks(_row_ids(int(i) for i in ids)):
            marks = ",".join("?" * len(chunk))
            for fid, size in self.conn.execute(f"SELECT id, size FROM files WHERE id IN ({marks})", chunk):
                out[int(fid)] = int(size)
        return out

    def unique_contents(self) -> int:
        """Distinct content hashes among the indexed files."""
        return int(self.conn.execute("SELECT COUNT(DISTINCT hash) FROM files").fetchone()[0])

    def vacuum(self) -> None:
        """Fold the write-ahead log back and VACUUM the database (outside a transaction)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.execute("VACUUM")
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def embeddings(self, ids: Sequence[int], dim: int) -> np.ndarray:
        """Stored embeddings of ``ids`` in that order: (N, dim) float32. Raises KeyError for an unknown id."""
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        for chunk in _chunks(_row_ids(ids)):
            marks = ",".join("?" * len(chunk))
            for i, blob in self.conn.execute(f"SELECT id, embedding FROM files WHERE id IN ({marks})", chunk):
                found[int(i)] = blob
        out = np.empty((len(ids), dim), np.float32)
        for row, i in enumerate(ids):
            if i not in found:
                raise KeyError(i)
            out[row] = np.frombuffer(found[i], dtype="<f4")
        return out

    def all_embeddings(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (N,), embeddings float32 (N, dim)) of every file, sorted by id."""
        n = self.count()
        ids = np.empty(n, np.int64)
        vecs = np.empty((n, dim), np.float32)
        k = 0
        for i, blob in self.conn.execute("SELECT id, embedding FROM files ORDER BY id"):
            if k >= n:  # a concurrent writer added rows after COUNT: the FAISS rebuild takes the first n
                break
            ids[k] = i
            vecs[k] = np.frombuffer(blob, dtype="<f4")
            k += 1
        return ids[:k], vecs[:k]

    def paths_for_ids(self, ids: Sequence[int]) -> list[str | None]:
        """The path of each id (None for an id that is not in the store, e.g. FAISS's -1 padding)."""
        wanted = [int(i) for i in ids]
        found: dict[int, str] = {}
        for chunk in _chunks(_row_ids(wanted)):
            marks = ",".join("?" * len(chunk))
            for i, p in self.conn.execute(f"SELECT id, path FROM files WHERE id IN ({marks})", chunk):
                found[int(i)] = from_bytes(p)
        return [found.get(i) for i in wanted]

    def hashes_for_ids(self, ids: Sequence[int]) -> list[str | None]:
        """Content hash of each id (identical files share it; search can collapse duplicates with it)."""
        wanted = [int(i) for i in ids]
        found: dict[int, str] = {}
        for chunk in _chunks(_row_ids(wanted)):
            marks = ",".join("?" * len(chunk))
            for i, h in self.conn.execute(f"SELECT id, hash FROM files WHERE id IN ({marks})", chunk):
                found[int(i)] = h
        return [found.get(i) for i in wanted]

    # ---- tokens ------------------------------------------------------------------------------------------------
    def put_tokens(self, file_id: int, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype="<f2").tobytes()
        self.conn.execute("INSERT OR REPLACE INTO tokens (id, data) VALUES (?, ?)", (file_id, data))

    def copy_tokens(self, src: int, dst: int) -> bool:
        cur = self.conn.execute(
            "INSERT OR REPLACE INTO tokens (id, data) SELECT ?, data FROM tokens WHERE id = ?", (dst, src)
        )
        return cur.rowcount > 0

    # ---- captions ----------------------------------------------------------------------------------------------
    def ensure_caption_config(self, key: str, settings: dict[str, Any]) -> None:
        """Record what a caption key stands for (model identity and generation settings)."""
        self.conn.execute(
            "INSERT OR IGNORE INTO caption_configs (key, settings, created_at) VALUES (?, ?, ?)",
            (key, json.dumps(settings, sort_keys=True), time.time()),
        )

    def caption_configs(self) -> dict[str, dict[str, Any]]:
        """key -> settings, plus ``count`` (captions stored with that key), oldest first."""
        rows = self.conn.execute(
            "SELECT k.key, k.settings, COUNT(c.cid) FROM caption_configs k LEFT JOIN captions c ON c.config = k.key "
            "GROUP BY k.key ORDER BY k.created_at"
        )
        return {key: {**json.loads(settings), "count": int(n)} for key, settings, n in rows}

    def put_caption(self, file_id: int, key: str, content_hash: str, text: str, logprob: float | None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO captions (id, config, hash, text, logprob, at) VALUES (?, ?, ?, ?, ?, ?)",
            (file_id, key, content_hash, text, logprob, time.time()),
        )

    def copy_captions(self, src: int, dst: int) -> int:
        """Give row ``dst`` (same content as ``src``) the captions of ``src``; returns how many."""
        cur = self.conn.execute(
            "INSERT OR REPLACE INTO captions (id, config, hash, text, logprob, at) "
            "SELECT ?, config, hash, text, logprob, at FROM captions WHERE id = ?",
            (dst, src),
        )
        return cur.rowcount

    def uncaptioned(self, key: str) -> list[FileRow]:
        """Files without a caption for ``key``, by id."""
        rows = self.conn.execute(
            "SELECT f.id, f.path, f.size, f.mtime_ns, f.hash FROM files f "
            "LEFT JOIN captions c ON c.id = f.id AND c.config = ? WHERE c.cid IS NULL ORDER BY f.id",
            (key,),
        )
        return [FileRow(int(i), from_bytes(p), int(sz), int(m), h) for i, p, sz, m, h in rows]

    def captions_for_ids(self, ids: Sequence[int], key: str | None = None) -> dict[int, str]:
        """The caption of each id that has one: for ``key``, else the most recent of any settings."""
        wanted = _row_ids(int(i) for i in ids)
        found: dict[int, tuple[float, str]] = {}
        for chunk in _chunks(wanted):
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id, text, at FROM captions WHERE id IN ({marks})"
            params: list[Any] = list(chunk)
            if key is not None:
                sql += " AND config = ?"
                params.append(key)
            for i, text, at in self.conn.execute(sql, params):
                if int(i) not in found or at > found[int(i)][0]:
                    found[int(i)] = (at, text)
        return {i: t for i, (_, t) in found.items()}

    def caption_match(self, query: str) -> np.ndarray:
        """Ids whose captions match an FTS5 query (words are ANDed; "quoted phrases", OR, NOT, prefix*), sorted.

        Raises:
            sqlite3.OperationalError: the query is not valid FTS5 syntax (the caller turns it into a UsageError).
        """
        rows = self.conn.execute(
            "SELECT DISTINCT c.id FROM captions_fts JOIN captions c ON c.cid = captions_fts.rowid "
            "WHERE captions_fts MATCH ? ORDER BY c.id",
            (query,),
        )
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def caption_count(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0])

    def drop_tokens(self) -> None:
        """Delete every cached token row (inside the caller's transaction)."""
        self.conn.execute("DELETE FROM tokens")

    def caption_ids(self) -> set[int]:
        """Ids that have at least one caption."""
        return {int(r[0]) for r in self.conn.execute("SELECT DISTINCT id FROM captions")}

    def token_ids(self) -> set[int]:
        return {int(r[0]) for r in self.conn.execute("SELECT id FROM tokens")}

    def token_bytes(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM tokens").fetchone()[0])

    def get_tokens(self, ids: Sequence[int], shape: tuple[int, int]) -> np.ndarray | None:
        """Cached tokens of ``ids`` in order, (N, T, D) float16, or None when any id has none."""
        ids = [int(i) for i in ids]
        found: dict[int, bytes] = {}
        for chunk in _chunks(_row_ids(ids)):
            marks = ",".join("?" * len(chunk))
            for i, blob in self.conn.execute(f"SELECT id, data FROM tokens WHERE id IN ({marks})", chunk):
                found[int(i)] = blob
        if any(i not in found for i in ids):
            return None
        out = np.empty((len(ids), *shape), np.float16)
        for row, i in enumerate(ids):
            out[row] = np.frombuffer(found[i], dtype="<f2").reshape(shape)
        return out

    # ---- failures ----------------------------------------------------------------------------------------------
    def record_failure(self, path: str, reason: str, detail: str, size: int | None, mtime_ns: int | None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO failures (path, reason, detail, size, mtime_ns, at) VALUES (?, ?, ?, ?, ?, ?)",
            (to_bytes(path), reason, detail, size, mtime_ns, time.time()),
        )

    def failure_rows(self) -> dict[str, tuple[str, str, int | None, int | None]]:
        """path -> (reason, detail, size, mtime_ns) of every recorded failure."""
        rows = self.conn.execute("SELECT path, reason, detail, size, mtime_ns FROM failures")
        return {from_bytes(p): (r, d, s, m) for p, r, d, s, m in rows}

    def delete_failures(self, paths: Sequence[str]) -> None:
        self.conn.executemany("DELETE FROM failures WHERE path = ?", [(to_bytes(p),) for p in paths])

    def failures(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT path, reason, detail FROM failures ORDER BY path")
        return [{"path": from_bytes(p), "reason": r, "detail": d} for p, r, d in rows]

    def integrity_problems(self) -> list[str]:
        rows = [r[0] for r in self.conn.execute("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else [f"sqlite: {r}" for r in rows]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_identity(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


#: What each manifest key must hold where present (older manifests lack some keys: they read as the default).
_MANIFEST_TYPES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "identity": ("an object of strings", _is_identity),
    "model": ("a string", lambda v: isinstance(v, str) and bool(v)),
    "pretrained": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "embed_dim": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "image_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "factory": ("a string", lambda v: isinstance(v, str)),
    "cache_tokens": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
    "token_shape": (
        "null or two positive integers",
        lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)),
    ),
    "rerank_model": (
        "null or an object with identity, model and pretrained",
        lambda v: (
            v is None
            or (
                isinstance(v, dict)
                and _is_identity(v.get("identity"))
                and isinstance(v.get("model"), str)
                and (v.get("pretrained") is None or isinstance(v.get("pretrained"), str))
            )
        ),
    ),
    "schema_version": ("an integer", _is_int),
}
#: Keys every manifest has held since the first release; the readers cannot do without them.
_MANIFEST_REQUIRED = ("identity", "model", "pretrained", "embed_dim")


def manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a parsed manifest (one phrase), or None when the readers can use it."""
    if not isinstance(manifest, dict):
        return f"it is a JSON {type(manifest).__name__}, not an object"
    for key in _MANIFEST_REQUIRED:
        if key not in manifest:
            return f"it has no {key!r}"
    for key, (what, ok) in _MANIFEST_TYPES.items():
        if key in manifest and not ok(manifest[key]):
            return f"{key!r} is not {what}"
    return None


def read_only_error(folder: Path) -> IndexReadOnlyError:
    """The one error every writer raises on an index folder this user cannot write."""
    return IndexReadOnlyError(
        f"index folder {folder} is read-only here (mounted read-only, or not writable by this user), so nothing can be "
        "added, removed or cached there",
        hint=f"make it writable (chmod -R u+w {folder}), or copy it and pass --index COPY; search, info and check "
        "read it as it is",
    )


def _writable(folder: Path, path: Path) -> bool:
    return os.access(folder, os.W_OK) and os.access(path, os.W_OK)


def _is_read_only(e: sqlite3.OperationalError) -> bool:
    text = str(e).lower()
    return "readonly" in text or "read-only" in text


def _corrupt(folder: Path, path: Path, e: Exception) -> IndexCorruptError:
    return IndexCorruptError(
        f"cannot open {path}: {e}",
        hint=f"the SQLite file is damaged; move {folder} away and re-run `cocatk index PATH --index {folder}`",
    )


def _retry_locked(call: Any, seconds: float = 30.0) -> Any:
    """``call()``, retried while SQLite answers "database is locked" without waiting (switching to WAL while another
    connection opens the same new file does)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _blob(embedding: np.ndarray) -> bytes:
    return np.ascontiguousarray(embedding, dtype="<f4").tobytes()


__all__ = ["DB_NAME", "MIGRATIONS", "SCHEMA_VERSION", "FileRow", "Store"]
