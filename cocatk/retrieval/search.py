"""Search an index: FAISS top-k over contrastive embeddings, then a rerank of the top-k.

Stage 1 embeds the query with the index's model (a CoCa, CLIP, SigLIP or EVA text tower) and takes the exact
inner-product top-k from FAISS (k = ``rerank_k`` when reranking, else ``n``). Stage 2 (:mod:`cocatk.models.blip`)
scores each of the k candidates, by default by CoCa caption log-likelihood log p(query | image) (the text tower runs
once, the decoder is batched over candidates) with the index's own CoCa or a separate ``rerank_model``; or by
BLIP's image-text matching probability (``reranker="blip-itm"``). For one fixed query, log P(query) is the same for
every image, so the raw likelihood ranks images correctly without a prior correction.

Example:
    >>> from cocatk import Index
    >>> hits = Index.open("~/.local/share/cocatk/index").search("a red bicycle", n=5)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from ..errors import EmptyIndexError, ExportUnreadableError, ImageError, UsageError
from ..paths import display_path, json_path, text_path

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder
    from .layout import ProgressCallback


@dataclass
class Hit:
    """One search result. ``loglik`` (CoCa rerank) and ``match`` (BLIP-ITM's P(match)) are None unless that reranker
    ordered the results."""

    rank: int
    id: int
    path: str
    similarity: float
    loglik: float | None = None
    #: The file's generated caption (`cocatk caption`), the most recent of any settings; None when it has none.
    caption: str | None = None
    match: float | None = None
    #: The file's zero-shot tags (`cocatk tag`, the latest settings), best first; None when the index has none.
    tags: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form; ``path`` follows :func:`cocatk.paths.json_path` (``path_b64`` for names that are not UTF-8)."""
        d = asdict(self)
        for optional in ("match", "tags"):
            if d[optional] is None:
                del d[optional]
        d.update(json_path(self.path))
        return d


@dataclass
class SearchResult:
    """Hits plus what a script or report needs: the query, the model, per-stage timings, dropped candidates."""

    hits: list[Hit]
    query: dict[str, Any]
    model: dict[str, Any]
    timings: dict[str, float]
    reranked: bool
    candidates: int
    #: (path, reason) of candidates dropped because their file is gone or unreadable.
    dropped: list[tuple[str, str]] = field(default_factory=list)
    #: Where the rerank's image tokens came from: "cache", "files", "mixed" or None.
    tokens_from: str | None = None
    #: Things the reader of the results must know (demo model on real photos, random weights).
    warnings: list[str] = field(default_factory=list)
    #: The reranker that ordered the hits ("coca" or "blip-itm") and its model, when reranked.
    reranker: str | None = None
    rerank_model: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "model": self.model,
            "reranked": self.reranked,
            "reranker": self.reranker,
            "rerank_model": self.rerank_model,
            "candidates": self.candidates,
            "tokens_from": self.tokens_from,
            "timings_ms": {k: round(v * 1000, 2) for k, v in self.timings.items()},
            "dropped": [{**json_path(p), "reason": r} for p, r in self.dropped],
            "hits": [h.to_dict() for h in self.hits],
            "warnings": self.warnings,
        }


#: What an image query may be: a path, or the file's bytes (an upload; decoded by :func:`cocatk.images.load_image`).
ImageQuery = str | os.PathLike[str] | bytes


