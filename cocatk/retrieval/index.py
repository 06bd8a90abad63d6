"""An image index folder: open it, update it incrementally, check it.

Folder layout (``cocatk index --index DIR``)::

    DIR/index.sqlite          SQLite (WAL): files, float32 embeddings, tokens, failures, manifest, generation
    DIR/vectors.<gen>.faiss   FAISS IndexIDMap2 (CPU) holding exactly the vectors of checkpoint <gen>
    DIR/manifest.json         a human-readable copy of the manifest (the SQLite copy is authoritative)
    DIR/index.lock            flock'ed by the one writer

Crash safety. SQLite is the source of truth: every checkpoint commits one SQLite transaction (rows, embeddings,
tokens, failures, ``generation += 1``) and only then writes ``vectors.<gen>.faiss`` (temp file, fsync, rename,
fsync of the folder) and deletes older vector files. A FAISS file is therefore either complete or absent, and its
name says which committed state it holds. On open, when ``vectors.<generation>.faiss`` is missing (killed between
the two steps, or before the first save) or its count disagrees with SQLite, the vectors are rebuilt from the
embeddings stored in SQLite. A run killed at any moment (Ctrl-C, ``kill -9``) loses at most the work since the last
checkpoint; the next run resumes.

Example:
    >>> from cocatk import Index
    >>> index = Index.open("~/.local/share/cocatk/index", model="coca-b32", create=True)   # doctest: +SKIP
    >>> report = index.update(["~/Pictures"])                                              # doctest: +SKIP
    >>> report.new, report.images_per_s                                                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from .._version import __version__
from ..errors import (
    CocatkError,
    EmptyIndexError,
    IndexBusyError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    UsageError,
)
from ..images import DEFAULT_MAX_MEGAPIXELS, ImageDecodeError, find_images, load_image
from .store import DB_NAME, SCHEMA_VERSION, FileRow, Store
from .vectors import DEFAULT_FACTORY, VectorIndex, min_training_points

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..models import CocaModel, ModelSpec
    from .search import Hit

#: Files per checkpoint: a killed run loses at most this much work.
DEFAULT_CHECKPOINT_EVERY = 256
#: ``--cache-tokens`` is refused when the cache would exceed this (bytes = images x T x D x 2).
DEFAULT_TOKEN_CACHE_LIMIT_GB = 8.0
#: The FAISS file is rewritten at every checkpoint while it is small; above this, at most every
#: ``_BIG_SAVE_INTERVAL_S`` (SQLite still commits every checkpoint, and a stale FAISS file is rebuilt from it).
_SMALL_FAISS_BYTES = 256 << 20
_BIG_SAVE_INTERVAL_S = 60.0
LOCK_NAME = "index.lock"
#: Seconds between progress reports of stages without a known total (scanning).
_PROGRESS_INTERVAL_S = 0.2
_RETRY_REASONS = ("too large", "unsupported format")
MANIFEST_NAME = "manifest.json"

#: progress(stage, done, total): stage is "scan" (total None) or "index" (files processed of the files to look at).
ProgressCallback = Callable[[str, int, "int | None"], None]


@dataclass
class IndexReport:
    """What one :meth:`Index.update` did. ``to_dict()`` gives the JSON the CLI prints."""

    index_dir: str
    roots: list[str]
    scanned: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    duplicates: int = 0
    removed: int = 0
    encoded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    missing_roots: list[str] = field(default_factory=list)
    tokens_cached: int = 0
    token_cache_bytes: int = 0
    checkpoints: int = 0
    total: int = 0
    seconds: float = 0.0
    #: Where the time went, in seconds. Main thread (they add up to ``seconds``): ``scan``, ``model_load``,
    #: ``wait_decode`` (blocked on the decode threads), ``model`` (image tower), ``sqlite`` (rows, tokens, commits),
    #: ``faiss`` (load, add, save), ``other``. Decode threads, summed over threads and overlapping the main thread:
    #: ``read_hash`` and ``decode_preprocess``; ``decode_threads`` says how many there were.
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def images_per_s(self) -> float:
        """Images through the model per second of the whole run (scan, decode and save included)."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed_total"] = self.failed_total
        d["images_per_s"] = round(self.images_per_s, 1)
        d["seconds"] = round(self.seconds, 3)
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        d["failures"] = [_json_failure(f) for f in self.failures]
        return d


