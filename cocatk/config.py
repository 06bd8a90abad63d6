"""Paths, defaults and environment overrides.

Environment variables (all optional):

- ``COCATK_HOME``: cocatk's data folder (default ``$XDG_DATA_HOME/cocatk``, i.e. ``~/.local/share/cocatk``).
  The default index is ``$COCATK_HOME/index``.
- ``COCATK_INDEX``: the default index folder, overriding the above.
- ``COCATK_CACHE``: cache folder for derived data such as zero-shot classifiers (default
  ``$XDG_CACHE_HOME/cocatk``, i.e. ``~/.cache/cocatk``).
- ``COCATK_MODEL``: the default model (a preset name, an open_clip CoCa architecture or a config path). Without it
  the default fits the machine: ``coca-l14`` with a CUDA GPU, ``coca-b32`` without one (or with ``COCATK_DEVICE=cpu``);
  see :func:`default_model_choice`.
- ``COCATK_PRETRAINED``: the default ``--pretrained`` value.
- ``COCATK_DEVICE``: ``cpu`` or ``cuda``; default cuda when available.
- ``COCATK_DEBUG=1``: the CLI prints tracebacks.

Weights are not stored by cocatk: open_clip loads them through the Hugging Face hub cache (``$HF_HOME/hub``, by
default ``~/.cache/huggingface/hub``), so ``HF_HUB_OFFLINE=1`` with a warm cache works.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

#: The default model (no ``--model``, no ``COCATK_MODEL``) where it runs on a CUDA GPU.
GPU_DEFAULT_MODEL = "coca-l14"
#: The default model where it runs on the CPU. coca-l14 encodes 8-11x slower there: 1.47 against 11.99 images/s in
#: fp32, 5.31 against 57.27 in bf16 (``--precision auto`` with AMX), measured on a 2-core Xeon (AMX), 2 threads,
#: random weights (speed does not depend on them), batches of 16 preprocessed 224 px images, the model alone.
CPU_DEFAULT_MODEL = "coca-b32"
_CPU_SLOWDOWN = "coca-l14 is ~8x slower to encode on a CPU, 1.5 against 12 images/s measured on a 2-core Xeon"


class ModelChoice(NamedTuple):
    """The default model and why it was chosen (:func:`default_model_choice`).

    Attributes:
        name: the model to use.
        reason: why the machine got this model, e.g. ``"no CUDA GPU: ..."``; None when the user named it
            (``$COCATK_MODEL``): nothing to explain.
        alternative: the other preset, with what it is: ``"pass --model coca-l14 for the larger model"``; None
            when ``reason`` is.
    """

    name: str
    reason: str | None = None
    alternative: str | None = None

    def describe(self) -> str:
        """One line for the user: ``model coca-b32 (no CUDA GPU: ...); pass --model coca-l14 for the larger
        model``."""
        text = f"model {self.name}"
        if self.reason:
            text += f" ({self.reason})"
        if self.alternative:
            text += f"; {self.alternative}"
        return text


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else Path.home() / fallback


def home_dir() -> Path:
    """cocatk's data folder: ``$COCATK_HOME`` or ``$XDG_DATA_HOME/cocatk``."""
    value = os.environ.get("COCATK_HOME")
    if value:
        return Path(value).expanduser()
    return _xdg("XDG_DATA_HOME", ".local/share") / "cocatk"


def default_index_dir() -> Path:
    """The index folder used when ``--index`` is not given."""
    value = os.environ.get("COCATK_INDEX")
    return Path(value).expanduser() if value else home_dir() / "index"


def cache_dir() -> Path:
    """Folder for derived, re-creatable data (zero-shot classifier cache)."""
    value = os.environ.get("COCATK_CACHE")
    if value:
        return Path(value).expanduser()
    return _xdg("XDG_CACHE_HOME", ".cache") / "cocatk"


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU. Imports torch (seconds): call it only where a model is about to load."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def default_model_choice(device: str | None = None) -> ModelChoice:
    """The model used when no ``--model`` is given, and why: ``$COCATK_MODEL``, else one that fits the machine.

    :data:`GPU_DEFAULT_MODEL` (coca-l14) when the model runs on a CUDA GPU, :data:`CPU_DEFAULT_MODEL` (coca-b32)
    otherwise. Where it runs is ``device``, else ``$COCATK_DEVICE``, else a CUDA GPU when torch sees one (only then is
    torch imported). Only a new index consults this: an existing one keeps the model it records.

    Args:
        device: where the model will run (``cpu``, ``cuda``, ``cuda:1``, ``mps``); None: see above.

    Example:
        >>> default_model_choice("cpu").name
        'coca-b32'
    """
    named = os.environ.get("COCATK_MODEL")
    if named:
        return ModelChoice(named)
    device = device or default_device()
    if device is None:
        gpu = cuda_available()
        why = "CUDA GPU found" if gpu else f"no CUDA GPU: {_CPU_SLOWDOWN}"
    elif device.startswith("cuda"):
        gpu, why = True, f"device {device} asked for"
    elif device.startswith("cpu"):
        gpu, why = False, f"device {device} asked for: {_CPU_SLOWDOWN}"
    else:  # mps and others: no measurement of coca-l14 there, the cheaper model is the safe default
        gpu, why = False, f"device {device} asked for, not a CUDA GPU"
    if gpu:
        return ModelChoice(GPU_DEFAULT_MODEL, why, f"pass --model {CPU_DEFAULT_MODEL} for the smaller, faster model")
    return ModelChoice(CPU_DEFAULT_MODEL, why, f"pass --model {GPU_DEFAULT_MODEL} for the larger model")


def default_model(device: str | None = None) -> str:
    """``$COCATK_MODEL``, else the model that fits the machine (:func:`default_model_choice`)."""
    return default_model_choice(device).name


def default_pretrained() -> str | None:
    """``$COCATK_PRETRAINED`` or None (the preset's own tag)."""
    return os.environ.get("COCATK_PRETRAINED") or None


def default_device() -> str | None:
    """``$COCATK_DEVICE`` or None (cuda when available, else cpu)."""
    return os.environ.get("COCATK_DEVICE") or None


def default_precision() -> str | None:
    """``$COCATK_PRECISION`` or None (``auto``: see :func:`cocatk.models.resolve_precision`)."""
    return os.environ.get("COCATK_PRECISION") or None


def text_onnx_enabled() -> bool:
    """``$COCATK_TEXT_ONNX`` (default on; ``0`` turns it off): `cocatk index` exports the text tower to ONNX so
    that a cold text query runs without torch (:mod:`cocatk.models.onnx`)."""
    return os.environ.get("COCATK_TEXT_ONNX", "1").strip().lower() not in ("0", "false", "no", "off")


def debug_enabled() -> bool:
    """True when ``COCATK_DEBUG`` asks for tracebacks."""
    return os.environ.get("COCATK_DEBUG", "") not in ("", "0", "false", "no")
