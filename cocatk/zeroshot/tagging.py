"""Multi-label zero-shot tags: a vocabulary of labels, each scored on its own against a neutral prompt.

A softmax over a whole vocabulary answers "which one label?", and is no multi-label rule: the probabilities of 600
labels share one unit of mass, so a photo of a dog on a beach cannot be 0.9 "dog" and 0.9 "beach". cocatk scores
every label on its own, against a **neutral prompt** ("a photo.", "a picture of something.", ...), as a two-way
choice between the label and nothing in particular::

    p(label | image) = sigmoid(s * (cos(image, label) - cos(image, neutral)))

with ``s`` the model's learned logit scale (about 100 for trained CoCa and CLIP; the same temperature its contrastive
softmax uses, so this is that softmax restricted to the pair). A label is a tag when ``p >= threshold`` (default
0.5: the image is closer to the label than to the neutral prompt), at most ``max_tags`` per image, best first.
A SigLIP model was trained with a per-pair sigmoid, so its own ``sigmoid(s * cos + b)`` is used instead.

The label embeddings are a :class:`~.classifier.ZeroShotClassifier` (templates averaged, cached on disk), so the text
tower runs once per label and model; scoring 10k stored image embeddings is one matrix product.

A vocabulary is a text file, one label per line, as a hierarchical path from its top group to the label, separated
by ``|`` (Lightroom's ``lr:hierarchicalSubject`` convention)::

    # comments and blank lines are skipped
    Animal|Bird|Parrot
    Food|Fruit|Apple
    beach

The built-in vocabulary is Open Images' 601 boxable classes with their hierarchy (CC BY 4.0; see
``cocatk/assets/vocabularies/README.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from ..models import CocaModel

#: Built-in vocabularies: name -> asset file under cocatk/assets/vocabularies.
BUILTIN_VOCABULARIES = {"openimages": "openimages.txt"}
DEFAULT_VOCABULARY = "openimages"
#: Prompts for each label (averaged), and the neutral prompts a label is compared with.
TAG_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a picture of a {}.", "an image of a {}.")
NEUTRAL_PROMPTS = ("a photo.", "a picture.", "an image.", "a photo of something.")
DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_TAGS = 10
#: The separator of a label's hierarchical path.
SEP = "|"


@dataclass(frozen=True)
class Label:
    """One label: its name (the last part of its path) and its path from the top group (``("Animal", "Bird",
    "Parrot")``)."""

    path: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def hierarchical(self) -> str:
        return SEP.join(self.path)


@dataclass(frozen=True)
class Vocabulary:
    """The labels of a vocabulary, its name (a built-in name or the file's path) and a digest of its labels."""

    name: str
    labels: tuple[Label, ...]

    @property
    def names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def digest(self) -> str:
        blob = "\n".join(lab.hierarchical for lab in self.labels).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_vocabulary(text: str, source: str) -> Vocabulary:
    """A vocabulary from its text (see the module docstring).

    Raises:
        UsageError: no labels, an empty part of a path, or one label name under two paths.
    """
    labels: list[Label] = []
    seen: dict[str, tuple[int, str]] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        path = tuple(part.strip() for part in line.split(SEP))
        if any(not part for part in path):
            raise UsageError(f"{source}, line {n}: an empty part in {line!r}",
                             hint="write a label as Group|Subgroup|Label, without empty parts")  # fmt: skip
        key = path[-1].casefold()
        if key in seen:
            if seen[key][1] == SEP.join(path):
                continue  # the same line twice
            raise UsageError(
                f"{source}, line {n}: label {path[-1]!r} is also on line {seen[key][0]} under another path",
                hint="give each label one path (tags are found by name)",
            )
        seen[key] = (n, SEP.join(path))
        labels.append(Label(path))
    if not labels:
        raise UsageError(f"{source} holds no labels", hint="write one label per line, e.g. Animal|Bird|Parrot")
    return Vocabulary(source, tuple(labels))


def load_vocabulary(spec: str | Path | None = None) -> Vocabulary:
    """A built-in vocabulary by name (``openimages``; ``builtin`` or None: the default) or a vocabulary file.

    Raises:
        UsageError: not a built-in name and not a readable file; a malformed file (see :func:`parse_vocabulary`).
    """
    name = DEFAULT_VOCABULARY if spec in (None, "builtin") else str(spec)
    if name in BUILTIN_VOCABULARIES:
        asset = resources.files("cocatk.assets").joinpath("vocabularies").joinpath(BUILTIN_VOCABULARIES[name])
        return parse_vocabulary(asset.read_text("utf-8"), name)
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"vocabulary {name} is neither a built-in one ({', '.join(BUILTIN_VOCABULARIES)}) nor a file",
            hint="pass --vocabulary builtin, or a text file with one label per line (Group|Label)",
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read vocabulary {path}: {e}", hint="pass a UTF-8 text file") from e
    return parse_vocabulary(text, str(path.resolve()))


@dataclass(frozen=True)
class TagRule:
    """The multi-label rule: ``p >= threshold`` (see the module docstring), at most ``max_tags`` per image."""

    threshold: float = DEFAULT_THRESHOLD
    max_tags: int = DEFAULT_MAX_TAGS

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise UsageError(f"threshold must be between 0 and 1, got {self.threshold}",
                             hint="pass --threshold 0.5 (the label is closer than the neutral prompt)")  # fmt: skip
        if self.max_tags < 1:
            raise UsageError(f"max tags must be >= 1, got {self.max_tags}", hint="pass --max-tags 1 or more")

    def describe(self) -> str:
        return (f"p = sigmoid(s * (cos(image, label) - cos(image, neutral prompt))) >= {self.threshold:g}, "
                f"at most {self.max_tags} per image")  # fmt: skip


@dataclass
class Tagger:
    """Scores image embeddings against every label of a vocabulary (see the module docstring)."""

    vocabulary: Vocabulary
    weights: np.ndarray  # (L, D) the labels' embeddings, L2-normalised rows
    neutral: np.ndarray  # (D,) the neutral prompts' embedding, L2-normalised
    scale: float
    templates: tuple[str, ...]
    identity: dict[str, str]
    from_cache: bool = False
    model: Any = None  # a SigLIP model scores with its own sigmoid (and bias)

    @classmethod
    def build(
        cls,
        model: CocaModel,
        vocabulary: Vocabulary,
        templates: Sequence[str] = TAG_TEMPLATES,
        *,
        cache: bool = True,
        progress: Any = None,
    ) -> Tagger:
        """The label embeddings (from the zero-shot cache when there, else through the text tower, then cached)
        and the neutral prompts'."""
        from .classifier import ZeroShotClassifier

        labels = ZeroShotClassifier.from_classnames(model, vocabulary.names, list(templates), cache=cache,
                                                    progress=progress)  # fmt: skip
        neutral = ZeroShotClassifier.from_classnames(model, list(NEUTRAL_PROMPTS), ["{}"], cache=cache).weights
        siglip = getattr(model, "kind", "coca") == "siglip"
        return cls(vocabulary, labels.weights, _mean(neutral), labels.logit_scale, tuple(templates),
                   dict(model.spec.identity()), labels.from_cache, model if siglip else None)  # fmt: skip

    @classmethod
    def cached(
        cls, identity: dict[str, str], dim: int, vocabulary: Vocabulary, templates: Sequence[str] = TAG_TEMPLATES
    ) -> Tagger | None:
        """The tagger from the zero-shot cache alone, by the model's identity (what an index records): no model is
        loaded. None when anything is not cached, or the model is SigLIP (its scoring needs the model)."""
        from .classifier import cached_weights

        # A text tower that ran bf16 weights on the CPU (AMX) keys its cache apart (ZeroShotClassifier); either
        # variant holds this model's label embeddings: the one written last is taken (no torch to ask the CPU).
        found = []
        for ident in (dict(identity), {**identity, "text_precision": "bf16"}):
            pair = (cached_weights(ident, vocabulary.names, list(templates), dim),
                    cached_weights(ident, list(NEUTRAL_PROMPTS), ["{}"], dim))  # fmt: skip
            if pair[0] is not None and pair[1] is not None:
                found.append(pair)
        labels, neutral = max(found, key=lambda f: str(f[0][1].get("created", ""))) if found else (None, None)
        if labels is None or neutral is None or labels[1].get("kind", "coca") == "siglip":
            return None
        scale = labels[1].get("logit_scale")
        if not isinstance(scale, (int, float)):
            return None
        return cls(vocabulary, labels[0], _mean(neutral[0]), float(scale), tuple(templates), dict(identity), True)

    def probabilities(self, embeddings: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """(N, L) float32: each label's probability for each image embedding (N, D), on its own."""
        out = np.empty((len(embeddings), len(self.vocabulary.labels)), np.float32)
        for i in range(0, len(embeddings), chunk):
            e = np.asarray(embeddings[i : i + chunk], np.float32)
            if self.model is not None:
                out[i : i + len(e)] = self.model.match_probability(e, self.weights)
                continue
            margin = e @ self.weights.T - (e @ self.neutral)[:, None]
            out[i : i + len(e)] = 1.0 / (1.0 + np.exp(-self.scale * margin))
        return out

    def tags(self, embeddings: np.ndarray, rule: TagRule) -> list[list[tuple[int, float]]]:
        """Per image: (label index, probability) of its tags under ``rule``, best first."""
        p = self.probabilities(embeddings)
        out: list[list[tuple[int, float]]] = []
        k = min(rule.max_tags, p.shape[1])
        if k < p.shape[1]:
            top = np.argpartition(-p, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(p.shape[1]), p.shape)
        for row, idx in zip(p, top, strict=True):
            keep = [(int(j), float(row[j])) for j in idx if row[j] >= rule.threshold]
            out.append(sorted(keep, key=lambda t: (-t[1], t[0])))
        return out

    def settings(self, rule: TagRule) -> dict[str, Any]:
        """What made these tags, as the index records it (the settings key is its digest)."""
        return {
            "model": dict(self.identity),
            "vocabulary": {
                "name": self.vocabulary.name,
                "labels": len(self.vocabulary.labels),
                "digest": self.vocabulary.digest,
            },  # fmt: skip
            "templates": list(self.templates),
            "neutral": list(NEUTRAL_PROMPTS),
            "rule": {
                "threshold": rule.threshold,
                "max_tags": rule.max_tags,
                "kind": "siglip sigmoid" if self.model is not None else "margin over a neutral prompt",
                "text": rule.describe(),
            },  # fmt: skip
            "scale": round(self.scale, 4),
        }


def _mean(rows: np.ndarray) -> np.ndarray:
    n = rows.mean(axis=0)
    return (n / np.linalg.norm(n)).astype(np.float32)


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable key of tag settings (as captions have one)."""
    import json

    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return "tags-" + hashlib.sha256(blob).hexdigest()[:12]


__all__ = [
    "BUILTIN_VOCABULARIES",
    "DEFAULT_MAX_TAGS",
    "DEFAULT_THRESHOLD",
    "NEUTRAL_PROMPTS",
    "TAG_TEMPLATES",
    "Label",
    "TagRule",
    "Tagger",
    "Vocabulary",
    "load_vocabulary",
    "parse_vocabulary",
    "settings_key",
]
