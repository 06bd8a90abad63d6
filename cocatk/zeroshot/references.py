"""Published zero-shot top-1 accuracies to compare a run against (plain data).

Source: open_clip ``docs/openclip_results.csv`` (commit f862f86), CLIP_benchmark protocol: ImageNet with the 80
OpenAI templates, CIFAR with CLIP's 18 templates, test / validation splits in full.
"""

from __future__ import annotations

from typing import Any

SOURCE = "open_clip docs/openclip_results.csv (commit f862f86), zero-shot top-1"

#: (open_clip architecture, pretrained tag) -> benchmark -> top-1 (fraction).
TOP1: dict[tuple[str, str], dict[str, float]] = {
    ("coca_ViT-L-14", "laion2b_s13b_b90k"): {"imagenet1k": 0.7561, "cifar10": 0.9722, "cifar100": 0.8318},
    ("coca_ViT-L-14", "mscoco_finetuned_laion2b_s13b_b90k"): {
        "imagenet1k": 0.7204,
        "cifar10": 0.9630,
        "cifar100": 0.7965,
    },
    ("coca_ViT-B-32", "laion2b_s13b_b90k"): {"imagenet1k": 0.6331, "cifar10": 0.9387, "cifar100": 0.7378},
}

#: The template set each benchmark's reference was measured with.
REFERENCE_TEMPLATES = {"imagenet1k": "openai", "cifar10": "cifar", "cifar100": "cifar"}


def reference_for(arch: str, pretrained: str, benchmark: str | None) -> dict[str, Any] | None:
    """The published top-1 for this model and benchmark, or None."""
    if benchmark is None:
        return None
    value = TOP1.get((arch, pretrained), {}).get(benchmark)
    if value is None:
        return None
    return {
        "benchmark": benchmark,
        "top1": value,
        "templates": REFERENCE_TEMPLATES[benchmark],
        "source": SOURCE,
    }