@dataclass
class CheckReport:
    """Result of :meth:`Index.check`: ``ok`` when SQLite and FAISS agree."""

    ok: bool
    problems: list[str]
    files: int
    vectors: int
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StageTimer:
    """Seconds per stage on one thread; time in a nested stage is not counted in the stage around it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0

    def _charge(self, now: float) -> None:
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._stack.append(stage)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()


@dataclass
class _Item:
    """One file to look at in an update."""

    path: str
    size: int
    mtime_ns: int
    row: FileRow | None  # the existing row (changed, or token backfill), None for a new path
    need_decode: bool = False  # token backfill: decode even when the hash is known


@dataclass
class _Prepared:
    item: _Item
    hash: str | None = None
    tensor: Any = None  # (3, S, S) preprocessed image, or None when not decoded
    error: ImageDecodeError | None = None
    read_s: float = 0.0  # decode thread: reading and hashing the file
    decode_s: float = 0.0  # decode thread: decoding and preprocessing


def _hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def _identity_text(identity: dict[str, str]) -> str:
    return f"{identity.get('model')} ({identity.get('arch')}, weights {identity.get('weights')})"


class Index:
    """An index folder: SQLite store + FAISS vectors + manifest. Create or open it with :meth:`open`.

    Attributes for search code:
        store: the :class:`~cocatk.retrieval.store.Store` (``store.paths_for_ids(ids)``, ``hashes_for_ids``).
        vectors: the :class:`~cocatk.retrieval.vectors.VectorIndex` (``vectors.search(queries, k, id_selector)``).
        model: the :class:`~cocatk.models.CocaModel` named by the manifest, loaded on first use.
        manifest: model identity, embed_dim, image_size, factory, token shape, schema and cocatk versions.
    """

    def __init__(
        self,
        folder: Path,
        store: Store,
        device: str | None = None,
        precision: str | None = None,
        spec: ModelSpec | None = None,
    ) -> None:
        self.dir = folder
        self.store = store
        self._device = device
        self._precision = precision
        self._spec = spec
        self._model: CocaModel | None = None
        self._vectors: VectorIndex | None = None
        self._vectors_gen = -1
        self._lock_fd: int | None = None

    # ---- opening -----------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str] | None = None,
        model: str | None = None,
        pretrained: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        *,
        create: bool = False,
        rebuild: bool = False,
        lock: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Index:
        """Open the index in ``folder`` (default :func:`cocatk.config.default_index_dir`).

        Args:
            folder: the index folder.
            model, pretrained: the model to check the index against (and to build a new index with). None means
                the manifest's model for an existing index, and the default model for a new one.
            device, precision: where the model runs when it is needed (encoding new images, queries).
            create: create the index when the folder holds none (otherwise IndexNotFoundError). The model is
                loaded first: when it cannot be (weights missing), nothing is written to disk.
            rebuild: when the index was built with another model, drop its contents (files, vectors, tokens,
                failures; roots are kept) and switch it to ``model``, instead of raising IndexMismatchError.
            lock: take the writer lock now and hold it until :meth:`close` (a writer then fails fast with
                IndexBusyError, before any model is loaded).
            progress: ``progress(stage, done, total)``; stage ``"model"`` while a model loads.

        Raises:
            IndexNotFoundError, IndexMismatchError, IndexBusyError (lock, create or rebuild while another process
            writes), IndexCorruptError, and model resolution and loading errors.
        """
        from ..models import resolve_model

        path = Path(folder).expanduser() if folder is not None else config.default_index_dir()
        path = path.resolve()
        exists = (path / DB_NAME).is_file()
        if not exists and not create:
            raise IndexNotFoundError(f"no index at {path}", hint=f"build one with `cocatk index PATH --index {path}`")
        new_spec = None
        if not exists:
            # Load the model before anything touches the disk: missing weights must not leave an index stub.
            new_spec = resolve_model(model, pretrained)
            _load_with_progress(new_spec, device, precision, progress)
            path.mkdir(parents=True, exist_ok=True)
        store = Store.open(path, create=True)
        index = cls(path, store, device=device, precision=precision)
        try:
            if lock:
                index._acquire_lock()
            index._open_checked(model, pretrained, new_spec, create=create, rebuild=rebuild, progress=progress)
        except BaseException:
            index.close()
            raise
        return index

    def _open_checked(
        self,
        model: str | None,
        pretrained: str | None,
        spec: ModelSpec | None,
        *,
        create: bool,
        rebuild: bool,
        progress: ProgressCallback | None,
    ) -> None:
        """Check (or write) the manifest against the requested model; see :meth:`open`."""
        from ..models import resolve_model

        manifest = self.store.manifest()
        if manifest is None and not create:
            return  # a stub left by an interrupted first run: it reads as an empty index
        if spec is None and (model is not None or pretrained is not None or manifest is None):
            # --pretrained alone on an existing index means "that index's model with these weights".
            name = model if model is not None or manifest is None else manifest["model"]
            spec = resolve_model(name, pretrained)
        self._spec = spec
        if manifest is None:
            assert spec is not None
            with self._writer_lock():
                if self.store.manifest() is None:  # another creator may have won the race
                    _load_with_progress(spec, self._device, self._precision, progress)
                    self._init_manifest(spec)
            return
        if spec is not None and spec.identity() != manifest.get("identity"):
            if not rebuild:
                raise IndexMismatchError(
                    f"index {self.dir} was built with {_identity_text(manifest.get('identity', {}))}, not "
                    f"{_identity_text(spec.identity())}",
                    hint=f"re-encode everything with `cocatk index --index {self.dir} --rebuild --model {spec.name}"
                    f"{' --pretrained ' + spec.pretrained if pretrained else ''}`, or use another --index folder",
                )
            with self._writer_lock():
                _load_with_progress(spec, self._device, self._precision, progress)
                self._reset(spec)
        elif spec is not None and rebuild:
            with self._writer_lock():
                self._reset(spec)

    @property
    def is_empty(self) -> bool:
        """True when the index holds no images (also for a folder whose first run never recorded a model)."""
        return self.store.manifest() is None or self.store.count() == 0

    def _init_manifest(self, spec: ModelSpec, factory: str = DEFAULT_FACTORY) -> None:
        model = self._load(spec)
        VectorIndex.validate_factory(model.embed_dim, factory)
        manifest = {
            "identity": spec.identity(),
            "model": spec.name,
            "pretrained": spec.pretrained,
            "embed_dim": model.embed_dim,
            "image_size": model.image_size,
            "normalized": True,
            "metric": "inner_product",
            "factory": factory,
            "cache_tokens": False,
            "token_shape": None,
            "schema_version": SCHEMA_VERSION,
            "cocatk_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.store.begin()
        self.store.set_manifest(manifest)
        self.store.commit()
        self._write_manifest_json()

    def _reset(self, spec: ModelSpec) -> None:
        """Drop every file, vector, token and failure; keep the roots; switch the manifest to ``spec``."""
        old = self.store.manifest() or {}
        self.store.begin()
        self.store.conn.execute("DELETE FROM tokens")
        self.store.conn.execute("DELETE FROM files")
        self.store.conn.execute("DELETE FROM failures")
        self.store.bump_generation()
        self.store.commit()
        self._vectors = None
        self._init_manifest(spec, old.get("factory", DEFAULT_FACTORY))
        self._cleanup_vector_files(keep=None)

    def _load(self, spec: ModelSpec) -> CocaModel:
        from ..models import load_model

        self._model = load_model(spec.name, spec.pretrained, device=self._device, precision=self._precision)
        return self._model

    def close(self) -> None:
        self._release_lock()
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- facts -------------------------------------------------------------------------------------------------
    @property
    def manifest(self) -> dict[str, Any]:
        m = self.store.manifest()
        if m is None:  # a folder whose first `cocatk index` never recorded a model
            raise EmptyIndexError(
                f"the index at {self.dir} is empty: its first `cocatk index` run did not finish",
                hint=f"run `cocatk index PATH --index {self.dir}`",
            )
        return m

    @property
    def dim(self) -> int:
        return int(self.manifest["embed_dim"])

    @property
    def model(self) -> CocaModel:
        """The model that built the index (from the manifest), loaded on first use."""
        if self._model is None:
            from ..models import load_model

            m = self.manifest
            model = load_model(m["model"], m["pretrained"], device=self._device, precision=self._precision)
            if model.embed_dim != int(m["embed_dim"]):
                raise IndexMismatchError(
                    f"model {m['model']} gives {model.embed_dim}-d embeddings, the index holds {m['embed_dim']}-d",
                    hint=f"rebuild with `cocatk index --index {self.dir} --rebuild`",
                )
            self._model = model
        return self._model

    @property
    def vectors(self) -> VectorIndex:
        """The FAISS index of the last committed checkpoint (rebuilt in memory from SQLite when stale)."""
        gen = self.store.generation
        if self._vectors is None or self._vectors_gen != gen:
            self._vectors = self._load_vectors(gen)
            self._vectors_gen = gen
        return self._vectors

    @property
    def ntotal(self) -> int:
        """Number of indexed files (== FAISS vectors)."""
        return self.store.count()

    def _vector_path(self, gen: int) -> Path:
        return self.dir / f"vectors.{gen}.faiss"

    def _load_vectors(self, gen: int, save: bool = False) -> VectorIndex:
        m = self.manifest
        factory = m.get("factory", DEFAULT_FACTORY)
        path = self._vector_path(gen)
        count = self.store.count()
        if path.is_file():
            try:
                vi = VectorIndex.load(path, factory)
                if vi.ntotal == count and vi.dim == int(m["embed_dim"]):
                    return vi
            except IndexCorruptError:
                pass
        ids, vecs = self.store.all_embeddings(int(m["embed_dim"]))
        if len(ids) == 0:
            vi = VectorIndex.create(int(m["embed_dim"]), factory)
            if not vi.is_trained:
                return vi
        else:
            vi = VectorIndex.build(int(m["embed_dim"]), factory, ids, vecs)
        if save:
            vi.save(path)
            self._cleanup_vector_files(keep=gen)
        return vi

    def _cleanup_vector_files(self, keep: int | None) -> None:
        for p in self.dir.glob("vectors.*.faiss*"):
            if keep is None or p.name != f"vectors.{keep}.faiss":
                with contextlib.suppress(OSError):
                    p.unlink()

    def _write_manifest_json(self) -> None:
        import json

        tmp = self.dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.dir / MANIFEST_NAME)

    # ---- search-side helpers -----------------------------------------------------------------------------------
    def embeddings(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Stored embeddings (N, D) float32 of ``ids``, in order. Raises UsageError for an unknown id."""
        try:
            return self.store.embeddings([int(i) for i in ids], self.dim)
        except KeyError as e:
            raise UsageError(f"id {e.args[0]} is not in the index", hint="use ids returned by a search") from e

    def get_tokens(self, ids: Sequence[int] | np.ndarray) -> torch.Tensor | None:
        """Cached decoder tokens (N, T, D) float16 (CPU) of ``ids``, or None when the index does not cache tokens
        (built without ``--cache-tokens``) or any id has none; then recompute with ``index.model.image_tokens``."""
        m = self.manifest
        if not m.get("cache_tokens") or not m.get("token_shape"):
            return None
        arr = self.store.get_tokens([int(i) for i in ids], tuple(m["token_shape"]))
        if arr is None:
            return None
        import torch

        return torch.from_numpy(arr)

    # ---- writer lock -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer_lock(self) -> Iterator[None]:
        if self._lock_fd is not None:  # re-entrant within one Index
            yield
            return
        self._acquire_lock()
        try:
            yield
        finally:
            self._release_lock()

    def _acquire_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no cross-process writer guard
            return
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise IndexBusyError(
                f"index {self.dir} is busy: another cocatk process is writing to it",
                hint="wait for the other `cocatk index` to finish (or stop it) and run again",
            ) from e
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # ---- update ------------------------------------------------------------------------------------------------
    def update(
        self,
        paths: Sequence[str | os.PathLike[str]] | None = None,
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        follow_symlinks: bool = False,
        max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
        faiss_factory: str | None = None,
        cache_tokens: bool = False,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        token_cache_limit_gb: float = DEFAULT_TOKEN_CACHE_LIMIT_GB,
        progress: ProgressCallback | None = None,
    ) -> IndexReport:
        """Bring the index up to date with ``paths`` (default: every root already in the index).

        New and changed files (size or mtime differ, then content hash) are decoded in ``workers`` threads while the
        model encodes earlier batches; files whose content is already indexed are not re-encoded (a moved or
        renamed file keeps its id, an identical copy gets a new row with the same embedding); files gone from the
        scanned roots are removed. Undecodable files are recorded as failures with a reason, never fatal.

        Args:
            paths: image files and folders; stored as roots (absolute, resolved).
            batch_size: images per forward pass (default the model's).
            workers: decode threads (default min(8, cores)); 0 decodes in the calling thread.
            follow_symlinks: follow symlinked files and folders (with a cycle guard).
            max_megapixels: skip images with more pixels as ``too large``.
            faiss_factory: a FAISS factory (``HNSW32``, ``IVF4096,PQ64``) replacing the exact ``Flat`` index;
                changing it rebuilds the FAISS index from the stored vectors, nothing is re-encoded.
            cache_tokens: also store every image's decoder tokens (fp16) for reranking without decoding; once on,
                the index keeps caching. Refused above ``token_cache_limit_gb``.
            checkpoint_every: files per checkpoint (SQLite commit, then FAISS save).
            progress: ``progress(stage, done, total)`` callback (the library never prints).

        Returns:
            An :class:`IndexReport`.

        Raises:
            IndexBusyError: another process is writing. UsageError: a path does not exist, a bad factory, a token
            cache too large. Model errors when the model is needed and cannot be loaded.
        """
        if checkpoint_every < 1:
            raise UsageError(f"checkpoint_every must be >= 1, got {checkpoint_every}", hint="pass a positive number")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}", hint="pass --batch-size 1 or more")
        with self._writer_lock():
            return _Updater(
                self,
                paths=paths,
                batch_size=batch_size,
                workers=workers,
                follow_symlinks=follow_symlinks,
                max_megapixels=max_megapixels,
                faiss_factory=faiss_factory,
                cache_tokens=cache_tokens,
                checkpoint_every=checkpoint_every,
                token_cache_limit_gb=token_cache_limit_gb,
                progress=progress,
            ).run()

    # ---- search ------------------------------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        image: str | os.PathLike[str] | None = None,
        negative: Sequence[str] = (),
        n: int = 10,
        rerank: bool = True,
        rerank_k: int = 50,
        under: str | os.PathLike[str] | None = None,
    ) -> list[Hit]:
        """Top-``n`` images for a text and/or image query, reranked by caption log-likelihood (text queries).

        See :func:`cocatk.retrieval.search.search_index`, which also returns timings and dropped candidates.

        Example:
            >>> [h.path for h in Index.open().search("a red bicycle", n=3)]   # doctest: +SKIP
        """
        from .search import search_index

        return search_index(self, text, image, negative, n=n, rerank=rerank, rerank_k=rerank_k, under=under).hits

    # ---- maintenance -------------------------------------------------------------------------------------------
    def forget(self, roots: Sequence[str | os.PathLike[str]]) -> dict[str, Any]:
        """Drop roots from the index with every file, vector, token and failure below them (an old drive, a folder
        you no longer want searched). Nothing on disk outside the index folder is touched.

        Returns:
            ``{"roots": [...], "files": N}``: the roots dropped and how many indexed files went with them.

        Raises:
            UsageError: a path is not one of the index's roots. IndexBusyError: another process is writing.
        """
        with self._writer_lock():
            stored = self.store.roots()
            targets: list[str] = []
            for p in roots:
                candidates = {os.path.abspath(os.path.expanduser(os.fspath(p)))}
                with contextlib.suppress(OSError):
                    candidates.add(str(Path(p).expanduser().resolve()))
                match = next((r for r in stored if r in candidates), None)
                if match is None:
                    from ..paths import display_path

                    listed = ", ".join(display_path(r) for r in stored) or "none"
                    raise UsageError(
                        f"{display_path(os.fspath(p))} is not a root of the index at {self.dir}",
                        hint=f"pass one of its roots ({listed}); `cocatk info` lists them",
                    )
                targets.append(match)
            ids = np.unique(np.concatenate([self.store.ids_under(r) for r in targets] or [np.zeros(0, np.int64)]))
            vectors = self.vectors if self.store.manifest() is not None else None
            failed = [f for f in self.store.failure_rows() if _under(f, targets)]
            self.store.begin()
            try:
                self.store.delete_files(ids.tolist())
                self.store.delete_failures(failed)
                for r in targets:
                    self.store.remove_root(r)
                gen = self.store.bump_generation()
                self.store.commit()
            except BaseException:
                self.store.rollback()
                raise
            # SQLite is committed; the FAISS file of the new generation follows (rebuilt from SQLite if we die here).
            if vectors is not None and vectors.remove(ids):
                vectors.save(self._vector_path(gen))
                self._cleanup_vector_files(keep=gen)
                self._vectors, self._vectors_gen = vectors, gen
            elif vectors is not None:
                self._vectors = self._load_vectors(gen, save=True)
                self._vectors_gen = gen
            return {"index_dir": str(self.dir), "roots": targets, "files": int(len(ids))}

    def compact(self) -> dict[str, Any]:
        """Reclaim disk space: fold the SQLite write-ahead log back, VACUUM the database, delete stale vector and
        temporary files. Searches may run meanwhile; writers wait (the writer lock is held).

        Returns:
            ``{"before_bytes", "after_bytes", "reclaimed_bytes", "removed_files"}``.
        """
        with self._writer_lock():
            before = _folder_bytes(self.dir)
            conn = self.store.conn
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            gen = self.store.generation
            removed = []
            keep = self._vector_path(gen).name
            for p in self.dir.iterdir():
                stale = p.name.startswith("vectors.") and p.name != keep
                if stale or p.name.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        p.unlink()
                        removed.append(p.name)
            if self.store.manifest() is not None and self.store.count():
                self._vectors = self._load_vectors(gen, save=True)  # writes the current file when it was missing
                self._vectors_gen = gen
            after = _folder_bytes(self.dir)
            return {
                "index_dir": str(self.dir),
                "before_bytes": before,
                "after_bytes": after,
                "reclaimed_bytes": before - after,
                "removed_files": sorted(removed),
            }

    # ---- info and check ----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Manifest, counts, roots, size on disk and failures, as plain data."""
        failures = self.store.failures()
        size = _folder_bytes(self.dir)
        gen = self.store.generation
        return {
            "index_dir": str(self.dir),
            "manifest": self.store.manifest(),  # None: the first run never recorded a model (an empty index)
            "files": self.store.count(),
            "unique_contents": int(self.store.conn.execute("SELECT COUNT(DISTINCT hash) FROM files").fetchone()[0]),
            "roots": self.store.roots(),
            "generation": gen,
            "faiss_file": self._vector_path(gen).name if self._vector_path(gen).is_file() else None,
            "size_bytes": size,
            "token_cache_bytes": self.store.token_bytes(),
            "failed": dict(Counter(f["reason"] for f in failures)),
            "failures": [_json_failure(f) for f in failures],
        }

    def check(self) -> CheckReport:
        """Verify that SQLite and FAISS agree: same ids, same count, same vectors (exact for Flat), tokens only
        for indexed files, every file under a root, SQLite integrity. Does not modify anything."""
        problems = list(self.store.integrity_problems())
        m = self.manifest
        store_ids = self.store.ids()
        vi = self._load_vectors(self.store.generation)
        faiss_ids = np.sort(vi.ids())
        if len(faiss_ids) != vi.ntotal:
            problems.append(f"faiss id map has {len(faiss_ids)} ids for {vi.ntotal} vectors")
        if len(np.unique(faiss_ids)) != len(faiss_ids):
            problems.append("faiss holds duplicate ids")
        if not np.array_equal(faiss_ids, store_ids):
            only_s = np.setdiff1d(store_ids, faiss_ids)[:5].tolist()
            only_f = np.setdiff1d(faiss_ids, store_ids)[:5].tolist()
            problems.append(f"ids differ: only in sqlite {only_s}, only in faiss {only_f}")
        elif len(store_ids) and m.get("factory", DEFAULT_FACTORY) == "Flat":
            stored = self.store.embeddings(store_ids.tolist(), self.dim)
            if not np.array_equal(vi.reconstruct(store_ids), stored):
                problems.append("faiss vectors differ from the stored embeddings")
        if len(store_ids):
            _, vecs = self.store.all_embeddings(self.dim)
            norms = np.linalg.norm(vecs, axis=1)
            if not np.allclose(norms, 1.0, atol=1e-3):
                problems.append("some stored embeddings are not L2-normalised")
        tok_ids = self.store.token_ids()
        orphans = tok_ids - set(store_ids.tolist())
        if orphans:
            problems.append(f"{len(orphans)} token rows without a file")
        roots = self.store.roots()
        outside = [p for p in self.store.file_rows() if not _under(p, roots)]
        if outside:
            problems.append(f"{len(outside)} files outside every root, e.g. {outside[0]}")
        return CheckReport(not problems, problems, len(store_ids), vi.ntotal, len(tok_ids))


