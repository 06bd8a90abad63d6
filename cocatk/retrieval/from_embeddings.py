"""``cocatk index --from-embeddings OUT``: a clip-retrieval embeddings folder (:mod:`.exchange`) imported into an index
made with the same model.

:func:`import_model` checks the model before any index folder is made: the one named, else the one ``OUT`` records
(``cocatk.json``, in cocatk's export only), against the record's identity and the vectors' dim. Without a record
only the dim can be checked, and the report says so. :func:`import_embeddings` then keys each row by its
``image_path`` (relative paths are taken from the current directory, as clip-retrieval wrote them). A file that is
there is stat'ed and hashed as ``cocatk index`` does (the recorded hash is trusted when size and mtime are the ones
recorded), so a later ``cocatk index`` of its folder finds it unchanged and encodes nothing. A row whose file is not
here is imported too, with its vector, size 0, mtime 0 and a hash of its own, and counted and named in the report's
notices: a search skips it while its file is not there (as it skips any deleted file) and finds it once it is (a
drive mounted); a later ``cocatk index`` that scans its folder reads it then (encoding it again: its stat was
unknown), or removes it like any deleted file while it is still missing. Its folder becomes a root; one that does
not exist here reads as unmounted, and its rows are kept. A path the index holds already is left as it is, so an
import killed at any moment and run again imports each row exactly once. The rows are committed in checkpoints (one
SQLite transaction each) under the writer lock; the FAISS file is rebuilt once at the end (or from SQLite at the
next open when the run was killed first). Imported rows bring no decoder tokens, so an index the import starts
records ``cache_tokens: false``.
"""

from __future__ import annotations

import base64
import os
import stat
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from ..errors import IndexMismatchError, UsageError
from ..paths import display_path, from_bytes, json_path, to_bytes
from .encoder import hash_bytes
from .exchange import EmbeddingsFolder, EmbeddingShard, load_npy
from .folder import identity_text
from .layout import DEFAULT_CHECKPOINT_EVERY, ProgressCallback, is_under, resolve_roots
from .store import DB_NAME

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder

#: The caption settings key of the captions an import brings (a ``caption`` column).
IMPORTED_CAPTIONS = "imported"
IMPORTED_CAPTION_SETTINGS = {"source": "the caption column of an imported clip-retrieval metadata file"}
#: Rows read, normalised and hashed together.
_BLOCK = 4096
#: A vector whose norm is this far from 1 is normalised on import (fp16 rounding is ~1e-4; fp32 stays bit-exact).
_NORM_TOLERANCE = 1e-5
#: Rows between progress reports.
_PROGRESS_EVERY = 64
#: The examples of files not found that a report names.
_EXAMPLES = 5


def import_model(
    src: EmbeddingsFolder,
    index_dir: str | os.PathLike[str] | None,
    model: str | None,
    pretrained: str | None,
    *,
    device: str | None = None,
    precision: str | None = None,
) -> tuple[str | None, str | None]:
    """The (model, pretrained) to open the index with for importing ``src``, checked before any folder is created:
    ``model``, else the one ``src`` records; None for an existing index without either (its own model, whose dim
    :func:`import_embeddings` checks).

    Raises:
        UsageError: ``src`` records no model, none is named, and there is no index yet. IndexMismatchError: the
        named model is not the recorded one, or a new index's model has another dim. Model errors.
    """
    from ..models import load_model, resolve_model

    folder = Path(index_dir).expanduser() if index_dir is not None else config.default_index_dir()
    exists = (folder.resolve() / DB_NAME).is_file()
    record = src.record
    if model is None and record is not None:
        model, pretrained = record["model"], (record.get("pretrained") if pretrained is None else pretrained)
    if model is None:
        if exists:
            return None, pretrained
        raise UsageError(
            f"{display_path(str(src.root))} records no model (clip-retrieval's own output does not) and there is no "
            f"index at {display_path(str(folder))} yet",
            hint=f"pass --model M, the model that computed these {src.dim}-d embeddings",
        )
    spec = resolve_model(model, pretrained)
    if record is not None and spec.identity() != record["identity"]:
        raise IndexMismatchError(
            f"{display_path(str(src.root))} holds embeddings of {identity_text(record['identity'])}, not of "
            f"{identity_text(spec.identity())}",
            hint=f"pass --model {record['model']} (or leave --model out), into a new --index folder if this one "
            "holds another model",
        )
    if not exists:  # refuse before a new index folder is made; the model is loaded once (the open reuses it)
        embed_dim = load_model(spec.name, spec.pretrained, device=device, precision=precision).embed_dim
        if embed_dim != src.dim:
            raise IndexMismatchError(
                f"{display_path(str(src.root))} holds {src.dim}-d embeddings; {spec.name} gives {embed_dim}-d",
                hint="pass --model M, the model that computed these embeddings",
            )
    return model, pretrained


