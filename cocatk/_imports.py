"""open_clip without the optional dependencies a model does not use, for the command line's start-up.

``import open_clip`` imports transformers (for Hugging Face text towers and ``CoCa.generate``) and timm (for timm
image towers: SigLIP, EVA) inside ``try: ... except ImportError`` blocks of its own modules, whether or not the model
needs them: about 1 s of a cold ``cocatk search`` on a 2-core machine (benchmarks/bench_cold_start.py). CoCa and
CLIP need neither.

:func:`defer_optional_imports` (called by ``cocatk.cli.main`` for a real process, never by the library) makes those
module-level imports of open_clip's fail as if the packages were absent, so open_clip records them as missing.
Imports from anywhere else (the BLIP reranker, a SigLIP tokenizer, open_clip's own function-level imports) are not
touched. :func:`ensure_open_clip_extras` re-runs the affected open_clip modules once a model needs them
(:func:`cocatk.models.resolve_model` and the model build call it with the model's config).

Left off in such a process: open_clip's ``CoCa.generate`` (cocatk never calls it; it captions with its own decoder,
and open_clip 3.3 with transformers >= 4.56 lacks it anyway).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
from collections.abc import Mapping
from typing import Any

#: Packages open_clip imports at its import time for some models only.
DEFERRABLE = ("transformers", "timm")
#: open_clip modules whose module-level import of a deferrable package was refused; re-run when a model needs them.
_deferred: set[str] = set()
_lock = threading.Lock()


class _DeferFinder(importlib.abc.MetaPathFinder):
    """Refuses transformers and timm to module-level code of open_clip's modules while they are not yet imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        top = name.partition(".")[0]
        if top not in DEFERRABLE or top in sys.modules:
            return None
        importer = _importer()
        if importer is not None:
            _deferred.add(importer)
            raise ModuleNotFoundError(f"{top} deferred by cocatk (not needed by this model)", name=name)
        return None


def _importer() -> str | None:
    """The open_clip module whose module-level code runs this import, or None for any other importer."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
        frame = frame.f_back  # importlib's own frames (frozen _bootstrap modules)
    if frame is None or frame.f_code.co_name != "<module>":
        return None
    module = frame.f_globals.get("__name__", "")
    return module if module.startswith("open_clip.") else None


def defer_optional_imports() -> None:
    """From now on, an ``import open_clip`` in this process leaves out transformers and timm (see the module docs).

    Has no effect when open_clip is already imported. Meant for the command line, where cocatk owns the process; a
    library user's own open_clip code would find them missing.
    """
    with _lock:
        if "open_clip" in sys.modules or any(isinstance(f, _DeferFinder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _DeferFinder())


def deferred() -> frozenset[str]:
    """The open_clip modules imported without an optional dependency (empty in a library process)."""
    return frozenset(_deferred)


def needs_extras(cfg: Mapping[str, Any] | None) -> bool:
    """True when an open_clip model config uses timm (``timm_model_name``) or transformers (``hf_model_name``)."""
    cfg = cfg or {}
    return "timm_model_name" in (cfg.get("vision_cfg") or {}) or "hf_model_name" in (cfg.get("text_cfg") or {})


def ensure_open_clip_extras(cfg: Mapping[str, Any] | None = None) -> None:
    """Give open_clip back the optional dependencies it was imported without, when ``cfg`` (None: any model) needs
    them: re-runs the module-level imports of ``open_clip.timm_model`` and ``open_clip.hf_model``.

    A reload re-executes a module in its own namespace, where its classes' methods look up ``timm``, ``AutoModel``
    and the rest, so they find the real packages afterwards. The classes keep their identity: the ones other modules
    already hold (``open_clip.model``'s ``TimmModel``, ``HFTextEncoder``) are put back in place of their re-made
    twins, so ``isinstance`` answers the same everywhere.
    """
    if not _deferred or (cfg is not None and not needs_extras(cfg)):
        return
    with _lock:
        for finder in [f for f in sys.meta_path if isinstance(f, _DeferFinder)]:
            sys.meta_path.remove(finder)
        for name in ("open_clip.timm_model", "open_clip.hf_model"):
            module = sys.modules.get(name)
            if name in _deferred and module is not None:
                classes = {k: v for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == name}
                importlib.reload(module)
                ns = vars(module)
                # Put the old classes back where the reload re-made them (not where a stand-in, such as
                # hf_model's PretrainedConfig, is now the real package's class).
                remade = {k for k, v in ns.items() if isinstance(v, type) and v.__module__ == name}
                ns.update({k: v for k, v in classes.items() if k in remade})
                _deferred.discard(name)
