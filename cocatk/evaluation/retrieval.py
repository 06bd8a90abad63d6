"""Text <-> image retrieval evaluation on a captioned set (COCO 5k / Flickr30k 1k Karpathy test, or your own).

Protocol (as open_clip's and CLIP_benchmark's zero-shot retrieval): every image and every caption is embedded;
text -> image R@k is the share of captions whose image is among the k most similar images; image -> text R@k is the
share of images with at least one of their captions among the k most similar captions. Figures are percentages.

**Caption-likelihood rerank** (``rerank_ks``): the top-k of the contrastive ranking are re-ordered by CoCa's caption
log-likelihood, everything below k is left alone (so R@k itself cannot change for the rerank at k, only R@r, r < k):

- text -> image: for each caption, its k best images are sorted by log P(caption | image). The caption is fixed, so
  its prior P(caption) is the same for every candidate and plain likelihood ranks correctly.
- image -> text: for each image, its k best captions are sorted by log P(caption | image) - alpha * log P(caption).
  Here the candidates are different texts, and raw likelihood prefers short, generic, frequent captions; dividing out
  the text prior (VisualGPTScore, Lin et al. 2023) turns it into a pointwise-mutual-information score. log P(caption)
  is estimated as the mean log-likelihood over six content-free images (three flat greys, three uniform noises), the
  same estimate the zero-shot likelihood scorer uses. ``alpha = 1`` is full PMI, ``0`` no correction; the result
  also holds the no-prior figures so the effect is visible.

**Side by side** (``rerankers``): the likelihood rerank may use a separate CoCa (``rerank_model``) whatever model ranks
first (CLIP, SigLIP, EVA); BLIP's image-text matching head (``blip``, text -> image only: ``blip-itm@k``) reorders
the same top-k by P(match | image, text). ``costs_ms`` holds what each stage-2 scorer costs per query at each k on
this machine (measured on the first queries, with the load average at the time): CoCa from cached decoder tokens,
CoCa from the images (image tower + decoder, as a search without a token cache), BLIP-ITM from the images.

Data: :func:`~cocatk.evaluation.captioned.open_captioned_dataset` (COCO / Flickr30k Karpathy JSON, plain JSON,
the demo's ``captions.jsonl``, ``hf:PATH``).

Example:
    >>> from cocatk import load_model
    >>> from cocatk.demo.scenes import write_captioned_folder
    >>> from cocatk.evaluation import evaluate_retrieval, open_captioned_dataset
    >>> folder = write_captioned_folder("/tmp/shapes", n=24)                   # doctest: +SKIP
    >>> data = open_captioned_dataset(folder)                                  # doctest: +SKIP
    >>> result = evaluate_retrieval(load_model("coca-b32"), data)             # doctest: +SKIP
    >>> result.metrics["text_to_image"]["contrastive"]["R@1"]                 # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from .captioned import CaptionedDataset
from .data import default_workers, iter_batches

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..models import ClipModel, CocaModel
    from ..models.blip import BlipItmReranker

#: Recall cut-offs reported (the published tables use these).
RECALL_KS = (1, 5, 10)
#: Rerank depths evaluated by default.
DEFAULT_RERANK_KS = (10, 50)
#: Above this many bytes the decoder tokens of the whole set are kept in float16 (COCO 5k with L-14: 3.9 GB fp32).
TOKENS_FP32_LIMIT = 2 << 30

REFERENCE_SOURCE = "open_clip docs/openclip_retrieval_results.csv (zero-shot, Karpathy test split)"
#: (open_clip architecture, pretrained tag) -> benchmark -> published text -> image R@1/5/10 (%).
REFERENCES: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {
    ("coca_ViT-L-14", "laion2b_s13b_b90k"): {"coco5k": (45.65, 70.42, 79.21), "flickr1k": (74.28, 92.02, 95.42)},
    ("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k"): {
        "coco5k": (53.74, 77.79, 85.67),
        "flickr1k": (78.46, 94.52, 97.12),
    },
    ("coca_ViT-B-32", "laion2b_s13b_b90k"): {"coco5k": (36.18, 61.36, 71.76), "flickr1k": (63.36, 85.66, 91.44)},
}

ProgressFn = Callable[[str, int, int], None]


# ---- metrics -------------------------------------------------------------------------------------------------
def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """R@k in percent from 0-based ranks of the first correct item."""
    ranks = np.asarray(ranks)
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) if len(ranks) else math.nan for k in ks}


def _topk_sorted(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def text_to_image_ranks(
    text_emb: np.ndarray, image_emb: np.ndarray, caption_image: np.ndarray, k: int = 0, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each caption's image among all images, and each caption's top-``k`` image ids (best first).

    Returns:
        (ranks int64 (C,), candidates int64 (C, min(k, N)); empty when k = 0).
    """
    n_img = image_emb.shape[0]
    ranks = np.empty(len(text_emb), dtype=np.int64)
    cands = np.empty((len(text_emb), min(k, n_img)), dtype=np.int64)
    for i in range(0, len(text_emb), chunk):
        s = text_emb[i : i + chunk] @ image_emb.T
        gt = s[np.arange(len(s)), caption_image[i : i + chunk]]
        ranks[i : i + chunk] = (s > gt[:, None]).sum(axis=1)
        if k:
            cands[i : i + chunk] = _topk_sorted(s, k)
    return ranks, cands


