"""Paths, defaults and environment overrides.

Environment variables (all optional):

- ``COCATK_HOME``: cocatk's data folder (default ``$XDG_DATA_HOME/cocatk``, i.e. ``~/.local/share/cocatk``).
  The default index is ``$COCATK_HOME/index``.
- ``COCATK_INDEX``: the default index folder, overriding the above.
- ``COCATK_CACHE``: cache folder for derived data such as zero-shot classifiers (default
  ``$XDG_CACHE_HOME/cocatk``, i.e. ``~/.cache/cocatk``).
- ``COCATK_MODEL``: the default model (a preset name, an open_clip CoCa architecture or a config path).
- ``COCATK_PRETRAINED``: the default ``--pretrained`` value.
- ``COCATK_DEVICE``: ``cpu`` or ``cuda``; default cuda when available.
- ``COCATK_DEBUG=1``: the CLI prints tracebacks.

Weights are not stored by cocatk: open_clip loads them through the Hugging Face hub cache (``$HF_HOME/hub``, by
default ``~/.cache/huggingface/hub``), so ``HF_HUB_OFFLINE=1`` with a warm cache works.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The model used when neither ``--model`` nor ``COCATK_MODEL`` is given.
DEFAULT_MODEL = "coca-l14"


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


def default_model() -> str:
    """``$COCATK_MODEL`` or :data:`DEFAULT_MODEL`."""
    return os.environ.get("COCATK_MODEL") or DEFAULT_MODEL


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
    that a cold text query runs without torch (:mod:`cocatk.textonnx`)."""
    return os.environ.get("COCATK_TEXT_ONNX", "1").strip().lower() not in ("0", "false", "no", "off")


def debug_enabled() -> bool:
    """True when ``COCATK_DEBUG`` asks for tracebacks."""
    return os.environ.get("COCATK_DEBUG", "") not in ("", "0", "false", "no")
