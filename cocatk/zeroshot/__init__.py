"""Zero-shot classification with CoCa, the model side: templates, classifier build + cache, reference numbers.

The evaluation (datasets, the image loop, accuracy) lives in :mod:`cocatk.evaluation`; its names stay importable
from here (loaded on first access, so this package never imports :mod:`cocatk.evaluation` at import time).
Submodules import torch, open_clip and datasets only inside the functions that need them.
"""

from __future__ import annotations

from .._lazy import lazy_exports, lazy_table
from .classifier import ZeroShotClassifier, build_class_weights
from .templates import load_templates, parse_templates

# The evaluation names this package has always exported, re-exported from where they live now.
_EVALUATION = lazy_table(
    {
        "cocatk.evaluation.labelled": ("ZeroShotDataset", "open_dataset"),
        "cocatk.evaluation.zeroshot": ("ZeroShotResult", "classify_images", "evaluate_zeroshot"),
    }
)

__getattr__, __dir__ = lazy_exports(globals(), _EVALUATION)

__all__ = [
    "ZeroShotClassifier",
    "ZeroShotDataset",
    "ZeroShotResult",
    "build_class_weights",
    "classify_images",
    "evaluate_zeroshot",
    "load_templates",
    "open_dataset",
    "parse_templates",
]
