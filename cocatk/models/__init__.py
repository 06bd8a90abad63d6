"""Models by family and by runtime.

Families, one module each: :mod:`.coca` (:class:`CocaModel`: contrastive towers plus the multimodal decoder, for the
rerank, captions and likelihood), :mod:`.dual` (:class:`ClipModel`: CLIP, SigLIP, EVA), and BLIP-ITM
(:mod:`cocatk.models.blip`, a second-stage scorer only). :mod:`.registry` turns a name and weights into a
:class:`ModelSpec` (presets, open_clip architectures, config files, downloads); :mod:`.loading` builds a spec's model
for the torch runtime, and :mod:`.precision` says on what device and in what precision it runs.

A model is named by a *preset* (``coca-l14``, ``coca-b32``, ``coca-l14-coco``), by an open_clip architecture
(``coca_ViT-B-32``, or any dual encoder: ``ViT-B-32``, ``ViT-B-16-SigLIP``, ``EVA02-B-16``), or by the path of an
open_clip model config JSON. Weights (``pretrained``) are an open_clip tag, a local checkpoint file, or ``"none"``
for seeded random weights (tests and benchmarks).

Example:
    >>> from cocatk import load_model
    >>> model = load_model("coca-b32")                       # doctest: +SKIP
    >>> model.encode_texts(["a red bicycle"]).shape           # doctest: +SKIP
    (1, 512)

torch and open_clip are imported inside the functions that need them, so importing this package is cheap.
"""

from __future__ import annotations

from .coca import CocaModel, decoder_logits
from .dual import ClipModel
from .loading import load_model, load_tokenizer, meta_model
from .precision import (
    BF16_MIN_TOWER_PARAMS,
    FEW_TEXTS,
    PRECISIONS,
    bf16_island,
    cpu_bf16_support,
    float32_copy,
    resolve_device,
    resolve_precision,
    torch_threads,
)
from .registry import (
    ASSETS_DIR,
    DECODER_HINT,
    DEMO_NOTICE,
    DEMO_PRESET,
    DIGEST_CACHE_MIN_BYTES,
    KINDS,
    PRESETS,
    RANDOM_NOTICE,
    RANDOM_SEED,
    RANDOM_WEIGHTS,
    ModelSpec,
    Preset,
    cached_weights_path,
    download_weights,
    fetch_tag_weights,
    hf_repo_for,
    hub_unreachable_reason,
    kind_of_config,
    list_presets,
    resolve_model,
)

__all__ = [
    "ASSETS_DIR",
    "BF16_MIN_TOWER_PARAMS",
    "DECODER_HINT",
    "DEMO_NOTICE",
    "DEMO_PRESET",
    "DIGEST_CACHE_MIN_BYTES",
    "FEW_TEXTS",
    "KINDS",
    "PRECISIONS",
    "PRESETS",
    "RANDOM_NOTICE",
    "RANDOM_SEED",
    "RANDOM_WEIGHTS",
    "ClipModel",
    "CocaModel",
    "ModelSpec",
    "Preset",
    "bf16_island",
    "cached_weights_path",
    "cpu_bf16_support",
    "decoder_logits",
    "download_weights",
    "fetch_tag_weights",
    "float32_copy",
    "hf_repo_for",
    "hub_unreachable_reason",
    "kind_of_config",
    "list_presets",
    "load_model",
    "load_tokenizer",
    "meta_model",
    "resolve_device",
    "resolve_model",
    "resolve_precision",
    "torch_threads",
]
