"""The Python API's index: :class:`Index` composes the index layer and the features on it.

:class:`~cocatk.retrieval.folder.IndexFolder` owns the folder (manifest, SQLite store, vectors, writer lock; its
module docstring gives the layout and the crash-safety rules). ``Index`` adds the features as methods, each a call
into the module that does the work: :mod:`.updater`, :mod:`.search`, :mod:`.duplicates`, :mod:`.maintenance`.

Example:
    >>> from cocatk import Index
    >>> index = Index.open("~/.local/share/cocatk/index", model="coca-b32", create=True)   # doctest: +SKIP
    >>> report = index.update(["~/Pictures"])                                              # doctest: +SKIP
    >>> report.new, report.images_per_s                                                    # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import CocatkError, EmptyIndexError
from ..images import DEFAULT_MAX_MEGAPIXELS
from .budget import parse_size
from .duplicates import DuplicateReport, find_duplicates
from .folder import IndexFolder
from .indexing import run_update
from .layout import DEFAULT_CHECKPOINT_EVERY, DEFAULT_TOKEN_CACHE_LIMIT_GB, ProgressCallback, resolve_roots
from .maintenance import CheckReport, check_index, compact_index, forget_roots, index_info
from .search import Hit, search_index
from .updater import IndexReport, UpdateOptions

if TYPE_CHECKING:  # pragma: no cover
    from .encoder import Encoder


class Index(IndexFolder):
    """An index folder with its features: :meth:`update`, :meth:`search`, :meth:`duplicates`, :meth:`forget`,
    :meth:`compact`, :meth:`info`, :meth:`check`. Create or open it with :meth:`open`
    (:meth:`IndexFolder.open <cocatk.retrieval.folder.IndexFolder.open>`).

    Attributes for search code:
        store: the :class:`~cocatk.retrieval.store.Store` (``store.paths_for_ids(ids)``, ``hashes_for_ids``).
        vectors: the :class:`~cocatk.retrieval.vectors.VectorIndex` (``vectors.search(queries, k, id_selector)``).
        model: the :class:`~cocatk.models.CocaModel` named by the manifest, loaded on first use.
        manifest: model identity, embed_dim, image_size, factory, token shape, schema and cocatk versions.
        model_choice: when this :meth:`open` created the index with the machine's default model (no ``model``, no
            ``$COCATK_MODEL``), that model and why (:class:`~cocatk.config.ModelChoice`); else None.
    """

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
        image_column: str | None = None,
        caption_column: str | None = None,
        max_index_memory: str | int | None = None,
        max_query_ms: float | None = None,
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
            image_column, caption_column: the columns of Parquet and Arrow sources (``data/*.parquet``,
                ``hf:PATH``); recorded in the manifest, so later runs read the same columns. Default: found as
                :mod:`cocatk.sources.tables` says.
            max_index_memory: choose the FAISS factory and its search knobs for this memory (``"4G"``, ``"512M"``
                or bytes; :mod:`cocatk.retrieval.budget`) once the run's vectors are in: the most accurate index
                that fits, tuned to recall@10 0.95 on held-out queries, recorded as ``manifest["budget"]``. The
                budget is kept: later updates choose again when the count doubles or halves, or no longer fits.
                Not with ``faiss_factory``.
            max_query_ms: with ``max_index_memory``, a latency limit per query for that tuning.

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
            image_column=image_column,
            caption_column=caption_column,
            max_index_memory=None if max_index_memory is None else parse_size(max_index_memory),
            max_query_ms=max_query_ms,
        )
        return run_update(self, options)

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
        return forget_roots(self, roots)

    def compact(self) -> dict[str, Any]:
        """Reclaim disk space (see :func:`cocatk.retrieval.maintenance.compact_index`).

        Returns:
            ``{"before_bytes", "after_bytes", "reclaimed_bytes", "removed_files"}``.
        """
        return compact_index(self)

    def info(self) -> dict[str, Any]:
        """Manifest, counts, roots, size on disk and failures, as plain data."""
        return index_info(self)

    def check(self) -> CheckReport:
        """Verify that SQLite and FAISS agree (see :func:`cocatk.retrieval.maintenance.check_index`)."""
        return check_index(self)


def open_index(folder: str | os.PathLike[str] | None = None, **kwargs: Any) -> Index:
    """Shorthand for :meth:`Index.open`."""
    return Index.open(folder, **kwargs)


__all__ = [
    "CheckReport",
    "CocatkError",
    "EmptyIndexError",
    "Index",
    "IndexFolder",
    "IndexReport",
    "ProgressCallback",
    "UpdateOptions",
    "open_index",
    "resolve_roots",
]
