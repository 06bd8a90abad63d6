"""Zero-shot evaluation: build (or load) the classifier, stream the images through the model, report accuracy.

Scorers:

- ``contrastive``: logits = 100 * image @ W (open_clip's protocol).
- ``likelihood``: each class scored by the caption log-likelihood of its prompt given the image, minus ``alpha``
  times the prompt's prior log P(t) (estimated on blank and noise images). One decoder pass per class and image
  batch, so it is limited to :data:`MAX_LIKELIHOOD_CLASSES` classes.
- ``rerank``: the contrastive top-5 reordered by the debiased likelihood.

The contrastive numbers are always reported; the generative ones beside them.

Example:
    >>> from cocatk import evaluate_zeroshot
    >>> r = evaluate_zeroshot("imagenet", "coca-l14", data_dir="/data/imagenet/val")   # doctest: +SKIP
    >>> round(r.metrics["top1"], 4)                                                     # doctest: +SKIP
    0.7561
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import DatasetError, ImageError, UsageError
from ..zeroshot.classifier import ProgressFn, ZeroShotClassifier
from ..zeroshot.references import reference_for
from ..zeroshot.templates import TEMPLATE_SETS, fill, likelihood_prompt, load_templates
from .data import default_workers, iter_batches
from .labelled import ZeroShotDataset, open_dataset

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..models import CocaModel

SCORERS = ("contrastive", "likelihood", "rerank")
#: The likelihood scorer runs the decoder once per class: beyond this, use ``rerank``.
MAX_LIKELIHOOD_CLASSES = 100
#: Candidates the rerank scorer reorders (the contrastive top-k).
RERANK_K = 5
#: How many failed images the result lists by name (all are counted).
MAX_LISTED_FAILURES = 20


@dataclass
class ZeroShotResult:
    """The outcome of :func:`evaluate_zeroshot`; ``to_dict()`` is the JSON result record.

    ``metrics`` holds the chosen scorer's numbers (``top1``, ``top5`` when >= 5 classes, ``mean_per_class_recall``,
    all fractions, and ``n``); ``by_scorer`` holds every scorer that ran (contrastive always).
    """

    model: dict[str, Any]
    data: dict[str, Any]
    templates: dict[str, Any]
    scorer: str
    metrics: dict[str, Any]
    by_scorer: dict[str, dict[str, Any]]
    reference: dict[str, Any] | None
    timings: dict[str, Any]
    skipped: dict[str, Any] = field(default_factory=lambda: {"count": 0, "examples": []})
    likelihood: dict[str, Any] | None = None
    cocatk_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- metrics -----------------------------------------------------------------------------------------------
def rank_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best class ids per row of (N, C) scores, best first (ties: lower class id first)."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def ranking_metrics(ranked: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """top-1, top-5 (when there are >= 5 classes), mean per-class recall and N from ranked predictions (N, k).

    Mean per-class recall averages, over the classes present in ``labels``, the fraction of their images whose
    top-1 prediction is right (``sklearn.metrics.balanced_accuracy_score``, as CLIP_benchmark reports it).
    """
    n = int(labels.shape[0])
    if n == 0:
        raise DatasetError("no image could be evaluated", hint="check the dataset: every image failed to decode")
    hit1 = ranked[:, 0] == labels
    out: dict[str, Any] = {"top1": float(hit1.mean())}
    if num_classes >= 5:
        out["top5"] = float((ranked[:, :5] == labels[:, None]).any(axis=1).mean())
    present = np.unique(labels)
    recalls = [float(hit1[labels == c].mean()) for c in present]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    out["n"] = n
    return out


# ---- generative scoring ------------------------------------------------------------------------------------
def null_images(size: int, count: int = 3, seed: int = 0) -> list[Any]:
    """``count`` constant-grey images (25 %, 50 %, 75 % ...) and ``count`` uniform-noise images, RGB ``size`` px."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    greys = [Image.new("RGB", (size, size), (v, v, v)) for v in np.linspace(64, 192, count).astype(int).tolist()]
    noise = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB") for _ in range(count)]
    return greys + noise


