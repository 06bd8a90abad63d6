"""The incremental update of an index: scan -> decide -> encode -> commit, in checkpoints.

:class:`Updater` owns everything that makes an update durable and incremental: which roots are scanned, which files
are new, changed, touched, moved, copied, deleted or failed, the SQLite rows and FAISS vectors written for them, the
checkpoints (one SQLite transaction, then the FAISS file of that generation) and the resume after a crash. Where the
embeddings come from is not its business: it hands the files that need reading to an
:class:`~cocatk.retrieval.encoder.Encoder` and commits what comes back, in order.

Callers use :meth:`cocatk.retrieval.index.Index.update`, which takes the writer lock and builds an
:class:`UpdateOptions`; this module never imports :mod:`cocatk.retrieval.index` at run time (the dependency runs one
way: index -> updater).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..images import DEFAULT_MAX_MEGAPIXELS, find_images, image_extensions
from ..sources import Columns
from . import shards
from .encoder import Encoded, EncodeJob, Encoder, LocalEncoder
from .layout import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_TOKEN_CACHE_LIMIT_GB,
    ProgressCallback,
    is_under,
    resolve_roots,
)
from .report import IndexReport, StageTimer
from .store import FileRow
from .vectors import VectorIndex, default_search_params, min_training_points

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder

#: The FAISS file is rewritten at every checkpoint while it is small; above this, at most every
#: ``_BIG_SAVE_INTERVAL_S`` (SQLite still commits every checkpoint, and a stale FAISS file is rebuilt from it).
_SMALL_FAISS_BYTES = 256 << 20
_BIG_SAVE_INTERVAL_S = 60.0
#: Seconds between progress reports of stages without a known total (scanning).
_PROGRESS_INTERVAL_S = 0.2
#: Newly encoded images captioned together (``UpdateOptions.caption``).
_CAPTION_BATCH = 16
#: Failures retried even when the file did not change: their outcome may depend on options and plugins.
_RETRY_REASONS = ("too large", "unsupported format")


@dataclass(frozen=True)
class UpdateOptions:
    """Everything that shapes one update; see :meth:`cocatk.retrieval.index.Index.update` for each field."""

    paths: tuple[str, ...] = ()
    batch_size: int | None = None
    workers: int | None = None
    follow_symlinks: bool = False
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS
    faiss_factory: str | None = None
    #: None: the index's setting (a new CoCa index caches); True: cache (backfilling); False: stop and drop them.
    cache_tokens: bool | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    token_cache_limit_gb: float = DEFAULT_TOKEN_CACHE_LIMIT_GB
    progress: ProgressCallback | None = None
    #: Told a one-line message before long extra work (re-reading every image to cache its tokens).
    notify: Callable[[str], None] | None = None
    #: Where embeddings come from; None: a :class:`LocalEncoder` over the index's model, built when needed.
    encoder: Encoder | None = None
    #: Caption newly encoded images in the same pass (the image tower runs once): generation settings, or a mapping
    #: of the fields to set (see :func:`cocatk.captioning.make_config`); None: no captions.
    caption: Any = None
    #: Choose the FAISS factory and its knobs for this many bytes of index (:mod:`cocatk.retrieval.budget`); the
    #: budget is recorded and kept by later updates. None: the recorded budget, if any.
    max_index_memory: int | None = None
    #: With ``max_index_memory``: the latency limit of one query while tuning, in milliseconds.
    max_query_ms: float | None = None
    #: Columns of Parquet and Arrow sources (None: the index's recorded choice, else found).
    image_column: str | None = None
    caption_column: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise UsageError(
                f"checkpoint_every must be >= 1, got {self.checkpoint_every}", hint="pass a positive number"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}", hint="pass --batch-size 1 or more")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"workers must be >= 0, got {self.workers}", hint="pass --workers 0 or more")
        if self.max_index_memory is not None or self.max_query_ms is not None:
            from .budget import check_budget_options

            check_budget_options(self.max_index_memory, self.max_query_ms, self.faiss_factory)


class Updater:
    """One incremental update of ``index`` (the writer lock is held by the caller)."""

    def __init__(self, index: IndexFolder, options: UpdateOptions) -> None:
        self.index = index
        self.store = index.store
        self.opts = options
        self.progress: ProgressCallback = options.progress or (lambda stage, done, total: None)
        self.report = IndexReport(index_dir=str(index.dir), roots=[])
        self._last_save = time.monotonic()
        self._since_checkpoint = 0
        self._manifest_json_stale = False  # manifest.json lags the SQLite manifest until the next commit
        self._vectors_dirty = False  # FAISS could not apply a removal: rebuild from SQLite before saving
        self.timed = StageTimer()
        self._thread_seconds = {"read_hash": 0.0, "decode_preprocess": 0.0}
        self._encoder: Encoder | None = options.encoder
        self._store_tokens = False
        self._tokens_by_default = False  # caching because a new index does so by default (not asked for)
        self._captioner: Any = None  # (model, config, key) when captioning in this pass
        self._caption_queue: list[tuple[int, str, np.ndarray]] = []
        self._vanished_by_hash: dict[str, list[FileRow]] = {}

    # -- setup --
    def _roots(self) -> list[str]:
        if self.opts.paths:
            return resolve_roots(self.opts.paths)
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
        factory = self.opts.faiss_factory
        if factory and factory != m.get("factory"):
            VectorIndex.validate_factory(int(m["embed_dim"]), factory)
            m["factory"] = factory
            changed = True
        if factory and m.get("budget"):  # a factory named by --faiss replaces one chosen by budget
            m.pop("budget")
            changed = True
        want = self.opts.cache_tokens
        if want is None and m.get("cache_tokens") is None:  # a new index: cache when its rerank model has a decoder
            from ..models import resolve_model

            spec = self.index.rerank_spec or resolve_model(m["model"], m["pretrained"])
            want = spec.has_decoder
            self._tokens_by_default = want
        if want and not m.get("cache_tokens"):
            m["cache_tokens"] = True
            changed = True
        elif want is False and m.get("cache_tokens") is not False:
            m["cache_tokens"] = False
            m["token_shape"] = None
            self.store.drop_tokens()  # a cache: the files hold what it was made from
            changed = True
        given = {k: v for k, v in (("image", self.opts.image_column), ("caption", self.opts.caption_column)) if v}
        if given and {**(m.get("columns") or {}), **given} != m.get("columns"):  # the tables' columns, for reruns
            m["columns"] = {**(m.get("columns") or {}), **given}
            changed = True
        if self.opts.max_megapixels != m.get("max_megapixels"):  # what a rerank or caption re-decodes with
            m["max_megapixels"] = self.opts.max_megapixels
            changed = True
        if changed:
            self.store.begin()
            self.store.set_manifest(m)
            self.store.bump_generation()  # the FAISS file of the old factory no longer matches
            self.store.commit()
            self.index.write_manifest_json()

    def _scan(self, roots: list[str]) -> list[tuple[str, int, int]]:
        """(path, size, mtime_ns) of every image below the roots, reporting the running count."""
        self.progress("scan", 0, None)
        last_report = time.monotonic()
        found: list[tuple[str, int, int]] = []
        for p in find_images(roots, follow_symlinks=self.opts.follow_symlinks):
            try:
                st = p.stat()
            except OSError:
                continue
            found.append((str(p), st.st_size, st.st_mtime_ns))
            now = time.monotonic()
            if now - last_report >= _PROGRESS_INTERVAL_S:
                last_report = now
                self.progress("scan", len(found), None)
        self.progress("scan", len(found), len(found))
        return found

    def _columns(self) -> Columns:
        """The columns of this run's tables: as given, else as the index recorded them."""
        recorded = self.index.manifest.get("columns") or {}
        return Columns(self.opts.image_column or recorded.get("image"),
                       self.opts.caption_column or recorded.get("caption"))  # fmt: skip

    def _encoder_for(self) -> Encoder:
        """The encoder of this update; the default loads the index's model (reported as stage "model")."""
        if self._encoder is None:
            with self.timed("model_load"):
                if self.index.loaded_model is None:
                    self.progress("model", 0, None)
                model = self.index.model
                # A recorded rerank CoCa caches its own decoder tokens (loaded only when tokens are cached).
                caching = self.opts.cache_tokens or bool(self.index.manifest.get("cache_tokens"))
                token_model = self.index.rerank_model if caching else None
                self.progress("model", 1, 1)
                if model.precision_notice:
                    self.report.warnings.append(model.precision_notice)
            self._encoder = LocalEncoder(
                model,
                workers=self.opts.workers,
                batch_size=self.opts.batch_size,
                max_megapixels=self.opts.max_megapixels,
                token_model=token_model,
            )
        return self._encoder

    def run(self) -> IndexReport:
        t0 = time.monotonic()
        index = self.index
        roots = self._roots()
        self.report.roots = roots
        manifest = index.manifest
        factory = self.opts.faiss_factory
        if factory:
            VectorIndex.validate_factory(int(manifest["embed_dim"]), factory)

        # Scan before changing anything, so that a bad option fails fast.
        with self.timed("scan"):
            found = self._scan(roots)
            plan = shards.plan(self.store, roots, sorted(image_extensions()), self.progress, self._columns())
            found += plan.found
            self.report.scanned = len(found) + len(plan.kept)
            self.report.unchanged += len(plan.kept)
            rows = self.store.file_rows()
            present = {p for p, _, _ in found} | plan.kept
            # An item of a shard vanishes only from a shard scanned as a root: never from a folder that holds it.
            vanished = [r for path, r in rows.items() if path not in present
                        and (path in plan.owned if path in plan.all_members else is_under(path, roots))]  # fmt: skip

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
        if self.opts.max_index_memory is not None:  # fail fast when no index of the expected size fits
            from .budget import check_budget

            expected = len(rows) - len(vanished) + sum(1 for p, _, _ in found if p not in rows)
            check_budget(expected, int(manifest["embed_dim"]), self.opts.max_index_memory)
        self._apply_options()
        manifest = index.manifest
        cache_tokens = bool(manifest.get("cache_tokens"))
        todo, stale_failures = self._decide(found, rows, roots, present, cache_tokens)
        for job in todo:
            job.member = plan.members.get(job.path)

        encoder = None
        if todo:
            encoder = self._encoder_for()
            if self.opts.caption is not None:
                self._captioner = self._caption_setup()
            if cache_tokens:
                cache_tokens = self._check_token_budget(
                    encoder, len(rows) - len(vanished) + sum(1 for t in todo if t.row is None)
                )
                backfill = sum(1 for t in todo if t.need_decode)
                if cache_tokens and backfill and self.opts.notify is not None:
                    rate = manifest.get("seconds_per_image")
                    about = f", about {_duration(backfill * float(rate))} at this index's last rate" if rate else ""
                    self.opts.notify(
                        f"caching the decoder tokens of {backfill} indexed images: each is read and encoded "
                        f"again{about}"
                    )

        # Vectors of the committed state; written now when stale, so that every later checkpoint is incremental.
        with self.timed("faiss"):
            vectors = index.load_vectors(self.store.generation, save=True)
        index.set_vectors(vectors, self.store.generation)
        self.vectors = vectors

        for r in vanished:  # a vanished row may turn out to be moved: its file reappears under another path
            self._vanished_by_hash.setdefault(r.hash, []).append(r)
        self.store.begin()
        try:
            with self.timed("sqlite"):
                self.store.add_roots(roots)
                self.store.delete_failures(stale_failures + [t.path for t in todo])
            if encoder is not None:
                self._process(encoder, todo, rows, cache_tokens)
                self._flush_captions()
            self._remove()
            shards.finish(self.store, plan, self.report)
            self._checkpoint(final=True)
        except BaseException:
            # Roll back to the last checkpoint; the in-memory FAISS index is discarded with it.
            self.store.rollback()
            index.set_vectors(None, -1)
            raise
        with self.timed("faiss"):
            self._choose_by_budget()
        self.report.total = self.store.count()
        self.report.token_cache_bytes = self.store.token_bytes()
        self.report.seconds = time.monotonic() - t0
        if self.report.encoded >= 8:  # this machine's rate, for the estimates of later reranks and backfills
            m = index.manifest
            m["seconds_per_image"] = round(self.report.seconds / self.report.encoded, 4)
            self.store.begin()
            self.store.set_manifest(m)
            self.store.commit()
            index.write_manifest_json()
        self.report.failures.sort(key=lambda f: f["path"])
        timings = dict.fromkeys(("scan", "model_load", "wait_decode", "model", "sqlite", "faiss"), 0.0)
        timings.update(self.timed.seconds)
        timings.pop("encode", None)  # the encoder's own stages (wait_decode, model) hold that time
        timings["other"] = max(0.0, self.report.seconds - sum(timings.values()))
        workers = float(encoder.workers) if encoder is not None else float(self.opts.workers or 0)
        timings.update(self._thread_seconds, decode_threads=workers)
        self.report.timings = timings
        return self.report

    def _decide(
        self,
        found: list[tuple[str, int, int]],
        rows: dict[str, FileRow],
        roots: list[str],
        present: set[str],
        cache_tokens: bool,
    ) -> tuple[list[EncodeJob], list[str]]:
        """The files to read (new, changed, token backfill) and the stale failure records to drop."""
        token_ids = self.store.token_ids() if cache_tokens else set()
        # A file that failed before is retried when it changes, or when the outcome may depend on options and
        # plugins ("too large", "unsupported format"); otherwise it is reported again without decoding.
        failures = self.store.failure_rows()
        stale_failures = [p for p in failures if is_under(p, roots) and p not in present]
        todo: list[EncodeJob] = []
        for path, size, mtime in found:
            row = rows.get(path)
            failure = failures.get(path) if row is None else None
            if failure is not None and failure[2:] == (size, mtime) and failure[0] not in _RETRY_REASONS:
                self.report.failed[failure[0]] = self.report.failed.get(failure[0], 0) + 1
                self.report.failures.append({"path": path, "reason": failure[0], "detail": failure[1]})
            elif row is None:
                todo.append(EncodeJob(path, size, mtime, None))
            elif row.size != size or row.mtime_ns != mtime:
                todo.append(EncodeJob(path, size, mtime, row))
            elif cache_tokens and row.id not in token_ids:
                todo.append(EncodeJob(path, size, mtime, row, need_decode=True))
            else:
                self.report.unchanged += 1
        return todo, stale_failures

    def _caption_setup(self) -> tuple[Any, Any, str]:
        """(model, settings, key) for captioning in this pass; the settings key is recorded before any caption."""
        from ..captioning import make_config
        from .captions import caption_settings, require_decoder

        model = self.index.model
        require_decoder(model)
        cfg = make_config(model, self.opts.caption)
        cfg.resolved_max_len(model.context_length)
        key, settings = caption_settings(model, cfg)
        self.store.begin()
        self.store.ensure_caption_config(key, settings)
        self.store.commit()
        return model, cfg, key

    def _flush_captions(self) -> None:
        """Caption the queued newly encoded images from their tokens, in the open transaction (committed with the
        rows they describe at the next checkpoint)."""
        if not self._caption_queue or self._captioner is None:
            return
        import torch

        from ..captioning import generate_captions

        model, cfg, key = self._captioner
        with self.timed("caption"):
            tokens = torch.from_numpy(np.stack([t for _, _, t in self._caption_queue]))
            caps = generate_captions(model, tokens, cfg, batch_size=len(self._caption_queue))
            for (fid, h, _), cap in zip(self._caption_queue, caps, strict=True):
                self.store.put_caption(fid, key, h, cap.text, cap.logprob)
        self.report.captioned += len(caps)
        self._caption_queue.clear()

    def _check_token_budget(self, encoder: Encoder, n: int) -> bool:
        """Record the token shape, and check the cache's size; False when a default cache is left out."""
        m = self.index.manifest
        if not m.get("token_shape"):
            m["token_shape"] = list(encoder.token_shape())
            self.store.begin()
            self.store.set_manifest(m)
            self.store.commit()
            self.index.write_manifest_json()
        t, d = m["token_shape"]
        estimate = n * t * d * 2
        limit = self.opts.token_cache_limit_gb * (1 << 30)
        if estimate > limit and self._tokens_by_default:
            m["cache_tokens"] = False
            m["token_shape"] = None
            self.store.begin()
            self.store.set_manifest(m)
            self.store.commit()
            self.index.write_manifest_json()
            self.report.warnings.append(
                f"decoder tokens not cached: {n} x {t} x {d} fp16 = {estimate / (1 << 30):.1f} GiB is over the "
                f"{self.opts.token_cache_limit_gb:g} GiB limit; a search reranks by re-reading its candidates "
                "(`cocatk index --cache-tokens --token-cache-limit GB` caches them anyway)"
            )
            return False
        if estimate > limit:
            raise UsageError(
                f"--cache-tokens would store {n} x {t} x {d} fp16 tokens = {estimate / (1 << 30):.1f} GiB "
                f"(limit {self.opts.token_cache_limit_gb:g} GiB)",
                hint="drop --cache-tokens (search then recomputes tokens for its top-k candidates only), "
                "or index a smaller collection",
            )
        self.report.token_cache_bytes = estimate
        return True

    # -- the pipeline --
    def _process(self, encoder: Encoder, todo: list[EncodeJob], rows: dict[str, FileRow], tokens: bool) -> None:
        """Hand ``todo`` to the encoder and commit every result, checkpointing as rows complete."""
        # Contents whose stored vector will still be there when a result is committed: every row, except rows being
        # re-read in this run (their old content may be replaced before a later file wants to reuse it).
        rereading = {t.row.hash for t in todo if t.row is not None}
        known = {r.hash for r in rows.values()} - rereading
        total = len(todo)
        done = 0
        retry: list[EncodeJob] = []
        self.progress("index", 0, total)
        self._store_tokens = tokens
        want_tokens = tokens or self._captioner is not None  # captions are decoded from the image tokens
        results = encoder.encode(todo, known=known, tokens=want_tokens, timed=self.timed)
        while True:
            with self.timed("encode"):
                res = next(results, None)
            if res is None:
                break
            with self.timed("sqlite"):
                if not self._commit(res):
                    retry.append(replace(res.job, need_decode=True))
                self._maybe_checkpoint()
            done += 1
            if done % 16 == 0 or done == total:
                self.progress("index", done, total)
        if retry:  # a reused content whose row went away in this run: encode it after all (rare)
            for res in encoder.encode(retry, known=(), tokens=want_tokens, timed=self.timed):
                with self.timed("sqlite"):
                    if not self._commit(res):  # pragma: no cover - a forced decode always yields an embedding
                        raise RuntimeError(f"encoder returned no embedding for {res.job.path}")
                    self._maybe_checkpoint()
        self.progress("index", total, total)

    def _commit(self, res: Encoded) -> bool:
        """Record one result (failure, touch, move, copy, new vector); False when it must be encoded after all."""
        job = res.job
        self._thread_seconds["read_hash"] += res.read_s
        self._thread_seconds["decode_preprocess"] += res.decode_s
        if res.error is not None:
            self._fail(res)
        elif job.row is not None and res.hash == job.row.hash and not job.need_decode:
            self.store.update_stat(job.row.id, job.size, job.mtime_ns)  # touched, same content
            self._placed(job, job.row.id, res.hash)
            self.report.unchanged += 1
            self._tick()
        elif res.embedding is not None:
            self.report.encoded += 1
            if res.precision and res.precision not in self.report.precisions:
                self._record_precision(res.precision)
            fid = self._write(res, res.embedding, res.tokens if self._store_tokens else None)
            if self._captioner is not None and res.tokens is not None:
                self._caption_queue.append((fid, res.hash or "", res.tokens))
                if len(self._caption_queue) >= _CAPTION_BATCH:
                    self._flush_captions()
        elif not self._try_reuse(res):
            return False
        return True

    def _record_precision(self, precision: str) -> None:
        """Add ``precision`` to the manifest's ``precisions`` in the open transaction, so it commits with the first
        vector computed at it (a killed run never leaves vectors of an unrecorded precision)."""
        self.report.precisions.append(precision)
        m = self.index.manifest
        if precision not in m.get("precisions", []):
            m["precisions"] = sorted({*m.get("precisions", []), precision})
            self.store.set_manifest(m)
            self._manifest_json_stale = True

    def _try_reuse(self, res: Encoded) -> bool:
        """A file whose content is already indexed: move a vanished row, or copy an embedding."""
        job, h = res.job, res.hash or ""
        movers = self._vanished_by_hash.get(h)
        if job.row is None and movers and not job.need_decode:
            row = movers.pop()
            self.store.update_stat(row.id, job.size, job.mtime_ns, path=job.path)
            self._placed(job, row.id, h)
            self.report.moved += 1
            self._tick()
            return True
        src = self.store.id_for_hash(h)
        if src is None or (job.row is not None and src == job.row.id):
            return False
        self._write_copy(res, src)
        return True

    def _placed(self, job: EncodeJob, fid: int, content_hash: str | None) -> None:
        """Row ``fid`` now holds ``job``: an item of a shard records where it lies (and its caption) beside it."""
        if job.member is not None:
            shards.record(self.store, fid, job.member, content_hash or "")

    def _upsert(self, res: Encoded, emb: np.ndarray) -> int:
        """Insert a new row, or replace a known row's content (dropping its old vector); count it; return the id."""
        job = res.job
        if job.row is None:
            self.report.new += 1
            fid = self.store.insert_file(job.path, job.size, job.mtime_ns, res.hash or "", emb)
            self._placed(job, fid, res.hash)
            return fid
        fid = job.row.id
        self._placed(job, fid, res.hash)
        self.store.update_content(fid, job.size, job.mtime_ns, res.hash or "", emb)
        if not self.vectors.remove(np.array([fid])):
            self._vectors_dirty = True
        # Unchanged: size/mtime differed but the content hash did not (e.g. a touched file).
        if job.need_decode and res.hash == job.row.hash:
            self.report.unchanged += 1
        else:
            self.report.changed += 1
        return fid

    def _add_vector(self, fid: int, emb: np.ndarray) -> None:
        if self.vectors.is_trained:
            with self.timed("faiss"):
                self.vectors.add(emb[None, :], np.array([fid]))
        self._tick()

    def _write(self, res: Encoded, emb: np.ndarray, tokens: np.ndarray | None) -> int:
        fid = self._upsert(res, emb)
        if tokens is not None:
            self.store.put_tokens(fid, tokens)
            self.report.tokens_cached += 1
        self._add_vector(fid, emb)
        return fid

    def _write_copy(self, res: Encoded, src: int) -> None:
        """Index ``res`` with the embedding (and tokens) of row ``src``, which has the same content."""
        emb = self.store.embeddings([src], self.index.dim)[0]
        fid = self._upsert(res, emb)
        self.report.duplicates += 1
        if self.store.copy_tokens(src, fid):
            self.report.tokens_cached += 1
        self.store.copy_captions(src, fid)  # the same content: its captions describe this file too
        self._placed(res.job, fid, res.hash)  # but an item's own caption is its own
        self._add_vector(fid, emb)

    def _fail(self, res: Encoded) -> None:
        job, e = res.job, res.error
        assert e is not None
        self.store.record_failure(job.path, e.reason, e.detail, job.size, job.mtime_ns)
        if job.row is not None:  # an indexed file became unreadable: its old embedding is stale
            self.store.delete_files([job.row.id])
            if not self.vectors.remove(np.array([job.row.id])):
                self._vectors_dirty = True
        self.report.failed[e.reason] = self.report.failed.get(e.reason, 0) + 1
        self.report.failures.append({"path": job.path, "reason": e.reason, "detail": e.detail})
        self._tick()

    def _remove(self) -> None:
        """Delete the vanished rows that no file moved into."""
        gone = [r.id for rows in self._vanished_by_hash.values() for r in rows]
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
        if self._since_checkpoint >= self.opts.checkpoint_every:
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
        if self._manifest_json_stale:
            self.index.write_manifest_json()
            self._manifest_json_stale = False
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
            vi = self.vectors = index.load_vectors(gen)
            self._vectors_dirty = False
        elif (
            not final
            and vi.ntotal * vi.dim * 4 > _SMALL_FAISS_BYTES
            and time.monotonic() - self._last_save < _BIG_SAVE_INTERVAL_S
        ):
            return
        path = index.vector_path(gen)
        if not path.is_file():
            vi.save(path)
            index.cleanup_vector_files(keep=gen)
        self._last_save = time.monotonic()
        index.set_vectors(vi, gen)

    # -- a factory chosen by budget --
    def _choose_by_budget(self) -> None:
        """After the final checkpoint, when the item count is known: choose the FAISS factory and knobs for the
        budget (given now, or recorded by an earlier update) when :func:`~cocatk.retrieval.budget.rechoose_reason`
        says so; record them as ``manifest["budget"]`` and ``manifest["factory"]`` in one commit, then save the
        index built for them (a crash in between rebuilds it from SQLite on the next open)."""
        from . import budget

        index, m = self.index, self.index.manifest
        plan = budget.plan_choice(m, self.store.count(), self.opts.max_index_memory, self.opts.max_query_ms)
        if plan is None:
            return
        want, limit, notice = plan
        if self.opts.notify is not None and notice:
            self.opts.notify(notice)
        ids, vecs = self.store.all_embeddings(index.dim)
        choice, vi = budget.choose_index(ids, vecs, want, max_query_ms=limit)
        same = choice.factory == m.get("factory") and self.vectors.is_trained and self.vectors.ntotal == len(ids)
        m["budget"] = choice.to_dict()
        m["factory"] = choice.factory
        self.store.begin()
        self.store.set_manifest(m)
        gen = self.store.generation if same else self.store.bump_generation()
        self.store.commit()
        index.write_manifest_json()
        if same:  # the index in memory (and on disk) is this factory already: only its knobs change
            vi = self.vectors
        else:
            vi.save(index.vector_path(gen))
            index.cleanup_vector_files(keep=gen)
        vi.search_params = default_search_params(choice.factory)
        budget.apply_recorded_params(vi, m)  # the chosen knobs; $COCATK_FAISS_PARAMS still wins
        self.vectors = vi
        index.set_vectors(vi, gen)
        if not choice.fits and choice.why:
            self.report.warnings.append(f"--max-index-memory: {choice.why}")


def update_index(index: IndexFolder, options: UpdateOptions) -> IndexReport:
    """Run one update of ``index`` (the caller holds the writer lock)."""
    return Updater(index, options).run()


__all__ = ["IndexReport", "StageTimer", "UpdateOptions", "Updater", "update_index"]


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``: an estimate's size, not its digits."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
