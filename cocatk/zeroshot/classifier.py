"""Zero-shot classifiers: class-name x template text embeddings, averaged and re-normalised, cached on disk.

The weights are exactly open_clip's ``build_zero_shot_classifier``: per class, encode every template (normalised),
average, re-normalise. They are cached under ``cocatk.config.cache_dir() / "zeroshot"`` as ``<key>.npy`` plus a
``<key>.json`` manifest, keyed by the model identity, the templates and the class names, so a second run with the
same model and prompts never runs the text tower.

Example:
    >>> from cocatk import load_model, ZeroShotClassifier
    >>> model = load_model("coca-b32")                                           # doctest: +SKIP
    >>> clf = ZeroShotClassifier.from_classnames(model, ["cat", "dog"], ["a photo of a {}."])  # doctest: +SKIP
    >>> clf.predict(images)[0]                                                   # doctest: +SKIP
    [('cat', 0.93), ('dog', 0.07)]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import config
from .._version import __version__
from ..errors import UsageError
from .templates import fill

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from ..models import CocaModel

#: Bumped when the cached array's meaning changes; part of the cache key.
CACHE_SCHEMA = 1
#: Scale of the evaluation logits (open_clip's zero-shot eval uses 100 * image @ W).
EVAL_LOGIT_SCALE = 100.0

#: progress(stage, done, total)
ProgressFn = Callable[[str, int, int], None]


def classifier_key(identity: dict[str, str], classnames: Sequence[str], templates: Sequence[str]) -> str:
    """The cache key: sha256 of the model identity, the class names and the templates (in order)."""
    blob = json.dumps(
        {"schema": CACHE_SCHEMA, "model": identity, "classnames": list(classnames), "templates": list(templates)},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temp file in the same folder, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_class_weights(
    model: CocaModel,
    classnames: Sequence[str],
    templates: Sequence[str],
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Class embeddings (C, D) float32: mean of the normalised template embeddings, re-normalised.

    Same computation as ``open_clip.build_zero_shot_classifier`` (which returns the transpose, (D, C)).
    """
    if not classnames:
        raise UsageError("no class names", hint="pass at least one class name")
    if not templates:
        raise UsageError("no templates", hint="pass at least one template with {} for the class name")
    t = len(templates)
    # Encode several classes per call so a text batch is full even with few templates (7 simple, 18 cifar).
    per_call = max(1, 1024 // t)
    out = np.empty((len(classnames), model.embed_dim), np.float32)
    for start in range(0, len(classnames), per_call):
        names = classnames[start : start + per_call]
        texts = [fill(tpl, name) for name in names for tpl in templates]
        emb = model.encode_texts(texts).reshape(len(names), t, -1).mean(axis=1)
        out[start : start + len(names)] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        if progress:
            progress("text", start + len(names), len(classnames))
    return np.ascontiguousarray(out)


@dataclass
class ZeroShotClassifier:
    """Text-side weights of a zero-shot classifier plus the model that scores images against them.

    Attributes:
        model: the :class:`~cocatk.models.CocaModel`.
        classnames: class names in label order.
        templates: the prompt templates averaged per class.
        weights: (C, D) float32, L2-normalised rows.
        cache_path: the ``.npy`` file the weights were read from or written to (None when caching is off).
        from_cache: True when the weights came from the cache (the text tower did not run).
        build_seconds: time spent building or loading the weights.
    """

    model: CocaModel
    classnames: list[str]
    templates: list[str]
    weights: np.ndarray
    cache_path: Path | None = None
    from_cache: bool = False
    build_seconds: float = 0.0
    _logit_scale: float | None = field(default=None, repr=False)

    @classmethod
    def from_classnames(
        cls,
        model: CocaModel,
        classnames: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        cache: bool = True,
        progress: ProgressFn | None = None,
    ) -> ZeroShotClassifier:
        """Build (or load from the cache) the classifier for ``classnames`` x ``templates``.

        Args:
            model: a loaded CoCa model.
            classnames: class names in label order.
            templates: prompt templates with ``{}`` (default: ``["a photo of a {}."]``).
            cache: read and write the on-disk cache (``$COCATK_CACHE/zeroshot``).
            progress: called as ``progress("text", classes_done, classes_total)``.

        Raises:
            UsageError: empty class names or templates, or a template without ``{}``.
        """
        classnames = [str(c) for c in classnames]
        templates = list(templates) if templates is not None else ["a photo of a {}."]
        for tpl in templates:
            if "{}" not in tpl:
                raise UsageError(f"template {tpl!r} has no '{{}}'", hint="put {} where the class name goes")
        t0 = time.perf_counter()
        path: Path | None = None
        if cache:
            identity = dict(model.spec.identity())
            if getattr(model, "cpu_bf16", False):  # the bf16 text tower's weights differ slightly from fp32's
                identity["text_precision"] = "bf16"
            key = classifier_key(identity, classnames, templates)
            path = config.cache_dir() / "zeroshot" / f"{key}.npy"
            weights = _read_cache(path, len(classnames), model.embed_dim)
            if weights is not None:
                return cls(model, classnames, templates, weights, path, True, time.perf_counter() - t0)
        weights = build_class_weights(model, classnames, templates, progress)
        if path is not None:
            extra = {"kind": getattr(model, "kind", "coca")}
            with contextlib.suppress(AttributeError):  # the scale lets a reader use the weights without the model
                extra["logit_scale"] = float(model.model.logit_scale.detach().exp().float().cpu())
            _write_cache(path, weights, model.spec.identity(), classnames, templates, extra)
        return cls(model, classnames, templates, weights, path, False, time.perf_counter() - t0)

    # ---- scoring -------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def logit_scale(self) -> float:
        """The model's learned temperature, exp(logit_scale) (about 100 for trained CoCa)."""
        if self._logit_scale is None:
            self._logit_scale = float(self.model.model.logit_scale.detach().exp().float().cpu())
        return self._logit_scale

    def logits(self, image_embeddings: np.ndarray, scale: float = EVAL_LOGIT_SCALE) -> np.ndarray:
        """``scale * image @ W.T``: (N, C) float32 for L2-normalised image embeddings (N, D)."""
        if image_embeddings.ndim != 2 or image_embeddings.shape[1] != self.weights.shape[1]:
            raise UsageError(
                f"expected image embeddings (N, {self.weights.shape[1]}), got {image_embeddings.shape}",
                hint="pass the output of CocaModel.encode_images for the same model",
            )
        return (scale * (image_embeddings @ self.weights.T)).astype(np.float32)

    def probabilities(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """Class probabilities (N, C): softmax of the model's logit_scale x cosine similarity; for a SigLIP model its
        own per-label sigmoid(logit_scale x cosine + logit_bias) (labels are scored independently, as it was trained).

        Args:
            images: PIL images, or image embeddings (N, D) from the same model.
        """
        emb = images if isinstance(images, np.ndarray) else self.model.encode_images(images)
        if getattr(self.model, "kind", "coca") == "siglip":
            return self.model.match_probability(emb, self.weights)
        z = self.logits(emb, scale=self.logit_scale).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, images: Sequence[Image.Image] | np.ndarray, top_n: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top_n`` most probable labels per image, as (label, probability), best first."""
        if top_n < 1:
            raise UsageError(f"top_n must be >= 1, got {top_n}", hint="pass -n 1 or more")
        probs = self.probabilities(images)
        k = min(top_n, self.num_classes)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classnames[j], float(row[j])) for j in idx] for row, idx in zip(probs, order, strict=True)]


def _read_cache(path: Path, num_classes: int, dim: int) -> np.ndarray | None:
    """The cached weights when both files exist and the shape fits; None otherwise (then it is rebuilt)."""
    manifest = path.with_suffix(".json")
    if not (path.is_file() and manifest.is_file()):
        return None
    try:
        weights = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if weights.shape != (num_classes, dim) or weights.dtype != np.float32:
        return None
    return np.ascontiguousarray(weights)


def cached_weights(
    identity: dict[str, str], classnames: Sequence[str], templates: Sequence[str], dim: int
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached weights of a classifier and its cache manifest (``logit_scale``, ``kind`` of the model), found by
    the model's identity alone: without loading the model. None when not cached (or cached by an older cocatk)."""
    path = config.cache_dir() / "zeroshot" / f"{classifier_key(identity, list(classnames), list(templates))}.npy"
    weights = _read_cache(path, len(classnames), dim)
    if weights is None:
        return None
    try:
        manifest = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return weights, manifest


def _write_cache(
    path: Path,
    weights: np.ndarray,
    identity: dict[str, str],
    classnames: list[str],
    templates: list[str],
    extra: dict[str, Any] | None = None,
) -> None:
    """Weights first, manifest last: a manifest only exists next to a complete array."""
    _atomic_write(path, lambda f: np.save(f, weights, allow_pickle=False))
    manifest = {
        "schema": CACHE_SCHEMA,
        "kind": "cocatk.zeroshot.classifier",
        "model": identity,
        "num_classes": len(classnames),
        "embed_dim": int(weights.shape[1]),
        "num_templates": len(templates),
        "classnames": classnames,
        "templates": templates,
        "normalised": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cocatk_version": __version__,
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=1, ensure_ascii=False)
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(text), mode="w")
