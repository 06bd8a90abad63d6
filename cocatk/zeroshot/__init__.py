"""Zero-shot classification with CoCa: templates, classifier build + cache, datasets, evaluation, references.

Submodules import torch, open_clip and datasets only inside the functions that need them.
"""

from __future__ import annotations

from .classifier import ZeroShotClassifier, build_class_weights
from .datasets import ZeroShotDataset, open_dataset
from .evaluate import ZeroShotResult, classify_images, evaluate_zeroshot
from .templates import load_templates, parse_templates

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