class _Updater:
    """One incremental update (the writer lock is held by the caller)."""

    def __init__(self, index: Index, **opts: Any) -> None:
        self.index = index
        self.store = index.store
        self.opts = opts
        self.progress: ProgressCallback = opts["progress"] or (lambda stage, done, total: None)
        self.report = IndexReport(index_dir=str(index.dir), roots=[])
        self._last_save = time.monotonic()
        self._since_checkpoint = 0
        self._vectors_dirty = False  # FAISS could not apply a removal: rebuild from SQLite before saving
        self.timed = _StageTimer()
        self._thread_seconds = {"read_hash": 0.0, "decode_preprocess": 0.0}

    # -- setup --
    def _roots(self) -> list[str]:
        paths = self.opts["paths"]
        if paths:
            return resolve_roots(paths)
        stored = self.store.roots()
        if not stored:
            raise UsageError("no folders to index", hint="pass one or more PATHs: `cocatk index ~/Pictures`")
        roots = [r for r in stored if Path(r).exists()]
        # A missing root (unmounted drive) is reported, and its files are kept rather than deleted.
        self.report.missing_roots = [r for r in stored if r not in roots]
        return roots

    def _apply_options(self) -> None:
        m = self.index.manifest
        changed = False
        factory = self.opts["faiss_factory"]
        if factory and factory != m.get("factory"):
            VectorIndex.validate_factory(int(m["embed_dim"]), factory)
            m["factory"] = factory
            changed = True
        if self.opts["cache_tokens"] and not m.get("cache_tokens"):
            m["cache_tokens"] = True
            changed = True
        if changed:
            self.store.begin()
            self.store.set_manifest(m)
            self.store.bump_generation()  # the FAISS file of the old factory no longer matches
            self.store.commit()
            self.index._write_manifest_json()

    def run(self) -> IndexReport:
        t0 = time.monotonic()
        index = self.index
        roots = self._roots()
        self.report.roots = roots
        manifest = index.manifest
        factory = self.opts["faiss_factory"]
        if factory:
            VectorIndex.validate_factory(int(manifest["embed_dim"]), factory)

        # Scan before changing anything, so that a bad option fails fast.
        self.progress("scan", 0, None)
        last_report = time.monotonic()
        with self.timed("scan"):
            found: list[tuple[str, int, int]] = []
            for p in find_images(roots, follow_symlinks=self.opts["follow_symlinks"]):
                try:
                    st = p.stat()
                except OSError:
                    continue
                found.append((str(p), st.st_size, st.st_mtime_ns))
                now = time.monotonic()
                if now - last_report >= _PROGRESS_INTERVAL_S:
                    last_report = now
                    self.progress("scan", len(found), None)
            self.report.scanned = len(found)
            self.progress("scan", len(found), len(found))
            rows = self.store.file_rows()
            present = {p for p, _, _ in found}
            vanished = [r for path, r in rows.items() if path not in present and _under(path, roots)]

        if factory:
            expected = len(rows) - len(vanished) + sum(1 for p, _, _ in found if p not in rows)
            need = min_training_points(factory)
            if need and expected < need:
                raise UsageError(
                    f"FAISS factory '{factory}' needs at least {need} vectors to train; this index would hold "
                    f"{expected}",
                    hint="drop --faiss (exact search is fast below ~1M images) or use a smaller factory "
                    "such as HNSW32 or IVF64,Flat",
                )
        self._apply_options()
        manifest = index.manifest
        cache_tokens = bool(manifest.get("cache_tokens"))
        token_ids = self.store.token_ids() if cache_tokens else set()

        # A file that failed before is retried when it changes, or when the outcome may depend on options and
        # plugins ("too large", "unsupported format"); otherwise it is reported again without decoding.
        failures = self.store.failure_rows()
        stale_failures = [p for p in failures if _under(p, roots) and p not in present]
        todo: list[_Item] = []
        for path, size, mtime in found:
            row = rows.get(path)
            failure = failures.get(path) if row is None else None
            if failure is not None and failure[2:] == (size, mtime) and failure[0] not in _RETRY_REASONS:
                self.report.failed[failure[0]] = self.report.failed.get(failure[0], 0) + 1
                self.report.failures.append({"path": path, "reason": failure[0], "detail": failure[1]})
            elif row is None:
                todo.append(_Item(path, size, mtime, None))
            elif row.size != size or row.mtime_ns != mtime:
                todo.append(_Item(path, size, mtime, row))
            elif cache_tokens and row.id not in token_ids:
                todo.append(_Item(path, size, mtime, row, need_decode=True))
            else:
                self.report.unchanged += 1

        model = None
        if todo:
            with self.timed("model_load"):
                if index._model is None:
                    self.progress("model", 0, None)
                model = index.model
                self.progress("model", 1, 1)
            if cache_tokens:
                self._check_token_budget(model, len(rows) - len(vanished) + sum(1 for t in todo if t.row is None))

        # Vectors of the committed state; written now when stale, so that every later checkpoint is incremental.
        with self.timed("faiss"):
            vectors = index._load_vectors(self.store.generation, save=True)
        index._vectors, index._vectors_gen = vectors, self.store.generation
        self.vectors = vectors

        self.store.begin()
        try:
            with _cpu_threads(model, self._workers()):
                with self.timed("sqlite"):
                    self.store.add_roots(roots)
                    self.store.delete_failures(stale_failures + [t.path for t in todo])
                self._process(todo, vanished, model, cache_tokens)
                self._remove(vanished)
                self._checkpoint(final=True)
        except BaseException:
            # Roll back to the last checkpoint; the in-memory FAISS index is discarded with it.
            self.store.rollback()
            index._vectors = None
            raise
        self.report.total = self.store.count()
        self.report.token_cache_bytes = self.store.token_bytes()
        self.report.seconds = time.monotonic() - t0
        self.report.failures.sort(key=lambda f: f["path"])
        timings = dict.fromkeys(("scan", "model_load", "wait_decode", "model", "sqlite", "faiss"), 0.0)
        timings.update(self.timed.seconds)
        timings["other"] = max(0.0, self.report.seconds - sum(timings.values()))
        timings.update(self._thread_seconds, decode_threads=float(self._workers()))
        self.report.timings = timings
        return self.report

    def _check_token_budget(self, model: CocaModel, n: int) -> None:
        import torch

        m = self.index.manifest
        if not m.get("token_shape"):
            s = model.image_size
            shape = tuple(model.image_tokens(torch.zeros(1, 3, s, s)).shape[1:])
            m["token_shape"] = list(shape)
            self.store.begin()
            self.store.set_manifest(m)
            self.store.commit()
            self.index._write_manifest_json()
        t, d = m["token_shape"]
        estimate = n * t * d * 2
        limit = self.opts["token_cache_limit_gb"] * (1 << 30)
        if estimate > limit:
            raise UsageError(
                f"--cache-tokens would store {n} x {t} x {d} fp16 tokens = {estimate / (1 << 30):.1f} GiB "
                f"(limit {self.opts['token_cache_limit_gb']:g} GiB)",
                hint="drop --cache-tokens (search then recomputes tokens for its top-k candidates only), "
                "or index a smaller collection",
            )
        self.report.token_cache_bytes = estimate

    # -- the pipeline --
    def _prepare(self, item: _Item, known: set[str], draft: int, preprocess: Any) -> _Prepared:
        """Worker thread: read once, hash, and decode + preprocess only when the content is not indexed yet."""
        out = _Prepared(item)
        t = time.perf_counter()
        try:
            with open(item.path, "rb") as f:
                data = f.read()
        except OSError as e:
            out.error = ImageDecodeError("unreadable", e.strerror or type(e).__name__, item.path)
            return out
        out.hash = _hash_bytes(data)
        out.read_s = time.perf_counter() - t
        if not item.need_decode and out.hash in known:
            return out  # a move, a duplicate or a touch: the embedding is reused
        try:
            image = load_image(data, draft_size=draft, max_megapixels=self.opts["max_megapixels"])
            out.tensor = preprocess(image)
        except ImageDecodeError as e:
            e.path = item.path
            out.error = e
        except Exception as e:  # preprocessing failure on an odd image: skip the file, never the run
            out.error = ImageDecodeError("decode error", str(e)[:160], item.path)
        out.decode_s = time.perf_counter() - t - out.read_s
        return out

    def _workers(self) -> int:
        workers = self.opts["workers"]
        return min(8, os.cpu_count() or 1) if workers is None else int(workers)

    def _prepared(self, todo: list[_Item], known: set[str], model: CocaModel | None) -> Iterator[_Prepared]:
        """Prepared items in order, decoded by a thread pool that runs ahead of the model (bounded prefetch)."""
        if model is None:
            return
        draft, preprocess = model.image_size, model.preprocess
        workers = self._workers()
        if workers == 0:
            for item in todo:
                yield self._prepare(item, known, draft, preprocess)
            return
        batch = self.opts["batch_size"] or model.image_batch_size
        window = max(2 * batch, 4 * workers)  # about two batches decoded ahead of the one being encoded
        pending: deque[Future[_Prepared]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="cocatk-decode") as pool:
            it = iter(todo)
            try:
                for item in it:
                    pending.append(pool.submit(self._prepare, item, known, draft, preprocess))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for fut in pending:
                    fut.cancel()

    def _process(self, todo: list[_Item], vanished: list[FileRow], model: CocaModel | None, tokens: bool) -> None:
        store = self.store
        report = self.report
        known = {r.hash for r in store.file_rows().values()}
        vanished_by_hash: dict[str, list[FileRow]] = {}
        for r in vanished:
            vanished_by_hash.setdefault(r.hash, []).append(r)
        self._vanished_by_hash = vanished_by_hash
        bs = self.opts["batch_size"] or (model.image_batch_size if model else 32)
        batch: list[_Prepared] = []
        waiting: dict[str, list[_Prepared]] = {}  # hash -> items whose identical content is in `batch`
        done = 0
        total = len(todo)
        self.progress("index", 0, total)

        def flush() -> None:
            if not batch:
                return
            assert model is not None
            import torch

            with self.timed("model"):
                x = torch.stack([p.tensor for p in batch])
                emb, toks = model.encode_images_and_tokens(x, batch_size=len(batch), tokens=tokens)
                tok_np = toks.to(torch.float16).cpu().numpy() if toks is not None else None
            report.encoded += len(batch)
            with self.timed("sqlite"):
                for i, p in enumerate(batch):
                    fid = self._write(p, emb[i], tok_np[i] if tok_np is not None else None)
                    for follower in waiting.pop(p.hash or "", []):
                        self._write_copy(follower, fid)
            batch.clear()
            self._maybe_checkpoint()

        prepared = self._prepared(todo, known, model)
        while True:
            with self.timed("wait_decode"):
                prep = next(prepared, None)
            if prep is None:
                break
            with self.timed("sqlite"):
                self._handle(prep, model, batch, waiting, known)
                if len(batch) >= bs:
                    flush()
                # Every written row is complete (items still in `batch` are not written yet), so committing is safe.
                self._maybe_checkpoint()
            done += 1
            if done % 16 == 0 or done == total:
                self.progress("index", done, total)
        flush()
        self.progress("index", total, total)

    def _handle(
        self,
        prep: _Prepared,
        model: CocaModel | None,
        batch: list[_Prepared],
        waiting: dict[str, list[_Prepared]],
        known: set[str],
    ) -> None:
        """Main thread: record one prepared file (failure, touch, move, copy) or queue it in ``batch`` to encode."""
        store, report = self.store, self.report
        item = prep.item
        self._thread_seconds["read_hash"] += prep.read_s
        self._thread_seconds["decode_preprocess"] += prep.decode_s
        if prep.error is not None:
            self._fail(prep)
        elif item.row is not None and prep.hash == item.row.hash and not item.need_decode:
            store.update_stat(item.row.id, item.size, item.mtime_ns)  # touched, same content
            report.unchanged += 1
            self._tick()
        elif not item.need_decode and self._try_reuse(prep):
            self._tick()
        elif prep.hash in waiting:
            waiting[prep.hash].append(prep)
        else:
            if prep.tensor is None:  # hash looked known to the worker but its row is gone: decode now
                prep = self._decode_now(prep, model)
                if prep.error is not None:
                    self._fail(prep)
                    return
            known.add(prep.hash or "")
            waiting[prep.hash or ""] = []
            batch.append(prep)

    def _decode_now(self, prep: _Prepared, model: CocaModel | None) -> _Prepared:
        assert model is not None
        if prep.error is None:
            try:
                image = load_image(
                    prep.item.path, draft_size=model.image_size, max_megapixels=self.opts["max_megapixels"]
                )
                prep.tensor = model.preprocess(image)
            except ImageDecodeError as e:
                prep.error = e
        return prep

    def _try_reuse(self, prep: _Prepared) -> bool:
        """A new or changed file whose content is already indexed: move a vanished row, or copy an embedding."""
        item, h = prep.item, prep.hash or ""
        store, report = self.store, self.report
        movers = self._vanished_by_hash.get(h)
        if item.row is None and movers:
            row = movers.pop()
            store.update_stat(row.id, item.size, item.mtime_ns, path=item.path)
            report.moved += 1
            return True
        src = store.id_for_hash(h)
        if src is None:
            return False
        self._write_copy(prep, src)
        return True

    def _upsert(self, prep: _Prepared, emb: np.ndarray) -> int:
        """Insert a new row, or replace a known row's content (dropping its old vector); count it; return the id."""
        item = prep.item
        if item.row is None:
            self.report.new += 1
            return self.store.insert_file(item.path, item.size, item.mtime_ns, prep.hash or "", emb)
        fid = item.row.id
        self.store.update_content(fid, item.size, item.mtime_ns, prep.hash or "", emb)
        if not self.vectors.remove(np.array([fid])):
            self._vectors_dirty = True
        # Unchanged: size/mtime differed but the content hash did not (e.g. a touched file).
        if item.need_decode and prep.hash == item.row.hash:
            self.report.unchanged += 1
        else:
            self.report.changed += 1
        return fid

    def _add_vector(self, fid: int, emb: np.ndarray) -> None:
        if self.vectors.is_trained:
            with self.timed("faiss"):
                self.vectors.add(emb[None, :], np.array([fid]))
        self._tick()

    def _write(self, prep: _Prepared, emb: np.ndarray, tokens: np.ndarray | None) -> int:
        fid = self._upsert(prep, emb)
        if tokens is not None:
            self.store.put_tokens(fid, tokens)
            self.report.tokens_cached += 1
        self._add_vector(fid, emb)
        return fid

    def _write_copy(self, prep: _Prepared, src: int) -> None:
        """Index ``prep`` with the embedding (and tokens) of row ``src``, which has the same content."""
        emb = self.store.embeddings([src], self.index.dim)[0]
        fid = self._upsert(prep, emb)
        self.report.duplicates += 1
        if self.store.copy_tokens(src, fid):
            self.report.tokens_cached += 1
        self._add_vector(fid, emb)

    def _fail(self, prep: _Prepared) -> None:
        item, e = prep.item, prep.error
        assert e is not None
        self.store.record_failure(item.path, e.reason, e.detail, item.size, item.mtime_ns)
        if item.row is not None:  # an indexed file became unreadable: its old embedding is stale
            self.store.delete_files([item.row.id])
            if not self.vectors.remove(np.array([item.row.id])):
                self._vectors_dirty = True
        self.report.failed[e.reason] = self.report.failed.get(e.reason, 0) + 1
        self.report.failures.append({"path": item.path, "reason": e.reason, "detail": e.detail})
        self._tick()

    def _remove(self, vanished: list[FileRow]) -> None:
        gone = [r.id for rows in self._vanished_by_hash.values() for r in rows] if vanished else []
        if not gone:
            return
        with self.timed("sqlite"):
            self.store.delete_files(gone)
        with self.timed("faiss"):
            if not self.vectors.remove(np.array(gone, dtype=np.int64)):
                self._vectors_dirty = True
        self.report.removed += len(gone)
        self._since_checkpoint += len(gone)

    # -- checkpoints --
    def _tick(self) -> None:
        self._since_checkpoint += 1

    def _maybe_checkpoint(self) -> None:
        if self._since_checkpoint >= self.opts["checkpoint_every"]:
            self._checkpoint()

    def _checkpoint(self, final: bool = False) -> None:
        """Commit SQLite (the durable step), then save the matching FAISS file, then open the next transaction."""
        store = self.store
        wrote = self._since_checkpoint > 0
        if not wrote and not final:
            return
        with self.timed("sqlite"):
            gen = store.bump_generation() if wrote else store.generation
            store.commit()
        self._since_checkpoint = 0
        if wrote:
            self.report.checkpoints += 1
        with self.timed("faiss"):
            self._save_vectors(gen, final)
        if not final:
            store.begin()

    def _save_vectors(self, gen: int, final: bool) -> None:
        index, vi = self.index, self.vectors
        if self._vectors_dirty or not vi.is_trained or (final and vi.ntotal != self.store.count()):
            if not final:
                return  # rebuilt once at the end from SQLite; a crash before that rebuilds it on the next open
            vi = self.vectors = index._load_vectors(gen)
            self._vectors_dirty = False
        elif (
            not final
            and vi.ntotal * vi.dim * 4 > _SMALL_FAISS_BYTES
            and time.monotonic() - self._last_save < _BIG_SAVE_INTERVAL_S
        ):
            return
        path = index._vector_path(gen)
        if not path.is_file():
            vi.save(path)
            index._cleanup_vector_files(keep=gen)
        self._last_save = time.monotonic()
        index._vectors, index._vectors_gen = vi, gen


