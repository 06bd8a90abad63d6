"""The index layer: the one code that owns an index folder.

Folder layout (``cocatk index --index DIR``)::

    DIR/index.sqlite          SQLite (WAL): files, float32 embeddings, tokens, failures, manifest, generation
    DIR/vectors.<gen>.faiss   FAISS IndexIDMap2 (CPU) holding exactly the vectors of checkpoint <gen>
    DIR/manifest.json         a human-readable copy of the manifest (the SQLite copy is authoritative)
    DIR/index.lock            flock'ed by the one writer

:class:`IndexFolder` opens the folder, checks (or writes) the manifest against the model asked for, holds the
SQLite :class:`~cocatk.retrieval.store.Store`, the FAISS :class:`~cocatk.retrieval.vectors.VectorIndex` of the
committed checkpoint, the model named by the manifest, and the writer lock. With :mod:`.layout`, :mod:`.store` and
:mod:`.vectors` it is the index layer: the features above it (:mod:`.updater`, :mod:`.search`, :mod:`.captions`,
:mod:`.duplicates`, :mod:`.maintenance`, :mod:`.watch`) take an ``IndexFolder`` and use its public names only, and
:class:`cocatk.retrieval.index.Index` composes them for the Python API.

Crash safety. SQLite is the source of truth: every checkpoint commits one SQLite transaction (rows, embeddings,
tokens, failures, ``generation += 1``) and only then writes ``vectors.<gen>.faiss`` (temp file, fsync, rename,
fsync of the folder) and deletes older vector files. A FAISS file is therefore either complete or absent, and its
name says which committed state it holds. On open, when ``vectors.<generation>.faiss`` is missing (killed between
the two steps, or before the first save) or its count disagrees with SQLite, the vectors are rebuilt from the
embeddings stored in SQLite. A run killed at any moment (Ctrl-C, ``kill -9``) loses at most the work since the last
checkpoint; the next run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from .._version import __version__
from ..errors import (
    EmptyIndexError,
    IndexBusyError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    UsageError,
)
from .budget import apply_recorded_params
from .layout import LOCK_NAME, MANIFEST_NAME, ProgressCallback, vector_file_name
from .store import DB_NAME, SCHEMA_VERSION, Store, read_only_error
from .vectors import DEFAULT_FACTORY, VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import ModelChoice
    from ..models import ClipModel, CocaModel, ModelSpec


def identity_text(identity: dict[str, str]) -> str:
    return f"{identity.get('model')} ({identity.get('arch')}, weights {identity.get('weights')})"


class IndexFolder:
    """An index folder: SQLite store + FAISS vectors + manifest. Create or open it with :meth:`open`.

    Attributes for search code:
        store: the :class:`~cocatk.retrieval.store.Store` (``store.paths_for_ids(ids)``, ``hashes_for_ids``).
        vectors: the :class:`~cocatk.retrieval.vectors.VectorIndex` (``vectors.search(queries, k, id_selector)``).
        model: the :class:`~cocatk.models.CocaModel` named by the manifest, loaded on first use.
        manifest: model identity, embed_dim, image_size, factory, token shape, schema and cocatk versions.
        model_choice: when this :meth:`open` created the index with the machine's default model (no ``model``, no
            ``$COCATK_MODEL``), that model and why (:class:`~cocatk.config.ModelChoice`); else None.
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
        self._rerank_spec: ModelSpec | None = None
        self._rerank: ClipModel | None = None
        self._rebuild_requested = False
        self._vectors: VectorIndex | None = None
        self._vectors_gen = -1
        self._lock_fd: int | None = None
        self.model_choice: ModelChoice | None = None
        self._db_identity = _file_identity(folder / DB_NAME)

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
        rerank_model: str | None = None,
        rerank_pretrained: str | None = None,
        model_device: str | None = None,
        on_model_choice: Callable[[ModelChoice], None] | None = None,
    ) -> IndexFolder:
        """Open the index in ``folder`` (default :func:`cocatk.config.default_index_dir`).

        Args:
            folder: the index folder.
            model, pretrained: the model to check the index against (and to build a new index with). None means
                the manifest's model for an existing index (the machine is not consulted), and for a new one
                ``$COCATK_MODEL``, else the model that fits the machine (coca-l14 on a CUDA GPU, coca-b32 on the
                CPU: :func:`cocatk.config.default_model_choice`).
            device, precision: where the model runs when it is needed (encoding new images, queries).
            create: create the index when the folder holds none (otherwise IndexNotFoundError). The model is
                loaded first: when it cannot be (weights missing), nothing is written to disk.
            rebuild: when the index was built with another model, drop its contents (files, vectors, tokens,
                failures; roots are kept) and switch it to ``model``, instead of raising IndexMismatchError.
            lock: take the writer lock now and hold it until :meth:`close` (a writer then fails fast with
                IndexBusyError, before any model is loaded).
            progress: ``progress(stage, done, total)``; stage ``"model"`` while a model loads.
            rerank_model, rerank_pretrained: a CoCa that reranks this index's candidates by caption likelihood (any
                first-stage model). A writer (``lock``, ``create`` or ``rebuild``) records it in the manifest: the
                token cache (``update(cache_tokens=True)``) then holds that model's decoder tokens. A reader checks
                it against the recorded one.
            model_device: where a new index's default model will encode, when not ``device`` (a Ray run's driver
                loads its copy on the CPU, its actors encode); None: ``device``; ``"auto"``: ``$COCATK_DEVICE``,
                else a CUDA GPU when there is one.
            on_model_choice: called with the :class:`~cocatk.config.ModelChoice` when a new index takes the
                machine's default model, before that model loads (also kept as :attr:`model_choice`).

        Raises:
            IndexNotFoundError, IndexMismatchError (another model, or another rerank model than the one recorded),
            IndexBusyError (lock, create or rebuild while another process writes), IndexCorruptError,
            DecoderRequiredError (a rerank model that is not a CoCa), and model resolution and loading errors.
        """
        from ..models import resolve_model

        path = Path(folder).expanduser() if folder is not None else config.default_index_dir()
        path = path.resolve()
        exists = (path / DB_NAME).is_file()
        if not exists and not create:
            raise IndexNotFoundError(f"no index at {path}", hint=f"build one with `cocatk index PATH --index {path}`")
        new_spec = None
        choice = None
        if not exists:
            # Load the model before anything touches the disk: missing weights must not leave an index stub.
            if progress is not None:
                progress("model", 0, None)  # resolving imports open_clip: seconds, part of loading the model
            choice = _machine_choice(model, _choice_device(model_device, device), on_model_choice)
            new_spec = resolve_model(choice.name if choice else model, pretrained)
            _load_with_progress(new_spec, device, precision, progress)
            path.mkdir(parents=True, exist_ok=True)
        store = Store.open(path, create=True)
        index = cls(path, store, device=device, precision=precision)
        try:
            if lock:
                index._acquire_lock()
            index._rebuild_requested = rebuild
            index._open_checked(
                model,
                pretrained,
                new_spec,
                create=create,
                rebuild=rebuild,
                progress=progress,
                choice=choice,
                choice_device=_choice_device(model_device, device),
                on_model_choice=on_model_choice,
            )
            if rerank_model is not None or rerank_pretrained is not None:
                index.check_rerank_model(rerank_model, rerank_pretrained, write=lock or create or rebuild)
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
        choice: ModelChoice | None = None,
        choice_device: str | None = None,
        on_model_choice: Callable[[ModelChoice], None] | None = None,
    ) -> None:
        """Check (or write) the manifest against the requested model; see :meth:`open`."""
        from ..models import resolve_model

        manifest = self.store.manifest()
        if manifest is None and not create:
            return  # a stub left by an interrupted first run: it reads as an empty index
        if spec is None and (model is not None or pretrained is not None or manifest is None):
            # --pretrained alone on an existing index means "that index's model with these weights". Only a folder
            # without a manifest (a stub) takes the machine's default; an existing index keeps its recorded model.
            name = model if model is not None or manifest is None else manifest["model"]
            if manifest is None:
                choice = _machine_choice(model, choice_device, on_model_choice)
                name = choice.name if choice else model
            spec = resolve_model(name, pretrained)
        self._spec = spec
        if manifest is None:
            assert spec is not None
            with self.writer_lock():
                if self.store.manifest() is None:  # another creator may have won the race
                    _load_with_progress(spec, self._device, self._precision, progress)
                    self._init_manifest(spec)
                    self.model_choice = choice
            return
        if spec is not None and spec.identity() != manifest.get("identity"):
            if not rebuild:
                raise IndexMismatchError(
                    f"index {self.dir} was built with {identity_text(manifest.get('identity', {}))}, not "
                    f"{identity_text(spec.identity())}",
                    hint=f"re-encode everything with `cocatk index --index {self.dir} --rebuild --model {spec.name}"
                    f"{' --pretrained ' + spec.pretrained if pretrained else ''}`, or use another --index folder",
                )
            with self.writer_lock():
                _load_with_progress(spec, self._device, self._precision, progress)
                self._reset(spec)
        elif spec is not None and rebuild:
            with self.writer_lock():
                self._reset(spec)

    def check_rerank_model(self, name: str | None, pretrained: str | None, *, write: bool) -> None:
        """Check ``name`` against the rerank model the manifest records; a writer records it (see :meth:`open`)."""
        from ..errors import DecoderRequiredError
        from ..models import DECODER_HINT, resolve_model

        spec = resolve_model(name or (self.manifest.get("rerank_model") or {}).get("model"), pretrained)
        if not spec.has_decoder:
            raise DecoderRequiredError(
                f"--rerank-model {spec.name} is a {spec.kind} dual encoder: reranking by caption likelihood needs a "
                "CoCa",
                hint=DECODER_HINT,
            )
        self._rerank_spec = spec
        m = self.store.manifest()
        if m is None:
            return
        recorded = m.get("rerank_model")
        token_identity = (recorded or {}).get("identity") or m.get("identity")
        if recorded is not None and recorded.get("identity") == spec.identity():
            return
        # The token cache holds the decoder tokens of the recorded rerank model (or of the index's own CoCa).
        tokens_elsewhere = bool(m.get("token_shape")) and token_identity != spec.identity()
        # A reader without a recorded rerank model recomputes tokens from the files; a writer must not mix models.
        if (recorded is not None or (write and tokens_elsewhere)) and not (write and self._rebuild_requested):
            shown = recorded or {"identity": m.get("identity")}
            raise IndexMismatchError(
                f"index {self.dir} records rerank model {identity_text(shown.get('identity', {}))}, not "
                f"{identity_text(spec.identity())}",
                hint=f"pass --rerank-model {shown.get('model') or m.get('model')}, or switch the index's rerank "
                f"model (its cached tokens are recomputed): `cocatk index --index {self.dir} --rerank-model "
                f"{spec.name} --rebuild`",
            )
        if write:
            with self.writer_lock():
                self._set_rerank_model(spec, drop_tokens=tokens_elsewhere)

    def _set_rerank_model(self, spec: ModelSpec, *, drop_tokens: bool) -> None:
        m = self.manifest
        m["rerank_model"] = {"identity": spec.identity(), "model": spec.name, "pretrained": spec.pretrained}
        self.store.begin()
        if drop_tokens:  # another model's tokens: the next update backfills the new model's
            self.store.drop_tokens()
            m["token_shape"] = None
        self.store.set_manifest(m)
        self.store.commit()
        self.write_manifest_json()
        self._rerank = None

    @property
    def rerank_spec(self) -> ModelSpec | None:
        """The rerank CoCa asked for at :meth:`open`, else the one the manifest records, else None."""
        if self._rerank_spec is None:
            recorded = (self.store.manifest() or {}).get("rerank_model")
            if recorded:
                from ..models import resolve_model

                self._rerank_spec = resolve_model(recorded["model"], recorded["pretrained"])
        return self._rerank_spec

    @property
    def rerank_model(self) -> CocaModel | None:
        """The separate rerank CoCa (see :attr:`rerank_spec`), loaded on first use; None when there is none."""
        spec = self.rerank_spec
        if spec is None:
            return None
        if self._rerank is None:
            from ..models import load_model

            self._rerank = load_model(spec.name, spec.pretrained, device=self._device, precision=self._precision)
        return self._rerank  # type: ignore[return-value]

    @property
    def token_model(self) -> CocaModel:
        """The model whose decoder tokens the token cache holds: the recorded rerank model, else the index's."""
        return self.rerank_model or self.model  # type: ignore[return-value]

    def tokens_cached_for(self, spec: ModelSpec) -> bool:
        """True when the token cache (if any) holds ``spec``'s decoder tokens."""
        m = self.manifest
        recorded = (m.get("rerank_model") or {}).get("identity") or m.get("identity")
        return recorded == spec.identity()

    @property
    def is_empty(self) -> bool:
        """True when the index holds no images (also for a folder whose first run never recorded a model)."""
        return self.store.manifest() is None or self.store.count() == 0

    def _init_manifest(
        self, spec: ModelSpec, factory: str = DEFAULT_FACTORY, rerank_model: dict[str, Any] | None = None
    ) -> None:
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
            # None: not decided yet; the first update caches them (a CoCa reranks from them) unless told not to.
            "cache_tokens": None,
            "token_shape": None,
            # The CoCa that reranks (and whose decoder tokens the cache holds); None: the index's own model. Older
            # manifests lack the key, which reads the same: no migration.
            "rerank_model": rerank_model,
            "schema_version": SCHEMA_VERSION,
            "cocatk_version": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.store.begin()
        self.store.set_manifest(manifest)
        self.store.commit()
        self.write_manifest_json()

    def _reset(self, spec: ModelSpec) -> None:
        """Drop every file, vector, token and failure; keep the roots; switch the manifest to ``spec``."""
        old = self.store.manifest() or {}
        self.store.begin()
        self.store.clear()
        self.store.bump_generation()
        self.store.commit()
        self._vectors = None
        self._init_manifest(spec, old.get("factory", DEFAULT_FACTORY), old.get("rerank_model"))
        self.cleanup_vector_files(keep=None)

    def _load(self, spec: ModelSpec) -> CocaModel:
        from ..models import load_model

        self._model = load_model(spec.name, spec.pretrained, device=self._device, precision=self._precision)
        return self._model

    def close(self) -> None:
        self._release_lock()
        self.store.close()

    def item_sources(self, ids: Sequence[int], paths: Sequence[str | None] | None = None) -> list[Any]:
        """Where the image of each row lies, for a reader (:func:`cocatk.sources.source_bytes`): its file's path,
        or a :class:`~cocatk.sources.MemberRef` for an item of a shard; None for an id not in the index. ``paths``:
        the rows' stored paths when the caller has them."""
        from . import sourcestore

        paths = self.store.paths_for_ids([int(i) for i in ids]) if paths is None else paths
        refs = sourcestore.locations(self.store, ids)
        return [refs.get(int(i), p) for i, p in zip(ids, paths, strict=True)]

    def item_meta(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """id -> the JSON field (url, width, height, ...) of the dataset items among ``ids`` that have one."""
        from . import sourcestore

        return sourcestore.item_meta(self.store, ids)

    def missing_from_disk(self) -> str | None:
        """Why this open index no longer is the one on disk (its folder or database removed, or replaced by
        another index), or None while it still is. A long-lived reader (`cocatk serve`) asks before each use."""
        now = _file_identity(self.dir / DB_NAME)
        if now is None:
            return f"the index folder {self.dir} was removed (or its {DB_NAME}) while this process had it open"
        if now != self._db_identity:
            return f"the index at {self.dir} was replaced by another one while this process had it open"
        return None

    def __enter__(self) -> IndexFolder:
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
            self._vectors = self.load_vectors(gen)
            self._vectors_gen = gen
        return self._vectors

    @property
    def loaded_model(self) -> CocaModel | None:
        """The index's model when this object has loaded it already, else None (nothing is loaded)."""
        return self._model

    @property
    def device(self) -> str | None:
        """The device asked for at :meth:`open` (None: the default)."""
        return self._device

    @property
    def precision(self) -> str | None:
        """The precision asked for at :meth:`open` (None: the default)."""
        return self._precision

    def set_vectors(self, vectors: VectorIndex | None, gen: int) -> None:
        """Adopt ``vectors`` as the FAISS index of committed checkpoint ``gen`` (None: forget the in-memory copy, the
        next :attr:`vectors` reloads it); for a writer that has just saved (or rolled back) that state."""
        self._vectors, self._vectors_gen = vectors, gen

    @property
    def ntotal(self) -> int:
        """Number of indexed files (== FAISS vectors)."""
        return self.store.count()

    def vector_path(self, gen: int) -> Path:
        return self.dir / vector_file_name(gen)

    def load_vectors(self, gen: int, save: bool = False) -> VectorIndex:
        m = self.manifest
        factory = m.get("factory", DEFAULT_FACTORY)
        path = self.vector_path(gen)
        count = self.store.count()
        if path.is_file():
            try:
                vi = VectorIndex.load(path, factory)
                if vi.ntotal == count and vi.dim == int(m["embed_dim"]):
                    return apply_recorded_params(vi, m)  # the knobs a --max-index-memory choice recorded
            except IndexCorruptError:
                pass
        ids, vecs = self.store.all_embeddings(int(m["embed_dim"]))
        if len(ids) == 0:
            vi = VectorIndex.create(int(m["embed_dim"]), factory)
            if not vi.is_trained:
                return apply_recorded_params(vi, m)
        else:
            vi = VectorIndex.build(int(m["embed_dim"]), factory, ids, vecs)
        if save:
            vi.save(path)
            self.cleanup_vector_files(keep=gen)
        return apply_recorded_params(vi, m)

    def cleanup_vector_files(self, keep: int | None) -> None:
        for p in self.dir.glob("vectors.*.faiss*"):
            if keep is None or p.name != f"vectors.{keep}.faiss":
                with contextlib.suppress(OSError):
                    p.unlink()

    def write_manifest_json(self) -> None:
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
        (built without ``--cache-tokens``) or any id has none; then recompute with ``index.token_model.image_tokens``.
        The tokens are :attr:`token_model`'s (the recorded rerank model, else the index's own CoCa)."""
        m = self.manifest
        if not m.get("cache_tokens") or not m.get("token_shape"):
            return None
        arr = self.store.get_tokens([int(i) for i in ids], tuple(m["token_shape"]))
        if arr is None:
            return None
        import torch

        return torch.from_numpy(arr)

    def get_token_array(self, ids: Sequence[int] | np.ndarray) -> np.ndarray | None:
        """As :meth:`get_tokens`, as a numpy float16 array (N, T, D): for the torch-free rerank."""
        m = self.manifest
        if not m.get("cache_tokens") or not m.get("token_shape"):
            return None
        return self.store.get_tokens([int(i) for i in ids], tuple(m["token_shape"]))

    # ---- writer lock -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
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
        if self.store.read_only:
            raise read_only_error(self.dir)
        try:
            fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise read_only_error(self.dir) from e
        except OSError as e:
            if e.errno == errno.EROFS:
                raise read_only_error(self.dir) from e
            raise
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


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


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


def _choice_device(model_device: str | None, device: str | None) -> str | None:
    """The device a new index's default model is chosen for (see ``model_device`` in :meth:`Index.open`)."""
    if model_device == "auto":
        return None
    return model_device or device


def _machine_choice(
    model: str | None, device: str | None, on_model_choice: Callable[[ModelChoice], None] | None
) -> ModelChoice | None:
    """The machine's default model for a new index when ``model`` is None and ``$COCATK_MODEL`` names none (then
    ``on_model_choice`` hears it); None when the user named the model."""
    if model is not None:
        return None
    choice = config.default_model_choice(device)
    if choice.reason is None:  # $COCATK_MODEL: the user's own choice, nothing to tell
        return None
    if on_model_choice is not None:
        on_model_choice(choice)
    return choice


__all__ = ["IndexFolder", "identity_text"]