def text_priors(model: CocaModel, prompts: Sequence[str]) -> np.ndarray:
    """log P(t) per prompt: the mean caption log-likelihood over :func:`null_images` (float64, (len(prompts),))."""
    tokens = model.image_tokens(null_images(model.image_size))
    return np.array([float(model.caption_loglik(p, tokens).mean()) for p in prompts], dtype=np.float64)


def likelihood_scores(model: CocaModel, prompts: Sequence[str], tokens: torch.Tensor) -> np.ndarray:
    """log P(prompt_c | image_i) for every image and class: (N, C) float64."""
    return np.stack([model.caption_loglik(p, tokens) for p in prompts], axis=1)


def rerank_scores(model: CocaModel, prompts: Sequence[str], tokens: torch.Tensor, candidates: np.ndarray) -> np.ndarray:
    """log P(prompt | image) for each image's candidate classes: (N, k) float64 aligned with ``candidates``.

    The decoder runs once per distinct candidate class, over the images that have it among their candidates.
    """
    import torch

    out = np.empty(candidates.shape, dtype=np.float64)
    for c in np.unique(candidates):
        rows, cols = np.nonzero(candidates == c)
        out[rows, cols] = model.caption_loglik(prompts[int(c)], tokens[torch.as_tensor(rows, device=tokens.device)])
    return out