@contextlib.contextmanager
def _cpu_threads(model: CocaModel | None, workers: int) -> Iterator[None]:
    """On the CPU, give torch the cores the decode threads leave free, for the duration of an update.

    torch's OpenMP threads spin while they wait; with ``workers`` decode threads on the same cores they fight, and
    on a 2-core machine the tiny test model went from ~50 to ~500 images/s with one torch thread instead of two.
    """
    if model is None or not model.device.startswith("cpu") or workers == 0:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _json_failure(failure: dict[str, str]) -> dict[str, str]:
    """A failure for JSON: ``path`` (+ ``path_b64`` for a name that is not UTF-8), ``reason``, ``detail``."""
    from ..paths import json_path

    return {**json_path(failure["path"]), "reason": failure["reason"], "detail": failure["detail"]}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _load_with_progress(
    spec: ModelSpec, device: str | None, precision: str | None, progress: ProgressCallback | None
) -> CocaModel:
    """Load (or fetch from the process cache) the model of ``spec``, reporting stage ``"model"``."""
    from ..models import load_model

    if progress is not None:
        progress("model", 0, None)
    model = load_model(spec.name, spec.pretrained, device=device, precision=precision)
    if progress is not None:
        progress("model", 1, 1)
    return model


def resolve_roots(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Absolute, resolved, de-duplicated roots for ``cocatk index PATH...``.

    Raises:
        UsageError: a path does not exist (checked before anything is created or changed).
    """
    roots = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise UsageError(f"{p} does not exist", hint="pass existing image files or folders")
        roots.append(str(path.resolve()))
    return sorted(set(roots))


def open_index(folder: str | os.PathLike[str] | None = None, **kwargs: Any) -> Index:
    """Shorthand for :meth:`Index.open`."""
    return Index.open(folder, **kwargs)


__all__ = [
    "CheckReport",
    "CocatkError",
    "EmptyIndexError",
    "Index",
    "IndexReport",
    "ProgressCallback",
    "open_index",
]
