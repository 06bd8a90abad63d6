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
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
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
from ..images import DEFAULT_MAX_MEGAPIXELS
from .layout import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_TOKEN_CACHE_LIMIT_GB,
    LOCK_NAME,
    MANIFEST_NAME,
    ProgressCallback,
    is_under,
    json_failure,
    resolve_roots,
    vector_file_name,
)
from .search import Hit, search_index
from .store import DB_NAME, SCHEMA_VERSION, Store
from .updater import IndexReport, UpdateOptions, update_index
from .vectors import DEFAULT_FACTORY, VectorIndex

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import ModelChoice
    from ..models import ClipModel, CocaModel, ModelSpec
    from .duplicates import DuplicateReport
    from .encoder import Encoder


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


def _identity_text(identity: dict[str, str]) -> str:
    return f"{identity.get('model')} ({identity.get('arch')}, weights {identity.get('weights')})"


class Index:
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
    ) -> Index:
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
                index._check_rerank_model(rerank_model, rerank_pretrained, write=lock or create or rebuild)
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
            with self._writer_lock():
                if self.store.manifest() is None:  # another creator may have won the race
                    _load_with_progress(spec, self._device, self._precision, progress)
                    self._init_manifest(spec)
                    self.model_choice = choice
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

    def _check_rerank_model(self, name: str | None, pretrained: str | None, *, write: bool) -> None:
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
                f"index {self.dir} records rerank model {_identity_text(shown.get('identity', {}))}, not "
                f"{_identity_text(spec.identity())}",
                hint=f"pass --rerank-model {shown.get('model') or m.get('model')}, or switch the index's rerank "
                f"model (its cached tokens are recomputed): `cocatk index --index {self.dir} --rerank-model "
                f"{spec.name} --rebuild`",
            )
        if write:
            with self._writer_lock():
                self._set_rerank_model(spec, drop_tokens=tokens_elsewhere)

    def _set_rerank_model(self, spec: ModelSpec, *, drop_tokens: bool) -> None:
        m = self.manifest
        m["rerank_model"] = {"identity": spec.identity(), "model": spec.name, "pretrained": spec.pretrained}
        self.store.begin()
        if drop_tokens:  # another model's tokens: the next update backfills the new model's
            self.store.conn.execute("DELETE FROM tokens")
            m["token_shape"] = None
        self.store.set_manifest(m)
        self.store.commit()
        self._write_manifest_json()
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
        self._init_manifest(spec, old.get("factory", DEFAULT_FACTORY), old.get("rerank_model"))
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
        return self.dir / vector_file_name(gen)

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
        cache_tokens: bool | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        token_cache_limit_gb: float = DEFAULT_TOKEN_CACHE_LIMIT_GB,
        progress: ProgressCallback | None = None,
        encoder: Encoder | None = None,
        caption: Any = None,
        notify: Callable[[str], None] | None = None,
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
            cache_tokens: store every image's decoder tokens (fp16) for reranking without decoding (the default
                search's rerank then needs neither the files nor torch). None (default): keep the index's setting;
                a new CoCa index caches them, and leaves them out with a warning when they would exceed
                ``token_cache_limit_gb``. True: cache (an index built without them gets them, every image read
                again); refused above ``token_cache_limit_gb``. False: stop caching and drop the cached tokens.
            checkpoint_every: files per checkpoint (SQLite commit, then FAISS save).
            progress: ``progress(stage, done, total)`` callback (the library never prints).
            notify: told a one-line message before long extra work (the estimate of a token backfill).
            encoder: where embeddings come from (:mod:`cocatk.retrieval.encoder`); default: decode threads and the
                index's model in this process.
            caption: also caption images (``cocatk index --caption``): generation settings or a mapping of the
                fields to set. New and changed images are captioned from the tokens of the encoding pass (the image
                tower runs once); indexed images without a caption for these settings are captioned after it.

        Returns:
            An :class:`IndexReport`.

        Raises:
            IndexBusyError: another process is writing. UsageError: a path does not exist, a bad factory, a token
            cache too large. Model errors when the model is needed and cannot be loaded.
        """
        options = UpdateOptions(
            paths=tuple(os.fspath(p) for p in paths or ()),
            batch_size=batch_size,
            workers=workers,
            follow_symlinks=follow_symlinks,
            max_megapixels=max_megapixels,
            faiss_factory=faiss_factory,
            cache_tokens=cache_tokens,
            checkpoint_every=checkpoint_every,
            token_cache_limit_gb=token_cache_limit_gb,
            progress=progress,
            notify=notify,
            encoder=encoder,
            caption=caption,
        )
        with self._writer_lock():
            report = update_index(self, options)
            if caption is not None and not self.is_empty:
                from .captions import caption_index

                rest = caption_index(self, caption, progress=progress)  # unchanged, moved or copied files
                report.captioned += rest.captioned
        if encoder is None:  # a Ray run's driver holds no model: its next local run exports
            self._prepare_text_onnx(report, progress)
        return report

    def _prepare_text_onnx(self, report: IndexReport, progress: ProgressCallback | None) -> None:
        """Export the model's text tower for torch-free text queries (:mod:`cocatk.textonnx`) unless that was done
        (or found impossible) before for this model; loads the model when this run did not need it. A failure is a
        warning on the report: the index is complete, text queries keep the torch path."""
        from .. import textonnx
        from ..errors import CocatkError

        if not config.text_onnx_enabled() or self.is_empty or not textonnx.available():
            return
        identity = self.manifest["identity"]
        if not textonnx.needs_export(identity):
            return
        t0 = time.perf_counter()
        if progress is not None:
            progress("text-onnx", 0, None)
        try:
            done = textonnx.export_text_onnx(self.model, identity)
            report.text_export = "exported" if done is not None else None  # None: a model it cannot export
        except CocatkError as e:  # the export's, or the model's when this run had to load it
            report.warnings.append(f"{e.message}; text queries load torch")
            report.text_export = "failed"
        report.timings["text_onnx"] = round(time.perf_counter() - t0, 3)  # after the run: not part of `seconds`

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
        *,
        reranker: str = "coca",
        rerank_model: str | None = None,
        rerank_pretrained: str | None = None,
        backend: str = "auto",
    ) -> list[Hit]:
        """Top-``n`` images for a text and/or image query, reranked by caption log-likelihood (text queries), or by
        BLIP-ITM (``reranker="blip-itm"``); ``rerank_model`` names a separate CoCa (or BLIP) for the rerank.

        See :func:`cocatk.retrieval.search.search_index`, which also returns timings and dropped candidates.

        Example:
            >>> [h.path for h in Index.open().search("a red bicycle", n=3)]   # doctest: +SKIP
        """
        return search_index(
            self,
            text,
            image,
            negative,
            n=n,
            rerank=rerank,
            rerank_k=rerank_k,
            under=under,
            reranker=reranker,
            backend=backend,
            rerank_model=rerank_model,
            rerank_pretrained=rerank_pretrained,
        ).hits

    def duplicates(
        self, threshold: float | None = None, under: str | os.PathLike[str] | None = None
    ) -> DuplicateReport:
        """Groups of exact and near-duplicate images, each with a suggested keeper; nothing is deleted.

        See :func:`cocatk.retrieval.duplicates.find_duplicates` (threshold: cosine in (0, 1], default per model).

        Example:
            >>> [len(g.files) for g in Index.open().duplicates(threshold=0.95).groups]   # doctest: +SKIP
        """
        from .duplicates import find_duplicates

        return find_duplicates(self, threshold=threshold, under=under)

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
            failed = [f for f in self.store.failure_rows() if is_under(f, targets)]
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
        from ..textonnx import describe

        failures = self.store.failures()
        size = _folder_bytes(self.dir)
        gen = self.store.generation
        manifest = self.store.manifest()
        return {
            "index_dir": str(self.dir),
            "manifest": manifest,  # None: the first run never recorded a model (an empty index)
            "files": self.store.count(),
            "unique_contents": int(self.store.conn.execute("SELECT COUNT(DISTINCT hash) FROM files").fetchone()[0]),
            "roots": self.store.roots(),
            "generation": gen,
            "faiss_file": self._vector_path(gen).name if self._vector_path(gen).is_file() else None,
            "size_bytes": size,
            "token_cache_bytes": self.store.token_bytes(),
            "captions": self.store.caption_configs(),
            "failed": dict(Counter(f["reason"] for f in failures)),
            "failures": [json_failure(f) for f in failures],
            # What embeds a cold text query (cocatk.textonnx); None for an empty index.
            "text_queries": describe(manifest["identity"]) if manifest else None,
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
        outside = [p for p in self.store.file_rows() if not is_under(p, roots)]
        if outside:
            problems.append(f"{len(outside)} files outside every root, e.g. {outside[0]}")
        return CheckReport(not problems, problems, len(store_ids), vi.ntotal, len(tok_ids))


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
    "UpdateOptions",
    "open_index",
    "resolve_roots",
]