def _select(n: int, limit: int | None) -> np.ndarray:
    """All indices, or ``limit`` evenly spaced ones (deterministic, and spread over every class of a sorted set)."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, limit).astype(np.int64)


def evaluate_zeroshot(
    dataset: str | ZeroShotDataset,
    model: str | CocaModel | None = None,
    *,
    pretrained: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    data_dir: str | Path | None = None,
    split: str | None = None,
    templates: str | Sequence[str] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    limit: int | None = None,
    scorer: str = "contrastive",
    alpha: float = 1.0,
    image_column: str | None = None,
    label_column: str | None = None,
    cache: bool = True,
    progress: ProgressFn | None = None,
) -> ZeroShotResult:
    """Zero-shot classification accuracy of a CoCa model on a labelled dataset.

    Args:
        dataset: ``imagenet``, ``cifar10``, ``cifar100``, an ImageFolder path, ``hf:NAME`` / ``hf:PATH``, or a
            :class:`~cocatk.evaluation.labelled.ZeroShotDataset`.
        model: a loaded :class:`~cocatk.models.CocaModel` or a model name (loaded with ``pretrained``, ``device``,
            ``precision``).
        data_dir, split, image_column, label_column: see :func:`~cocatk.evaluation.labelled.open_dataset`.
        templates: ``openai``, ``simple``, ``cifar``, a file path, or a list of templates; default the dataset's.
        batch_size: images per forward pass (default the model's).
        workers: decode threads (0 decodes in the calling thread; default min(8, cores)).
        limit: evaluate only this many images, evenly spaced over the dataset.
        scorer: ``contrastive``, ``likelihood`` or ``rerank``.
        alpha: weight of the prompt prior in the generative score, log P(t|i) - alpha * log P(t).
        cache: use the on-disk classifier cache.
        progress: ``progress(stage, done, total)`` with stages ``text``, ``prior`` and ``images``.

    Returns:
        A :class:`ZeroShotResult`.

    Raises:
        DatasetError, UsageError, and the model loading errors.
    """
    t_start = time.perf_counter()
    if scorer not in SCORERS:
        raise UsageError(f"unknown scorer '{scorer}'", hint=f"use one of: {', '.join(SCORERS)}")
    if not math.isfinite(alpha):
        raise UsageError(f"alpha must be a finite number, got {alpha}", hint="pass e.g. --alpha 1")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}", hint="pass a positive number of images")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}", hint="pass a positive batch size")
    if workers is not None and workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}", hint="pass 0 (no threads) or more")

    ds = (
        dataset
        if isinstance(dataset, ZeroShotDataset)
        else open_dataset(dataset, data_dir, split, image_column, label_column)
    )
    if templates is None or isinstance(templates, str):
        template_label, template_list = load_templates(templates, default=ds.default_templates)
    else:
        template_list = [str(t) for t in templates]
        template_label = "custom"
    num_classes = len(ds.classnames)
    if scorer == "likelihood" and num_classes > MAX_LIKELIHOOD_CLASSES:
        raise UsageError(
            f"--scorer likelihood runs the decoder once per class; {num_classes} classes is too many "
            f"(limit {MAX_LIKELIHOOD_CLASSES})",
            hint="use --scorer rerank (reorders the contrastive top-5 by likelihood)",
        )

    t_model = time.perf_counter()
    if model is None or isinstance(model, str):
        from ..models import load_model

        model = load_model(model, pretrained, device, precision)
    model_s = time.perf_counter() - t_model

    clf = ZeroShotClassifier.from_classnames(model, ds.classnames, template_list, cache=cache, progress=progress)

    generative = scorer != "contrastive"
    prompt_template = likelihood_prompt(template_list, builtin=template_label in TEMPLATE_SETS)
    prompts = [fill(prompt_template, c) for c in ds.classnames]
    prior = np.zeros(num_classes)
    prior_s = 0.0
    if generative:
        t_prior = time.perf_counter()
        prior = text_priors(model, prompts)
        prior_s = time.perf_counter() - t_prior
        if progress:
            progress("prior", num_classes, num_classes)

    indices = _select(len(ds), limit)
    bs = batch_size or model.image_batch_size
    n_workers = default_workers() if workers is None else workers
    kept: list[np.ndarray] = []
    ranked_c: list[np.ndarray] = []
    ranked_g: list[np.ndarray] = []
    failures: list[str] = []
    n_failed = 0
    done = 0
    t_images = time.perf_counter()
    import torch

    def load(raw: Any) -> Any:
        return model.preprocess(ds.decode(raw))

    for idx, tensors, failed in iter_batches(indices, ds.fetch, load, bs, n_workers):
        n_failed += len(failed)
        failures += failed[: max(0, MAX_LISTED_FAILURES - len(failures))]
        done += len(idx) + len(failed)
        if len(idx):
            emb, tokens = model.encode_images_and_tokens(torch.stack(tensors), batch_size=bs, tokens=generative)
            logits = clf.logits(emb)
            top = rank_classes(logits, RERANK_K)
            ranked_c.append(top)
            if scorer == "likelihood":
                ranked_g.append(rank_classes(likelihood_scores(model, prompts, tokens) - alpha * prior, RERANK_K))
            elif scorer == "rerank":
                gen = rerank_scores(model, prompts, tokens, top) - alpha * prior[top]
                ranked_g.append(np.take_along_axis(top, np.argsort(-gen, axis=1, kind="stable"), axis=1))
            kept.append(idx)
        if progress:
            progress("images", done, len(indices))
    images_s = time.perf_counter() - t_images

    labels = ds.labels[np.concatenate(kept)] if kept else np.zeros(0, np.int64)
    by_scorer = {
        "contrastive": ranking_metrics(
            np.concatenate(ranked_c) if ranked_c else np.zeros((0, 1), np.int64), labels, num_classes
        )
    }
    if generative:
        by_scorer[scorer] = ranking_metrics(np.concatenate(ranked_g), labels, num_classes)

    info = model.info()
    reference = reference_for(model.spec.arch, model.spec.pretrained, ds.benchmark)
    if reference is not None:
        top1 = by_scorer["contrastive"]["top1"]
        reference["delta_top1"] = top1 - reference["top1"]
        reference["comparable"] = len(indices) == len(ds) and n_failed == 0 and template_label == reference["templates"]
    n_images = int(labels.shape[0])
    return ZeroShotResult(
        model={**info, "identity": model.spec.identity()},
        data={**ds.describe(), "split": split, "limit": limit, "evaluated": n_images},
        templates={"name": template_label, "count": len(template_list), "first": template_list[0]},
        scorer=scorer,
        metrics=by_scorer[scorer],
        by_scorer=by_scorer,
        reference=reference,
        timings={
            "model_load_s": round(model_s, 3),
            "classifier_s": round(clf.build_seconds, 3),
            "classifier_cached": clf.from_cache,
            "classifier_cache": str(clf.cache_path) if clf.cache_path else None,
            "prior_s": round(prior_s, 3),
            "images_s": round(images_s, 3),
            "images_per_s": round(done / images_s, 2) if images_s > 0 else None,
            "total_s": round(time.perf_counter() - t_start, 3),
            "workers": n_workers,
            "batch_size": bs,
        },
        skipped={"count": n_failed, "examples": failures},
        likelihood={"prompt": prompt_template, "alpha": alpha, "null_images": 6} if generative else None,
    )


def classify_images(
    images: Sequence[str | Path],
    labels: Sequence[str],
    model: str | CocaModel | None = None,
    *,
    pretrained: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    templates: str | Sequence[str] | None = None,
    top_n: int = 5,
    cache: bool = True,
) -> dict[str, Any]:
    """Ad-hoc zero-shot classification of image files against free-text labels.

    Probabilities are the softmax of the model's logit_scale x cosine similarity.

    Returns:
        ``{"labels", "templates", "model", "results": [{"image", "predictions": [{"label", "probability"}]}],
        "skipped": [{"image", "error"}]}``. Unreadable images are skipped, not fatal.

    Raises:
        UsageError: no labels, duplicate labels, or top_n < 1.
    """
    names = [str(lab).strip() for lab in labels if str(lab).strip()]
    if not names:
        raise UsageError("no labels given", hint='pass --labels "cat,dog,car"')
    if len(set(names)) != len(names):
        raise UsageError("duplicate labels", hint="list each label once")
    if top_n < 1:
        raise UsageError(f"-n must be >= 1, got {top_n}", hint="pass -n 1 or more")
    missing = [str(p) for p in images if not os.path.isfile(p)]
    if missing:  # checked before the model loads: a typo should not cost a model load
        from ..paths import display_path

        shown = ", ".join(display_path(p) for p in missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise UsageError(f"no such image file: {shown}", hint="check the paths; pass existing image files")
    if templates is None or isinstance(templates, str):
        template_label, template_list = load_templates(templates, default="simple")
    else:
        template_label, template_list = "custom", [str(t) for t in templates]
    if model is None or isinstance(model, str):
        from ..models import load_model

        model = load_model(model, pretrained, device, precision)
    clf = ZeroShotClassifier.from_classnames(model, names, template_list, cache=cache)

    from ..images import ImageDecodeError, load_image

    decoded, ok, skipped = [], [], []
    for path in images:
        try:  # decoded like the indexer does (EXIF orientation applied, megapixel guard)
            decoded.append(load_image(path))
            ok.append(str(path))
        except ImageDecodeError as e:  # skipped and reported, like every command that reads files
            skipped.append({"image": str(path), "error": e.reason + (f" ({e.detail})" if e.detail else "")})
    if not decoded:
        raise ImageError(
            f"none of the {len(skipped)} image(s) could be decoded ({skipped[0]['error']})",
            hint="pass readable JPEG, PNG, WebP, ... files",
        )
    preds = clf.predict(decoded, top_n=top_n)
    return {
        "model": model.info(),
        "labels": names,
        "templates": {"name": template_label, "count": len(template_list)},
        "logit_scale": clf.logit_scale,
        "results": [
            {"image": p, "predictions": [{"label": lab, "probability": prob} for lab, prob in pr]}
            for p, pr in zip(ok, preds, strict=True)
        ],
        "skipped": skipped,
        "warnings": model.notices(),
    }