def describe_image_query(image: ImageQuery) -> str:
    """How a query image is named in results and messages: its path as text, or ``(uploaded image, N bytes)``."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"(uploaded image, {len(image)} bytes)"
    return text_path(os.fspath(image))


def build_query_vector(
    model: Any,
    text: str | None = None,
    image: ImageQuery | None = None,
    negative: Sequence[str] = (),
    max_megapixels: float | None = None,
    embedding: np.ndarray | None = None,
) -> np.ndarray:
    """The stage-1 query: text embedding, image embedding, or the normalised mean of both, minus negatives.

    Each ``negative`` text's embedding is subtracted before the final L2 normalisation. ``image`` is a path or the
    image file's bytes (an upload). ``embedding`` (a stored or given vector, shape (D,) or (1, D)) takes the place
    of an image embedding ("more like this").

    Returns:
        float32 (1, D), L2-normalised.

    Raises:
        UsageError: no text and no image, an empty text, or a query that cancels out.
        ImageError: the query image cannot be decoded.
    """
    from ..images import load_image

    if text is not None and not text.strip():
        raise UsageError("empty query", hint='pass a text such as "a red bicycle", or --image PATH')
    if text is None and image is None and embedding is None:
        raise UsageError("no query", hint='pass a text such as "a red bicycle", or --image PATH')
    parts: list[np.ndarray] = []
    if text is not None:
        parts.append(model.encode_texts([text])[0])
    if image is not None:
        kwargs = {} if max_megapixels is None else {"max_megapixels": max_megapixels}
        upload = isinstance(image, (bytes, bytearray, memoryview))
        shown = describe_image_query(image) if upload else display_path(os.fspath(image))
        if not upload and not os.path.exists(image):
            raise UsageError(f"--image {shown} does not exist", hint="pass the path of an image file to search with")
        try:
            im = load_image(bytes(image) if upload else image, draft_size=model.image_size, **kwargs)
        except ImageError as e:
            reason = getattr(e, "reason", "") or e.message
            raise ImageError(
                f"cannot search with {shown}: {reason}", hint="pass a readable JPEG, PNG, WebP, ... image to --image"
            ) from e
        parts.append(model.encode_images([im])[0])
    if embedding is not None:
        vec = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if vec.shape[0] != int(model.embed_dim) or not np.all(np.isfinite(vec)):
            raise UsageError(
                f"the query embedding has {vec.shape[0]} values, the model's embeddings {model.embed_dim}",
                hint=f"pass {model.embed_dim} finite floats",
            )
        parts.append(vec / max(float(np.linalg.norm(vec)), 1e-12))
    q = np.mean(parts, axis=0)
    q = q / max(np.linalg.norm(q), 1e-12)
    negs = [t for t in negative if t and t.strip()]
    if negs:
        q = q - model.encode_texts(negs).sum(axis=0)
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        raise UsageError("the query and its --not texts cancel out", hint="use fewer or different --not texts")
    return np.ascontiguousarray((q / norm)[None, :], dtype=np.float32)


def _under_ids(index: IndexFolder, under: str | os.PathLike[str]) -> np.ndarray:
    """Ids of the files below folder ``under`` (paths are stored absolute and resolved)."""
    root = Path(under).expanduser().resolve()
    if not root.is_dir():
        raise UsageError(f"--under {under}: no such folder", hint="pass a folder that holds indexed images")
    return index.store.ids_under(str(root))


def candidate_tokens(
    index: IndexFolder,
    ids: Sequence[int],
    paths: Sequence[str],
    max_megapixels: float | None = None,
    use_cache: bool = True,
    model: Any = None,
    notify: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[Any, list[int], list[tuple[str, str]], str]:
    """Decoder tokens for candidates: from the index's token cache when it holds ``model``'s tokens, else by
    re-decoding the files exactly like the indexer does (with the index's ``max_megapixels``).

    Args:
        model: the CoCa that reranks (default :attr:`Index.token_model`: the recorded rerank model, else the
            index's own).
        notify: told, before the files are read, how many, about how long, and the fix.
        progress: ``progress("rerank-tokens", done, total)`` while they are.

    Returns:
        (tokens (K', T, D), positions kept (into ``ids``), dropped (path, reason), source).
    """
    import torch

    model = model if model is not None else index.token_model
    cached = index.get_tokens(list(ids)) if use_cache and index.tokens_cached_for(model.spec) else None
    if cached is not None:
        return torch.as_tensor(cached), list(range(len(ids))), [], "cache"
    if notify is not None and paths:
        notify(_recompute_message(index, len(paths), use_cache))
    batch = 8
    images: list[Any] = []
    kept: list[int] = []
    dropped: list[tuple[str, str]] = []
    parts = []
    for start in range(0, len(paths), batch):
        if progress is not None:
            progress("rerank-tokens", start, len(paths))
        part = ids[start : start + batch]
        got, where, lost = candidate_images(index.item_sources(part, paths[start : start + batch]), model.image_size,
                                            max_megapixels)  # fmt: skip
        kept += [start + j for j in where]
        dropped += lost
        if got:
            parts.append(model.image_tokens(got))
    if progress is not None:
        progress("rerank-tokens", len(paths), len(paths))
    del images
    tokens = torch.cat(parts) if parts else torch.empty(0)
    return tokens, kept, dropped, "files"


def _recompute_message(index: IndexFolder, k: int, use_cache: bool) -> str:
    """What a search says before it computes ``k`` candidates' decoder tokens from their files."""
    rate = index.manifest.get("seconds_per_image")
    estimate = f", about {max(1, round(k * float(rate)))} s at the last `cocatk index` rate" if rate else ""
    if not use_cache:
        why, fix = "--no-cache-tokens", "drop --no-cache-tokens to use the cached ones"
    elif index.manifest.get("cache_tokens"):
        why, fix = "some have no cached tokens", f"`cocatk index --index {index.dir}` fills them in"
    else:
        why, fix = "this index stores no tokens", f"`cocatk index --index {index.dir} --cache-tokens` stores them once"
    return f"reranking {k} candidates from their files ({why}){estimate}; {fix}"


def candidate_images(
    sources: Sequence[Any], draft_size: int, max_megapixels: float | None = None
) -> tuple[list[Any], list[int], list[tuple[str, str]]]:
    """Decode candidates like the indexer does: (images, positions kept (into ``sources``), dropped (path,
    reason)). ``sources``: :meth:`IndexFolder.item_sources` (files' paths, items' places in their shards)."""
    from ..images import load_image
    from ..sources import source_bytes, source_exists, source_name

    kept: list[int] = []
    images = []
    dropped: list[tuple[str, str]] = []
    kwargs = {} if max_megapixels is None else {"max_megapixels": max_megapixels}
    for i, source in enumerate(sources):
        path = source_name(source)
        if not source_exists(source):
            dropped.append((path, "file is gone"))
            continue
        try:
            data = source if isinstance(source, str) else source_bytes(source)
            images.append(load_image(data, draft_size=draft_size, **kwargs))
            kept.append(i)
        except ImageError as e:
            dropped.append((path, getattr(e, "reason", None) or e.message))
        except OSError as e:
            dropped.append((path, f"unreadable ({type(e).__name__})"))
    return images, kept, dropped


def search_index(
    index: IndexFolder,
    text: str | None = None,
    image: ImageQuery | None = None,
    negative: Sequence[str] = (),
    n: int = 10,
    rerank: bool = True,
    rerank_k: int = 50,
    under: str | os.PathLike[str] | None = None,
    use_token_cache: bool = True,
    like_id: int | None = None,
    embedding: np.ndarray | Sequence[float] | None = None,
    match: str | None = None,
    tag: str | None = None,
    reranker: str = "coca",
    rerank_model: str | None = None,
    rerank_pretrained: str | None = None,
    backend: str = "auto",
    notify: Callable[[str], None] | None = None,
    progress: ProgressCallback | None = None,
) -> SearchResult:
    """Search ``index``; see the module docstring. Queries without text are never reranked (there is no text).

    Args:
        image: a path, or the image file's bytes (an HTTP upload).
        like_id: "more like this": the stored embedding of indexed file ``like_id`` is the query, and that file
            itself is left out of the hits (it would always come first with similarity 1). Excludes text/image.
        embedding: a raw query vector of the index's dimension (normalised here), e.g. clip-retrieval's
            ``embedding_input``. Excludes text/image/like_id.
        use_token_cache: False re-decodes candidate files even when the index stores their decoder tokens.
        match: a full-text query over the generated captions (SQLite FTS5: words are ANDed, "a phrase", OR, NOT,
            prefix*). Only images whose caption matches are candidates; the dense query (and the rerank) orders
            them. Combines with ``under`` (both must hold).
        tag: only images tagged with this label, or a group of the vocabulary's hierarchy (``cocatk tag``; the
            latest tag settings; case-insensitive). Combines with ``under`` and ``match``.
        reranker: ``"coca"`` (caption log-likelihood) or ``"blip-itm"`` (BLIP's P(match | image, text)).
        rerank_model, rerank_pretrained: the reranker's model. For ``coca``: any CoCa (default the one the index
            records, else the index's own model when it is a CoCa; a dual-encoder index without one is not
            reranked, with a warning saying what to pass). For ``blip-itm``: a hub repo or local folder (default
            ``Salesforce/blip-itm-base-coco``); ``rerank_pretrained="none"`` for random weights.
        backend: what embeds a text query (image and stored-vector queries are always torch's). ``"auto"``: when
            nothing will load torch anyway (a text-only query that is not reranked, in a process whose torch model is
            not loaded yet, with no device or precision named), the index model's text tower exported to ONNX
            (:mod:`cocatk.models.onnx`, made by ``cocatk index``) if there is one, else torch. It embeds in float32 on
            the CPU: on a GPU or an AMX CPU, where torch would run bf16, it is the closer of the two to fp32.
            A default CoCa rerank from cached tokens runs in ONNX Runtime too (:mod:`cocatk.models.onnx.decoder`), so a
            default text search imports no torch. ``"onnx"``: that export, required for a text-only query (the rerank
            takes it when the candidates' tokens are cached, else torch). ``"torch"``: never it (the reference).
        notify: called with a one-line message before a long wait (candidates' tokens computed from their files).
        progress: ``progress(stage, done, total)`` during that wait (stage ``"rerank-tokens"``).

    Raises:
        UsageError: n < 1, rerank_k < 1, empty query, missing --under folder, an id that is not in the index,
            like_id or embedding mixed with other queries, an unknown reranker.
        EmptyIndexError: the index holds no images.
        IndexMismatchError: a ``rerank_model`` other than the one the index records.
        DecoderRequiredError: a ``rerank_model`` that is not a CoCa. RerankerError: BLIP cannot be loaded.
    """
    from ..models.blip import check_reranker

    reranker = check_reranker(reranker)
    if (like_id is not None or embedding is not None) and (
        text is not None or image is not None or (like_id is not None and embedding is not None)
    ):
        raise UsageError(
            "a similar-image or embedding query cannot be combined with other queries",
            hint="pass like_id, embedding, or text and/or image",
        )
    if n < 1:
        raise UsageError(f"-n must be >= 1, got {n}", hint="ask for at least one result, e.g. -n 10")
    if rerank_k < 1:
        raise UsageError(f"--rerank-k must be >= 1, got {rerank_k}", hint="use e.g. --rerank-k 50")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if index.is_empty:  # answered from SQLite alone: no model is loaded for an empty index
        raise EmptyIndexError(f"the index at {index.dir} holds no images", hint="run `cocatk index PATH` first")
    selector = _under_ids(index, under) if under is not None else None
    if selector is not None and len(selector) == 0:
        raise EmptyIndexError(
            f"no indexed images under {display_path(str(under))}",
            hint=f"check the folder (`cocatk info` lists the roots), or index it: `cocatk index {under}`",
        )
    if match is not None:
        selector = _match_ids(index, match, selector)
    if tag is not None:
        selector = _tag_ids(index, tag, selector)
    engine, engine_warning = _text_engine(
        index, backend, text, like_id is not None or embedding is not None,
        rerank, reranker, rerank_model, rerank_pretrained, use_token_cache, image is not None,
    )  # fmt: skip
    model = engine or index.model
    if rerank and text is not None and _onnx_reranks(index, engine, reranker, rerank_model, rerank_pretrained,
                                                     use_token_cache):  # fmt: skip
        engine.decoder().prefetch()  # opened beside the FAISS read and the text tower
    vectors = index.vectors  # reads (or rebuilds) the FAISS file: part of loading, not of the search
    max_megapixels = index.manifest.get("max_megapixels")
    timings["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if like_id is not None:
        embedding = index.embeddings([like_id])[0]  # UsageError for an id that is not in the index
    query = build_query_vector(
        model, text, image, negative, max_megapixels, None if embedding is None else np.asarray(embedding)
    )
    timings["embed"] = time.perf_counter() - t0

    do_rerank = bool(rerank and text is not None)
    warnings = list(model.notices()) + ([engine_warning] if engine_warning else [])
    scorer: Any = None
    if do_rerank:
        t0 = time.perf_counter()
        if engine is not None and _onnx_reranks(index, engine, reranker, rerank_model, rerank_pretrained,
                                                use_token_cache):  # fmt: skip
            scorer = engine  # the decoder graph beside the text tower: no torch in this search
        else:
            scorer = _load_reranker(index, index.model if engine is not None and model.has_decoder else model,
                                    reranker, rerank_model, rerank_pretrained)  # fmt: skip
        timings["load"] += time.perf_counter() - t0
        if scorer is None:
            from ..models import DECODER_HINT

            do_rerank = False
            warnings.append(f"not reranked: {model.info()['model']} is a {model.kind} dual encoder; {DECODER_HINT}")
        else:
            warnings += [w for w in scorer.notices() if w not in warnings]
    t0 = time.perf_counter()
    total = len(selector) if selector is not None else vectors.ntotal
    want = max(n, rerank_k) if do_rerank else n
    candidates, dropped = _existing_candidates(index, vectors, query, want + (like_id is not None), total, selector)
    if like_id is not None:
        candidates = [c for c in candidates if c[0] != like_id][:want]
    timings["search"] = time.perf_counter() - t0

    hits: list[Hit]
    source = None
    if do_rerank and candidates:
        t0 = time.perf_counter()
        assert text is not None
        ids, paths = [c[0] for c in candidates], [c[1] for c in candidates]
        if reranker == "blip-itm":
            images, kept, unreadable = candidate_images(index.item_sources(ids, paths), scorer.image_size,
                                                        max_megapixels)  # fmt: skip
            source = "files"
            scores = scorer.score(text, images) if images else np.zeros(0)
        else:
            tokens = index.get_token_array(ids) if scorer is engine else None
            if tokens is not None:
                kept, unreadable, source = list(range(len(ids))), [], "cache"
                try:
                    scores = engine.caption_loglik(text, tokens)
                except ExportUnreadableError as e:  # set aside: the next `cocatk index` exports again
                    from ..models import onnx

                    onnx.remove_export(index.manifest["identity"])
                    warnings.append(f"{e.message}: removed; the next `cocatk index` exports it again")
                    scorer = _load_reranker(index, index.model, reranker, rerank_model, rerank_pretrained)
                    import torch

                    tokens = torch.from_numpy(tokens)
            else:
                if scorer is engine:  # a candidate without cached tokens: torch computes them from its file
                    scorer = _load_reranker(index, index.model, reranker, rerank_model, rerank_pretrained)
                tokens, kept, unreadable, source = candidate_tokens(
                    index, ids, paths, max_megapixels, use_token_cache, model=scorer, notify=notify,
                    progress=progress,
                )  # fmt: skip
            if scorer is not engine:
                scores = scorer.caption_loglik(text, tokens) if kept else np.zeros(0)
        dropped += unreadable
        survivors = [candidates[j] for j in kept]
        # Stable sort by the rerank score; ties keep the contrastive order.
        order = sorted(range(len(survivors)), key=lambda j: -scores[j])
        key = "match" if reranker == "blip-itm" else "loglik"
        hits = [
            Hit(rank + 1, survivors[j][0], survivors[j][1], survivors[j][2], **{key: float(scores[j])})
            for rank, j in enumerate(order[:n])
        ]
        timings["rerank"] = time.perf_counter() - t0
    else:
        hits = [Hit(rank + 1, c[0], c[1], c[2]) for rank, c in enumerate(candidates[:n])]
    captions = index.store.captions_for_ids([h.id for h in hits]) if hits else {}
    tags = _tags_of(index, [h.id for h in hits])
    for h in hits:
        h.caption = captions.get(h.id)
        h.tags = None if tags is None else [t["label"] for t in tags.get(h.id, [])]
    timings["total"] = sum(timings.values())
    return SearchResult(
        hits=hits,
        query={
            "text": text,
            "image": describe_image_query(image) if image is not None else None,
            "not": list(negative),
            "n": n,
            "rerank_k": rerank_k if do_rerank else None,
            "under": text_path(str(under)) if under else None,
            "match": match,
            **({"like_id": int(like_id)} if like_id is not None else {}),
            **({"embedding": True} if embedding is not None and like_id is None else {}),
        },
        model=model.info(),
        timings=timings,
        reranked=do_rerank,
        candidates=len(candidates),
        dropped=dropped,
        tokens_from=source,
        warnings=warnings,
        reranker=reranker if do_rerank else None,
        rerank_model=(
            scorer.info() if scorer is not model and scorer is not engine and scorer is not index.loaded_model else None
        )
        if do_rerank
        else None,
    )


def _match_ids(index: IndexFolder, match: str, selector: np.ndarray | None) -> np.ndarray:
    """Ids whose captions match the full-text query ``match``, within ``selector`` when given."""
    import sqlite3

    if not match.strip():
        raise UsageError("empty --match", hint="pass words to look for in the captions, e.g. --match 'red bicycle'")
    try:
        ids = index.store.caption_match(match)
    except sqlite3.OperationalError as e:
        raise UsageError(
            f"--match {match!r} is not a valid full-text query ({e})",
            hint='use words, "a phrase", OR, NOT or prefix*; quote a word that holds punctuation',
        ) from e
    if selector is not None:
        ids = np.intersect1d(ids, selector)
    if len(ids) == 0:
        hint = "run `cocatk caption` first" if index.store.caption_count() == 0 else "try other words"
        raise EmptyIndexError(f"no indexed image has a caption matching {match!r}", hint=hint)
    return ids


def _tags_of(index: IndexFolder, ids: list[int]) -> dict[int, list[dict[str, Any]]] | None:
    """The hits' tags (latest settings), or None when the index was never tagged."""
    from . import tagstore

    return tagstore.tags_for_ids(index.store, ids) if ids and tagstore.latest_config(index.store) else None


def _tag_ids(index: IndexFolder, tag: str, selector: np.ndarray | None) -> np.ndarray:
    """Ids tagged ``tag`` (:func:`.tagstore.ids_with_tag`), within ``selector`` when given."""
    from . import tagstore

    ids = tagstore.ids_with_tag(index.store, tag.strip()) if tag.strip() else np.zeros(0, np.int64)
    ids = np.intersect1d(ids, selector) if selector is not None else ids
    if len(ids) == 0:
        none = tagstore.latest_config(index.store) is None
        raise EmptyIndexError(f"no indexed image is tagged {tag!r}",
                              hint="run `cocatk tag` first" if none else "try another label (`cocatk tag` lists the "
                              "most common)")  # fmt: skip
    return ids


BACKENDS = ("auto", "torch", "onnx")


def _text_engine(
    index: IndexFolder,
    backend: str,
    text: str | None,
    other_query: bool,
    rerank: bool,
    reranker: str,
    rerank_model: str | None,
    rerank_pretrained: str | None,
    use_cache: bool = True,
    image: bool = False,
) -> tuple[Any, str | None]:
    """The ONNX text tower, loaded, that embeds this query instead of the torch model (see ``backend`` in
    :func:`search_index`), or None for torch; and a warning when an export could not be used."""
    from ..errors import ExportError, ExportUnreadableError
    from ..models import onnx

    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}", hint=f"use one of: {', '.join(BACKENDS)}")
    rerank = rerank and text is not None  # an image alone is never reranked
    if backend == "torch" or other_query or (text is None and not image):
        return None, None  # stored vectors are torch's (and no query: build_query_vector says so)
    engine = onnx.open_text_onnx(index.manifest["identity"])
    if engine is not None and engine.embed_dim != index.dim:
        engine = None  # as IndexFolder.model: an export of another width is not this index's model
    if image:  # an image query takes the exported image tower under auto (and --backend onnx) where there is one
        if engine is None or not engine.can_embed_images or not _onnx_saves_torch(index, engine, False, reranker,
                                                                                    None, None):  # fmt: skip
            return None, None
        if text is None:
            backend = "auto"  # --backend is about text: an image alone falls back to torch silently
    if backend == "onnx" and engine is None:
        raise UsageError(
            f"no ONNX text tower for the model of {index.dir}",
            hint=f"run `cocatk index --index {index.dir}` once to export it (needs onnxruntime), or drop --backend",
        )
    if backend == "auto" and (engine is None or not _onnx_saves_torch(index, engine, rerank, reranker, rerank_model,
                                                                       rerank_pretrained, use_cache)):  # fmt: skip
        return None, None
    try:
        return engine.load(), None
    except ExportError as e:
        if backend == "onnx":
            raise
        if isinstance(e, ExportUnreadableError):
            # Files that cannot be loaded are set aside: the next `cocatk index` exports again.
            onnx.remove_export(index.manifest["identity"])
            return None, f"{e.message}: removed; the next `cocatk index` exports it again"
        return None, f"{e.message}; this query used torch ({e.hint})"


def _onnx_saves_torch(
    index: IndexFolder,
    engine: Any,
    rerank: bool,
    reranker: str,
    rerank_model: str | None,
    rerank_pretrained: str | None,
    use_cache: bool = True,
) -> bool:
    """``auto``'s rule: the export embeds the query only where nothing else will load torch in this search."""
    if index.loaded_model is not None:
        return False  # torch is loaded already: its model answers, as for every other query of this process
    device = index.device or config.default_device()
    precision = index.precision or config.default_precision()
    if device not in (None, "auto", "cpu") or precision not in (None, "auto", "fp32"):
        return False  # a device or precision asked for by name (or in $COCATK_DEVICE / $COCATK_PRECISION) is torch's
    if not rerank:
        return True
    if reranker != "coca" or rerank_model is not None or rerank_pretrained is not None or index.rerank_spec is not None:
        return False  # BLIP, or a separate CoCa: torch's
    # A dual-encoder index with no CoCa to rerank with only warns that it did not rerank; a CoCa index reranks in
    # ONNX Runtime from its cached tokens.
    return not engine.has_decoder or _onnx_reranks(index, engine, reranker, rerank_model, rerank_pretrained, use_cache)


def _onnx_reranks(
    index: IndexFolder,
    engine: Any,
    reranker: str,
    rerank_model: str | None,
    rerank_pretrained: str | None,
    use_cache: bool,
) -> bool:
    """True when the exported decoder can rerank this search: the default CoCa rerank with the index's own model,
    whose decoder was exported, from an index that caches its tokens (a candidate found without them still makes
    the rerank torch's)."""
    m = index.manifest
    return (
        reranker == "coca"
        and rerank_model is None
        and rerank_pretrained is None
        and index.rerank_spec is None
        and use_cache
        and bool(m.get("cache_tokens") and m.get("token_shape"))
        and getattr(engine, "can_rerank", False)
    )


def _load_reranker(index: IndexFolder, model: Any, reranker: str, name: str | None, pretrained: str | None) -> Any:
    """The stage-2 scorer: a BLIP-ITM, a CoCa (given, recorded, or the index's own), or None when the index's model
    has no decoder and no CoCa is named."""
    if reranker == "blip-itm":
        from ..models.blip import load_blip_itm

        return load_blip_itm(name, pretrained, device=index.device)
    if name is not None or pretrained is not None:
        index.check_rerank_model(name, pretrained, write=False)  # refuses a CoCa other than the recorded one
    if index.rerank_spec is not None:
        return index.rerank_model
    return model if model.has_decoder else None


def _existing_candidates(
    index: IndexFolder, vectors: Any, query: np.ndarray, want: int, total: int, selector: np.ndarray | None
) -> tuple[list[tuple[int, str, float]], list[tuple[str, str]]]:
    """The top ``want`` hits whose file still exists, in similarity order, and the (path, reason) of those skipped.

    A file deleted since the last `cocatk index` is never returned, in any mode: FAISS is asked for more hits
    (doubling k) until ``want`` existing files are found or the index is exhausted.
    """
    from ..sources import source_exists

    k = min(want, total)
    while True:
        s, i = vectors.search(query, k, id_selector=selector)
        keep = i[0] >= 0
        scores, ids = s[0][keep], i[0][keep]
        paths = index.store.paths_for_ids(ids.tolist())
        sources = index.item_sources(ids.tolist(), paths)
        found: list[tuple[int, str, float]] = []
        gone: list[tuple[str, str]] = []
        for fid, path, source, score in zip(ids, paths, sources, scores, strict=True):
            if path is None:
                continue
            if source_exists(source):
                found.append((int(fid), path, float(score)))
            else:
                gone.append((path, "file is gone"))
        if len(found) >= want or k >= total or len(ids) < k:
            return found[:want], gone
        k = min(total, 2 * k)


def indexed_folders(index: IndexFolder) -> list[tuple[str, int, bool]]:
    """The folders that hold indexed images, from the stored paths (the disk is not walked).

    Every root, and every folder between a root and an indexed file, with the number of indexed files at or below
    it. A search edge offers these as the ``under`` filter and accepts nothing else.

    Returns:
        (folder, files at or below it, is a root), sorted by folder.
    """
    roots = index.store.roots()
    counts: dict[str, int] = {r: 0 for r in roots}
    for path in index.store.file_rows():
        root = next((r for r in roots if path == r or path.startswith(r.rstrip("/") + "/")), None)
        folder = os.path.dirname(path)
        while True:
            counts[folder] = counts.get(folder, 0) + 1
            if root is None or folder == root or len(folder) <= len(root) or folder == os.path.dirname(folder):
                break
            folder = os.path.dirname(folder)
    root_set = set(roots)
    return [(f, c, f in root_set) for f, c in sorted(counts.items()) if c]  # a root that is a file has no count