@dataclass
class ImportReport:
    """What :func:`import_embeddings` did; ``to_dict()`` is the JSON ``cocatk index --from-embeddings --json``
    prints."""

    index_dir: str
    source: str
    rows: int = 0
    imported: int = 0
    #: Rows whose path the index held already (indexed before, imported by an interrupted run, or a path repeated in
    #: the folder): left as they are.
    already: int = 0
    #: Imported rows whose file is not here (see the module docstring).
    missing: int = 0
    #: Files read and hashed (the others' recorded hash was trusted, or they are missing).
    hashed: int = 0
    #: Rows not below the PATHs given: left out.
    outside: int = 0
    #: Rows with a zero or non-finite vector: left out.
    unusable: int = 0
    captions: int = 0
    checkpoints: int = 0
    total: int = 0
    roots: list[str] = field(default_factory=list)
    missing_examples: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(json_path(self.index_dir, "index_dir"), **json_path(self.source, "source"))
        d["roots"] = [json_path(r) for r in self.roots]
        d["missing_examples"] = [json_path(p) for p in self.missing_examples]
        return d


def import_embeddings(
    index: IndexFolder,
    src: EmbeddingsFolder,
    *,
    roots: Sequence[str | os.PathLike[str]] = (),
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Import ``src`` into ``index`` under the writer lock (see the module docstring).

    Args:
        roots: the index roots the rows belong to (only rows below them are imported); default: the roots ``src``
            records (a cocatk export) and the index has, and the folder of every other row (nested ones merged).
        checkpoint_every: rows per durable checkpoint.
        workers: threads that stat, read and hash the files (default min(8, cores); 0: this thread).
        progress: ``progress("import", rows_done, rows)``.

    Raises:
        IndexMismatchError: another dim, or another model than the one ``src`` records. UsageError: a bad option.
        IndexBusyError: another writer.
    """
    if checkpoint_every < 1:
        raise UsageError(f"checkpoint_every must be >= 1, got {checkpoint_every}", hint="pass a positive number")
    if workers is not None and workers < 0:
        raise UsageError(f"workers must be >= 0, got {workers}", hint="pass --workers 0 or more")
    with index.writer_lock():
        return _Importer(index, src, resolve_roots(roots), checkpoint_every, workers, progress).run()


class _Importer:
    def __init__(
        self,
        index: IndexFolder,
        src: EmbeddingsFolder,
        roots: list[str],
        checkpoint_every: int,
        workers: int | None,
        progress: ProgressCallback | None,
    ) -> None:
        self.index, self.store, self.src = index, index.store, src
        self.given_roots = roots
        self.checkpoint_every = checkpoint_every
        self.workers = min(8, os.cpu_count() or 1) if workers is None else workers
        self.progress: ProgressCallback = progress or (lambda stage, done, total: None)
        self.report = ImportReport(index_dir=str(index.dir), source=str(src.root), rows=src.count)
        self._since_checkpoint = 0
        self._folders: dict[str, str] = {}  # a row's folder as written -> resolved

    def run(self) -> ImportReport:
        t0 = time.monotonic()
        manifest = self.index.manifest
        self._check_model(manifest)
        paths = [self._paths(shard) for shard in self.src.shards]
        wanted = [p for shard in paths for p in shard]
        if self.given_roots:
            roots = self.given_roots
            self.report.outside = sum(1 for p in wanted if not is_under(p, roots))
        else:
            roots = _roots_for(wanted, [*_record_roots(self.src.record), *self.store.roots()])
        self.report.roots = roots
        existing = set(self.store.file_rows())
        store = self.store
        caption_key = IMPORTED_CAPTIONS if "caption" in self.src.columns else None
        store.begin()
        try:
            store.add_roots(roots)
            self._update_manifest(manifest)
            if caption_key is not None:
                store.ensure_caption_config(caption_key, IMPORTED_CAPTION_SETTINGS)
            pool = ThreadPoolExecutor(self.workers) if self.workers > 0 else None
            try:
                done = 0
                self.progress("import", 0, self.report.rows)
                for shard, shard_paths in zip(self.src.shards, paths, strict=True):
                    done = self._import_shard(shard, shard_paths, existing, caption_key, pool, done)
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
            self._checkpoint(final=True)
        except BaseException:
            store.rollback()  # back to the last checkpoint; a rerun skips the rows committed before it
            self.index.set_vectors(None, -1)
            raise
        self.index.write_manifest_json()
        gen = store.generation
        self.index.set_vectors(self.index.load_vectors(gen, save=True), gen)
        self.report.total = store.count()
        if self.report.missing:
            shown = ", ".join(display_path(p) for p in self.report.missing_examples)
            self.report.notices.append(
                f"{self.report.missing} imported rows name files that are not here (e.g. {shown}): a search skips "
                "them until their files are there, and a later `cocatk index` of their folder removes those still "
                "missing"
            )
        if self.report.unusable:
            self.report.notices.append(f"{self.report.unusable} rows with a zero or non-finite vector were left out")
        if self.report.outside:
            self.report.notices.append(f"{self.report.outside} rows below none of the PATHs given were left out")
        self.report.seconds = round(time.monotonic() - t0, 3)
        return self.report

    def _check_model(self, manifest: dict[str, Any]) -> None:
        src, record = self.src, self.src.record
        built = identity_text(manifest.get("identity", {}))
        if src.dim != int(manifest["embed_dim"]):
            raise IndexMismatchError(
                f"{display_path(str(src.root))} holds {src.dim}-d embeddings; index {self.index.dir} ({built}) holds "
                f"{manifest['embed_dim']}-d",
                hint="import into an index of the model that computed them: "
                "`cocatk index --from-embeddings OUT --model M --index NEW_DIR`",
            )
        if record is None:
            self.report.notices.append(
                f"{display_path(str(src.root))} records no model (clip-retrieval's output does not): only the "
                f"dimension ({src.dim}) was checked; the vectors must come from {built}, or searches return nonsense"
            )
        elif record["identity"] != manifest.get("identity"):
            raise IndexMismatchError(
                f"{display_path(str(src.root))} holds embeddings of {identity_text(record['identity'])}; index "
                f"{self.index.dir} was built with {built}",
                hint=f"import into a new index of that model: `cocatk index --from-embeddings OUT --index NEW_DIR` "
                f"(it takes --model {record['model']} from the record)",
            )

    def _update_manifest(self, manifest: dict[str, Any]) -> None:
        # Imported rows bring no decoder tokens: a default cache would read and encode every image again at the next
        # `cocatk index`, which is what an import avoids (`cocatk index --cache-tokens` asks for it).
        if manifest.get("cache_tokens") is None:
            manifest["cache_tokens"] = False
        record_precisions = (self.src.record or {}).get("precisions") or []
        if isinstance(record_precisions, list) and record_precisions:
            manifest["precisions"] = sorted({*manifest.get("precisions", []), *map(str, record_precisions)})
        self.store.set_manifest(manifest)

    def _paths(self, shard: EmbeddingShard) -> list[str]:
        """The index paths of a shard's rows, in order."""
        import pyarrow.parquet as pq

        names = [c for c in ("image_path", "image_path_b64") if c in self.src.columns]
        table = pq.read_table(shard.parquet, columns=names)
        texts = table.column("image_path").to_pylist()
        b64s = table.column("image_path_b64").to_pylist() if "image_path_b64" in names else [None] * len(texts)
        base = os.getcwd()
        return [self._resolve(t, b, base) for t, b in zip(texts, b64s, strict=True)]

    def _resolve(self, text: Any, b64: Any, base: str) -> str:
        """An absolute path as the scan of ``cocatk index`` writes it: its folder resolved, its own name kept."""
        raw = from_bytes(base64.b64decode(b64)) if b64 else str(text if text is not None else "")
        head, tail = os.path.split(os.path.join(base, raw))
        folder = self._folders.get(head)
        if folder is None:
            folder = self._folders[head] = os.path.realpath(head)
        return os.path.join(folder, tail)

    def _import_shard(
        self,
        shard: EmbeddingShard,
        paths: list[str],
        existing: set[str],
        caption_key: str | None,
        pool: ThreadPoolExecutor | None,
        done: int,
    ) -> int:
        import pyarrow.parquet as pq

        vecs = load_npy(shard.npy)
        extra = [c for c in ("caption", "size", "mtime_ns", "hash") if c in self.src.columns]
        table = pq.read_table(shard.parquet, columns=extra) if extra else None
        meta = {c: table.column(c).to_pylist() for c in extra} if table is not None else {}
        captions = meta.get("caption") or [None] * shard.rows
        roots = self.given_roots
        for a in range(0, shard.rows, _BLOCK):
            block, usable = _normalised(vecs[a : a + _BLOCK])
            todo: list[tuple[int, str, tuple[Any, Any, Any]]] = []
            for i in range(a, min(a + _BLOCK, shard.rows)):
                path = paths[i]
                if roots and not is_under(path, roots):
                    continue
                if path in existing:
                    self.report.already += 1
                elif not usable[i - a]:
                    self.report.unusable += 1
                else:
                    existing.add(path)  # a path repeated in the folder: its first row
                    recorded = tuple(meta[c][i] if c in meta else None for c in ("size", "mtime_ns", "hash"))
                    todo.append((i, path, recorded))
            facts = pool.map(_file_facts, todo) if pool is not None else map(_file_facts, todo)
            for (i, path, _), fact in zip(todo, facts, strict=True):
                self._insert(path, block[i - a], fact, captions[i], caption_key)
                done += 1
                if done % _PROGRESS_EVERY == 0:
                    self.progress("import", done, self.report.rows)
        self.progress("import", done, self.report.rows)
        return done

    def _insert(
        self, path: str, vector: np.ndarray, fact: tuple[int, int, str, bool] | None, caption: Any, key: str | None
    ) -> None:
        if fact is None:
            size, mtime_ns, content_hash = 0, 0, "missing:" + hash_bytes(to_bytes(path))
            self.report.missing += 1
            if len(self.report.missing_examples) < _EXAMPLES:
                self.report.missing_examples.append(path)
        else:
            size, mtime_ns, content_hash, hashed = fact
            self.report.hashed += int(hashed)
        fid = self.store.insert_file(path, size, mtime_ns, content_hash, vector)
        if key is not None and isinstance(caption, str) and caption.strip():
            self.store.put_caption(fid, key, content_hash, caption, None)
            self.report.captions += 1
        self.report.imported += 1
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.checkpoint_every:
            self._checkpoint()

    def _checkpoint(self, final: bool = False) -> None:
        """Commit the rows so far (the durable step); the FAISS file is rebuilt once, after the last."""
        if self._since_checkpoint:
            self.store.bump_generation()
            self.report.checkpoints += 1
        self.store.commit()
        self._since_checkpoint = 0
        if not final:
            self.store.begin()


def _normalised(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows as float32 L2-normalised, which rows are usable): float16 rounding is undone, float32 kept exact."""
    out = np.array(block, dtype=np.float32, order="C")
    finite = np.isfinite(out).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], out, 0.0), axis=1)
    usable = finite & (norms > 1e-6)
    fix = usable & (np.abs(norms - 1.0) > _NORM_TOLERANCE)
    out[fix] /= norms[fix, None]
    return out, usable


def _file_facts(item: tuple[int, str, tuple[Any, Any, Any]]) -> tuple[int, int, str, bool] | None:
    """(size, mtime_ns, content hash, whether it was read) of a row's file as ``cocatk index`` records them; None
    when there is no file. The recorded hash is trusted when size and mtime are the recorded ones (as an update
    trusts them)."""
    _, path, (size, mtime_ns, recorded) = item
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    if recorded and size == st.st_size and mtime_ns == st.st_mtime_ns:
        return st.st_size, st.st_mtime_ns, str(recorded), False
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, hash_bytes(data), True


def _record_roots(record: dict[str, Any] | None) -> list[str]:
    out = []
    for r in (record or {}).get("roots") or []:
        if isinstance(r, dict) and isinstance(r.get("path"), str):
            out.append(from_bytes(base64.b64decode(r["path_b64"])) if r.get("path_b64") else r["path"])
    return out


def _roots_for(paths: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """The roots of imported ``paths``: each ``preferred`` root that holds one, and the folder of every other path,
    less the folders below another root."""
    chosen: set[str] = set()
    folders: set[str] = set()
    for p in paths:
        root = next((r for r in preferred if is_under(p, [r])), None)
        if root is not None:
            chosen.add(root)
        else:
            folders.add(os.path.dirname(p))
    for f in sorted(folders, key=len):  # parents before their children
        if not _below(f, chosen):
            chosen.add(f)
    return sorted(chosen)


def _below(folder: str, roots: set[str]) -> bool:
    while True:
        if folder in roots:
            return True
        parent = os.path.dirname(folder)
        if parent == folder:
            return False
        folder = parent


__all__ = ["IMPORTED_CAPTIONS", "IMPORTED_CAPTION_SETTINGS", "ImportReport", "import_embeddings", "import_model"]
