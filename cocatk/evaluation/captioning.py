"""Caption quality: generate a caption for every image of a captioned set and score it against the references with
the COCO caption evaluation's own scorers (``pycocoevalcap``, the package CLIP_benchmark's captioning task uses):
BLEU-1..4 and CIDEr always; METEOR when Java is present (its jar ships with pycocoevalcap); SPICE is reported as
unavailable offline (it downloads Stanford CoreNLP on first use).

Captions and references go through the PTB tokenizer of the evaluation (Java) when Java is present, else through the
same rules in Python (lower case, punctuation removed), and the result says which.

No published open_clip figure exists for its CoCa checkpoints' captioning scores (open_clip's result tables cover
zero-shot classification and retrieval only). The CoCa paper's COCO Karpathy-test CIDEr, 143.6, is for the
unreleased 2.1B model fine-tuned for captioning, so it is not comparable.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError

if TYPE_CHECKING:  # pragma: no cover
    from ..captioning import GenerationConfig
    from ..models import CocaModel
    from .captioned import CaptionedDataset

_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class CaptionEvalResult:
    """Scores (0-1 for BLEU/METEOR, CIDEr on its own scale, usually reported x100) and what produced them."""

    dataset: str
    split: str | None
    n_images: int
    model: dict[str, Any]
    settings: dict[str, Any]
    metrics: dict[str, float]
    tokenizer: str
    unavailable: dict[str, str] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    reference: str = "none published for open_clip's CoCa checkpoints (see cocatk.evaluation.captioning)"
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 2)
        return d


def _scorers() -> Any:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise MissingDependencyError(
            f"pycocoevalcap is not installed ({e})",
            hint="pip install 'cocatk[captions]' (or pip install pycocoevalcap)",
        ) from e
    return Bleu, Cider


def simple_tokenize(text: str) -> str:
    """The PTB tokenizer's effect as the COCO evaluation uses it, without Java: lower case, punctuation removed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _tokenize(gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[dict, dict, str]:
    if shutil.which("java"):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        wrap = lambda d: {k: [{"caption": c} for c in v] for k, v in d.items()}  # noqa: E731
        return tok.tokenize(wrap(gts)), tok.tokenize(wrap(res)), "ptb (java)"
    return (
        {k: [simple_tokenize(c) for c in v] for k, v in gts.items()},
        {k: [simple_tokenize(c) for c in v] for k, v in res.items()},
        "simple (no java)",
    )


def score_captions(references: list[list[str]], candidates: list[str]) -> tuple[dict[str, float], str, dict[str, str]]:
    """BLEU-1..4, CIDEr (and METEOR with Java) of ``candidates[i]`` against ``references[i]``.

    Returns:
        (metrics, tokenizer used, unavailable metric -> why).
    """
    Bleu, Cider = _scorers()
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    gts_t, res_t, tokenizer = _tokenize(gts, res)
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    cider, _ = Cider().compute_score(gts_t, res_t)
    metrics = {f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)}
    metrics["CIDEr"] = float(cider)
    unavailable = {"SPICE": "needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads on first use (no network)"}
    if shutil.which("java"):
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            metrics["METEOR"] = float(meteor.compute_score(gts_t, res_t)[0])
            del meteor
        except Exception as e:  # a broken Java install: the other scores stand
            unavailable["METEOR"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    else:
        unavailable["METEOR"] = "needs Java (apt-get install default-jre-headless)"
    return metrics, tokenizer, unavailable


def evaluate_captions(
    model: CocaModel,
    dataset: CaptionedDataset,
    config: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    progress: Any = None,
) -> CaptionEvalResult:
    """Generate a caption per image of ``dataset`` and score them against its reference captions.

    Raises:
        MissingDependencyError: pycocoevalcap is not installed. UsageError: the model has no decoder.
    """
    import numpy as np

    from ..captioning import generate_captions, make_config
    from ..retrieval.captions import caption_settings, require_decoder

    _scorers()  # fail before any decoding when the scorer is missing
    require_decoder(model)
    cfg = make_config(model, config)
    t0 = time.monotonic()
    data = dataset.subset(limit) if limit else dataset
    n = len(data)
    progress = progress or (lambda stage, done, total: None)
    candidates: list[str] = []
    for start in range(0, n, batch_size):
        images = [data.load(i) for i in range(start, min(n, start + batch_size))]
        candidates += [c.text for c in generate_captions(model, images, cfg, batch_size=len(images))]
        progress("caption", len(candidates), n)
    references = [[] for _ in range(n)]  # type: list[list[str]]
    for cap, img in zip(data.captions, np.asarray(data.caption_image), strict=True):
        references[int(img)].append(cap)
    metrics, tokenizer, unavailable = score_captions(references, candidates)
    _, settings = caption_settings(model, cfg)
    examples = [
        {"image": str(data.images[i]), "caption": candidates[i], "references": references[i][:3]}
        for i in range(min(5, n))
    ]
    return CaptionEvalResult(
        dataset=data.name,
        split=data.split,
        n_images=n,
        model=model.info(),
        settings=settings,
        metrics=metrics,
        tokenizer=tokenizer,
        unavailable=unavailable,
        examples=examples,
        seconds=time.monotonic() - t0,
    )


__all__ = ["CaptionEvalResult", "evaluate_captions", "score_captions", "simple_tokenize"]