def image_to_text_ranks(
    image_emb: np.ndarray, text_emb: np.ndarray, caption_image: np.ndarray, k: int = 0, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each image's best-ranked own caption among all captions, and each image's top-``k`` caption ids."""
    n = image_emb.shape[0]
    ranks = np.empty(n, dtype=np.int64)
    cands = np.empty((n, min(k, text_emb.shape[0])), dtype=np.int64)
    for i in range(0, n, chunk):
        s = image_emb[i : i + chunk] @ text_emb.T
        own = caption_image[None, :] == np.arange(i, i + len(s))[:, None]
        best = np.where(own, s, -np.inf).max(axis=1)
        ranks[i : i + chunk] = (s > best[:, None]).sum(axis=1)
        if k:
            cands[i : i + chunk] = _topk_sorted(s, k)
    return ranks, cands


def rerank_ranks(ranks: np.ndarray, candidates: np.ndarray, scores: np.ndarray, is_match: np.ndarray) -> np.ndarray:
    """Ranks after re-ordering each row's candidates by ``scores`` (higher first; ties keep the contrastive order).

    Args:
        ranks: (Q,) contrastive ranks of the first match.
        candidates: (Q, k) contrastive top-k ids. scores: (Q, k) rerank scores aligned with them.
        is_match: (Q, k) bool, whether each candidate is correct for its query.

    Returns:
        (Q,) new ranks: the first match's position among the reordered k, or the old rank when no match is in the
        top-k (everything below k keeps its place).
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    hit = np.take_along_axis(is_match, order, axis=1)
    found = hit.any(axis=1)
    return np.where(found, hit.argmax(axis=1), ranks).astype(np.int64)


# ---- the run -------------------------------------------------------------------------------------------------
@dataclass
class RetrievalResult:
    """Recall figures of one evaluation run (percentages) with what produced them."""

    dataset: str
    split: str | None
    benchmark: str | None
    n_images: int
    n_captions: int
    model: dict[str, Any]
    #: direction (``text_to_image`` / ``image_to_text``) -> method (``contrastive``, ``rerank@10``, ...,
    #: ``rerank@10 no prior``) -> ``{"R@1": .., "R@5": .., "R@10": ..}``
    metrics: dict[str, dict[str, dict[str, float]]]
    alpha: float
    rerank_ks: list[int]
    #: The published text -> image figures for this model and benchmark (contrastive), or None.
    reference: dict[str, Any] | None
    seconds: dict[str, float]
    #: The likelihood rerank's CoCa (when not ``model``) and the BLIP-ITM model, as ``info()`` dicts.
    rerank_models: dict[str, dict[str, Any]] | None = None
    #: scorer -> ``k=10`` -> milliseconds per query (see the module docstring).
    costs_ms: dict[str, dict[str, float]] | None = None
    #: os.getloadavg() (1, 5, 15 min) when the costs were measured; CPU cores.
    load_average: list[float] | None = None
    cpu_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_for(arch: str, pretrained: str, benchmark: str | None) -> dict[str, Any] | None:
    """Published open_clip text -> image R@1/5/10 for this model on ``coco5k`` / ``flickr1k``, or None."""
    values = REFERENCES.get((arch, pretrained), {}).get(benchmark or "")
    if values is None:
        return None
    return {
        "benchmark": benchmark,
        "text_to_image": dict(zip(("R@1", "R@5", "R@10"), values, strict=False)),
        "source": REFERENCE_SOURCE,
    }


def _encode_dataset(
    model: CocaModel, data: CaptionedDataset, tokens: bool, batch_size: int, workers: int, progress: ProgressFn
) -> tuple[np.ndarray, torch.Tensor | None]:
    import torch

    n = len(data)
    embs: list[np.ndarray] = []
    toks: torch.Tensor | None = None
    # Every image is needed (captions point at them), so a decode error propagates instead of being skipped.
    batches = iter_batches(np.arange(n), list, data.load, batch_size, max(1, workers), skip_failures=False)
    for idx, images, _ in batches:
        i = int(idx[0])
        e, t = model.encode_images_and_tokens(images, batch_size=batch_size, tokens=tokens)
        embs.append(e)
        if t is not None:
            if toks is None:
                per_image = t.shape[1] * t.shape[2] * 4
                dtype = torch.float32 if n * per_image <= TOKENS_FP32_LIMIT else torch.float16
                toks = torch.empty((n, *t.shape[1:]), dtype=dtype)
            toks[i : i + len(t)] = t.to("cpu", toks.dtype)
        progress("images", i + len(idx), n)
    return np.concatenate(embs), toks


def _loglik(model: CocaModel, text: str, tokens: torch.Tensor, rows: np.ndarray) -> np.ndarray:
    import torch

    return model.caption_loglik(text, tokens[torch.as_tensor(rows)].float())


def evaluate_retrieval(
    model: ClipModel,
    data: CaptionedDataset,
    rerank_ks: Sequence[int] = DEFAULT_RERANK_KS,
    alpha: float = 1.0,
    limit: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    rerank_model: CocaModel | None = None,
    blip: BlipItmReranker | None = None,
    likelihood: bool = True,
    cost_queries: int = 0,
) -> RetrievalResult:
    """Text -> image and image -> text R@1/5/10, contrastive and with the caption-likelihood rerank at each k.

    Args:
        model: a loaded :class:`~cocatk.models.ClipModel` (CoCa or any dual encoder): the first stage.
        rerank_model: the CoCa of the likelihood rerank (default ``model`` when it is a CoCa).
        blip: a :class:`~cocatk.models.blip.BlipItmReranker`: also report ``blip-itm@k`` (text -> image).
        likelihood: False leaves the CoCa likelihood rerank out (only BLIP, or contrastive only).
        cost_queries: measure each scorer's cost per query at each k on this many captions (``costs_ms``).
        data: from :func:`open_captioned_dataset`.
        rerank_ks: rerank depths (empty: contrastive only). Cost: one decoder pass per caption and candidate.
        alpha: weight of the caption prior in the image -> text rerank (module docstring).
        limit: evaluate on the first ``limit`` images only (and their captions).
        batch_size: images per forward pass. workers: image decode threads.
        progress: called as ``progress(stage, done, total)``.

    Returns:
        A :class:`RetrievalResult`.

    Raises:
        UsageError: bad k or alpha. DecoderRequiredError: a likelihood rerank without any CoCa.
    """
    ks = sorted({int(k) for k in rerank_ks})
    if any(k < 2 for k in ks):
        raise UsageError(f"rerank depths must be >= 2, got {list(rerank_ks)}", hint="e.g. --rerank 10,50")
    if not math.isfinite(alpha):
        raise UsageError(f"alpha must be a finite number, got {alpha}", hint="pass e.g. --alpha 1")
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be >= 1, got {limit}", hint="pass a positive --limit")
        data = data.subset(limit)
    progress = progress or (lambda stage, done, total: None)
    bs = batch_size or model.image_batch_size
    workers = workers if workers is not None else default_workers()
    seconds: dict[str, float] = {}
    kmax = max(ks, default=0)

    lik = rerank_model if rerank_model is not None else (model if model.has_decoder else None)
    if ks and likelihood and lik is None:
        model.image_tokens([])  # raises DecoderRequiredError with the --rerank-model hint
    use_lik = bool(ks and likelihood and lik is not None)
    t = time.perf_counter()
    img, tokens = _encode_dataset(model, data, use_lik and lik is model, bs, workers, progress)
    seconds["encode_images"] = time.perf_counter() - t
    if use_lik and lik is not model:
        assert lik is not None
        t = time.perf_counter()
        _, tokens = _encode_dataset(lik, data, True, bs, workers, progress)
        seconds["encode_rerank_tokens"] = time.perf_counter() - t
    blip_embeds = None
    if ks and blip is not None:
        t = time.perf_counter()
        blip_embeds = _blip_dataset(blip, data, bs, workers, progress)
        seconds["encode_blip_images"] = time.perf_counter() - t
    t = time.perf_counter()
    txt = model.encode_texts(data.captions)
    seconds["encode_texts"] = time.perf_counter() - t

    owner = data.caption_image
    t2i_ranks, t2i_cands = text_to_image_ranks(txt, img, owner, kmax)
    i2t_ranks, i2t_cands = image_to_text_ranks(img, txt, owner, kmax)
    metrics: dict[str, dict[str, dict[str, float]]] = {
        "text_to_image": {"contrastive": recall_from_ranks(t2i_ranks)},
        "image_to_text": {"contrastive": recall_from_ranks(i2t_ranks)},
    }

    if use_lik and tokens is not None:
        assert lik is not None
        model_for_lik = model
        model = lik  # the likelihood scorer below; the first stage is model_for_lik
        # text -> image: one decoder call per caption over its kmax candidates; smaller k reuse the prefix.
        t = time.perf_counter()
        t2i_scores = np.empty(t2i_cands.shape, dtype=np.float64)
        for q, caption in enumerate(data.captions):
            t2i_scores[q] = _loglik(model, caption, tokens, t2i_cands[q])
            if q % 256 == 0 or q == len(data.captions) - 1:
                progress("rerank text->image", q + 1, len(data.captions))
        seconds["rerank_text_to_image"] = time.perf_counter() - t

        # image -> text: group the (image, caption) pairs by caption so each caption is decoded once.
        t = time.perf_counter()
        from .zeroshot import null_images

        null_tokens = model.image_tokens(null_images(model.image_size)).cpu()
        flat = i2t_cands.ravel()
        order = np.argsort(flat, kind="stable")
        uniq, starts = np.unique(flat[order], return_index=True)
        i2t_scores = np.empty(flat.shape, dtype=np.float64)
        prior = np.zeros(len(data.captions), dtype=np.float64)
        for j, (c, s) in enumerate(zip(uniq, [*starts[1:], len(flat)], strict=False)):
            pos = order[starts[j] : s]
            i2t_scores[pos] = _loglik(model, data.captions[c], tokens, pos // i2t_cands.shape[1])
            prior[c] = float(model.caption_loglik(data.captions[c], null_tokens).mean())
            if j % 256 == 0 or j == len(uniq) - 1:
                progress("rerank image->text", j + 1, len(uniq))
        i2t_scores = i2t_scores.reshape(i2t_cands.shape)
        seconds["rerank_image_to_text"] = time.perf_counter() - t

        t2i_match = t2i_cands == owner[:, None]
        i2t_match = owner[i2t_cands] == np.arange(len(data))[:, None]
        for k in ks:
            kk = min(k, t2i_cands.shape[1])
            new = rerank_ranks(t2i_ranks, t2i_cands[:, :kk], t2i_scores[:, :kk], t2i_match[:, :kk])
            metrics["text_to_image"][f"rerank@{k}"] = recall_from_ranks(new)
            kk = min(k, i2t_cands.shape[1])
            pmi = i2t_scores[:, :kk] - alpha * prior[i2t_cands[:, :kk]]
            new = rerank_ranks(i2t_ranks, i2t_cands[:, :kk], pmi, i2t_match[:, :kk])
            metrics["image_to_text"][f"rerank@{k}"] = recall_from_ranks(new)
            new = rerank_ranks(i2t_ranks, i2t_cands[:, :kk], i2t_scores[:, :kk], i2t_match[:, :kk])
            metrics["image_to_text"][f"rerank@{k} no prior"] = recall_from_ranks(new)
        model = model_for_lik

    if blip is not None and blip_embeds is not None:
        t = time.perf_counter()
        blip_scores = np.empty(t2i_cands.shape, dtype=np.float64)
        for q, caption in enumerate(data.captions):
            blip_scores[q] = blip.score_embeds(caption, blip_embeds[_as_index(t2i_cands[q])])
            if q % 256 == 0 or q == len(data.captions) - 1:
                progress("blip-itm text->image", q + 1, len(data.captions))
        seconds["blip_text_to_image"] = time.perf_counter() - t
        t2i_match = t2i_cands == owner[:, None]
        for k in ks:
            kk = min(k, t2i_cands.shape[1])
            new = rerank_ranks(t2i_ranks, t2i_cands[:, :kk], blip_scores[:, :kk], t2i_match[:, :kk])
            metrics["text_to_image"][f"blip-itm@{k}"] = recall_from_ranks(new)

    costs = None
    load = None
    if cost_queries and ks:
        import os

        costs = measure_costs(model, data, img, ks, lik if use_lik else None, tokens, blip, cost_queries)
        load = [round(x, 2) for x in os.getloadavg()]

    info = model.info()
    return RetrievalResult(
        dataset=data.name,
        split=data.split,
        benchmark=data.benchmark,
        n_images=len(data),
        n_captions=len(data.captions),
        model=info,
        metrics=metrics,
        alpha=float(alpha),
        rerank_ks=ks,
        reference=reference_for(model.spec.arch, model.spec.pretrained, data.benchmark),
        seconds=seconds,
        rerank_models={
            **({"coca": lik.info()} if use_lik and lik is not None and lik is not model else {}),
            **({"blip-itm": blip.info()} if blip is not None else {}),
        }
        or None,
        costs_ms=costs,
        load_average=load,
        cpu_count=_cpu_count() if costs else None,
    )


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _as_index(rows: np.ndarray) -> Any:
    import torch

    return torch.as_tensor(np.asarray(rows, dtype=np.int64))


def _blip_dataset(
    blip: BlipItmReranker, data: CaptionedDataset, batch_size: int, workers: int, progress: ProgressFn
) -> torch.Tensor:
    """BLIP's vision-tower output of every image (computed once; the ITM text encoder runs per query)."""
    import torch

    n = len(data)
    out: list[torch.Tensor] = []
    batches = iter_batches(np.arange(n), list, data.load, batch_size, max(1, workers), skip_failures=False)
    for idx, images, _ in batches:
        out.append(blip.image_embeds(images).cpu())
        progress("blip-itm images", int(idx[0]) + len(idx), n)
    return torch.cat(out)


def measure_costs(
    model: ClipModel,
    data: CaptionedDataset,
    image_emb: np.ndarray,
    ks: Sequence[int],
    lik: CocaModel | None,
    tokens: torch.Tensor | None,
    blip: BlipItmReranker | None,
    queries: int,
) -> dict[str, dict[str, float]]:
    """Milliseconds per text query of each scorer at each k, the median over the first ``queries`` captions.

    ``contrastive``: embed the text and rank every image (brute force). ``coca (cached tokens)``: the decoder over
    k candidates whose tokens are in memory (a ``--cache-tokens`` index). ``coca (from images)``: decode and
    preprocess the k image files, the CoCa image tower, then the decoder (a search without a token cache).
    ``blip-itm``: decode the k files, BLIP's vision tower, then its ITM text encoder. Candidate lists shorter than k
    (a small set) repeat images to reach k, so every row costs k images.
    """
    n_q = min(queries, len(data.captions))
    out: dict[str, dict[str, float]] = {}

    def median_ms(fn: Callable[[int], Any]) -> float:
        times = []
        for q in range(n_q):
            t = time.perf_counter()
            fn(q)
            times.append(time.perf_counter() - t)
        return round(1000 * float(np.median(times)), 2)

    def rows(k: int) -> np.ndarray:
        return np.resize(np.arange(len(data)), k)  # k images, cycling through a small set

    def contrastive(q: int) -> None:
        e = model.encode_texts([data.captions[q]])
        _topk_sorted(e @ image_emb.T, max(ks))

    out["contrastive"] = {f"k={k}": median_ms(contrastive) for k in ks}
    for k in ks:
        if lik is not None and tokens is not None:
            out.setdefault("coca likelihood (cached tokens)", {})[f"k={k}"] = median_ms(
                lambda q, k=k: _loglik(lik, data.captions[q], tokens, rows(k))
            )
            out.setdefault("coca likelihood (from images)", {})[f"k={k}"] = median_ms(
                lambda q, k=k: lik.caption_loglik(
                    data.captions[q], lik.image_tokens([data.load(int(i)) for i in rows(k)])
                )
            )
    for k in ks:  # last: the slowest by far on a CPU
        if blip is not None:
            out.setdefault("blip-itm (from images)", {})[f"k={k}"] = median_ms(
                lambda q, k=k: blip.score(data.captions[q], [data.load(int(i)) for i in rows(k)])
            )
    return out
