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

Left off in such a process until ``ensure_open_clip_extras()`` (no argument) is called: open_clip's ``CoCa.generate``
(cocatk never calls it; it captions with its own decoder, and open_clip 3.3 with transformers >= 4.56 lacks it
anyway).
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
#: open_clip module -> the deferrable packages its module-level code was refused; re-run when a model needs them.
_deferred: dict[str, set[str]] = {}
_lock = threading.Lock()


class _DeferFinder(importlib.abc.MetaPathFinder):
    """Refuses transformers and timm to module-level code of open_clip's modules while they are not yet imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        top = name.partition(".")[0]
        if top not in DEFERRABLE or top in sys.modules:
            return None
        importer = _importer()
        if importer is not None:
            _deferred.setdefault(importer, set()).add(top)
            raise ModuleNotFoundError(f"{top} deferred by cocatk (not needed by this model)", name=name)
        return None


def _importer() -> str | None:
    """The open_clip module whose module-level code runs this import, or None for any other importer.

    Only open_clip's import-time imports are refused, and open_clip 3.3 makes all of them inside ``try: ... except
    ImportError`` (``hf_model``, ``coca_model``, ``timm_model``); ``tokenizer`` imports transformers inside functions,
    which goes through."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
        frame = frame.f_back  # importlib's own frames (frozen _bootstrap modules)
    if frame is None or frame.f_code.co_name != "<module>":
        return None
    module = frame.f_globals.get("__name__", "")
    return module if module.startswith("open_clip.") else None


def defer_optional_imports() -> None:
    """From now on, an ``import open_clip`` in this process leaves out transformers and timm (see the module docs).

    The finder stays in ``sys.meta_path`` until :func:`ensure_open_clip_extras` gives a package back, so an open_clip
    module imported later in the process (they all guard these imports) is left without them too.

    Has no effect when open_clip is already imported. Meant for the command line, where cocatk owns the process; a
    library user's own open_clip code would find them missing.
    """
    with _lock:
        if "open_clip" in sys.modules or any(isinstance(f, _DeferFinder) for f in sys.meta_path):
            return
        sys.meta_path.insert(0, _DeferFinder())


def deferred() -> frozenset[str]:
    """The open_clip modules imported without an optional package (empty in a library process)."""
    return frozenset(_deferred)


def needs_extras(cfg: Mapping[str, Any] | None) -> set[str]:
    """The optional packages an open_clip model config uses: timm for a timm image tower (``timm_model_name``),
    transformers for a Hugging Face text tower (``hf_model_name``)."""
    cfg = cfg or {}
    needs = set()
    if "timm_model_name" in (cfg.get("vision_cfg") or {}):
        needs.add("timm")
    if "hf_model_name" in (cfg.get("text_cfg") or {}):
        needs.add("transformers")
    return needs


def ensure_open_clip_extras(cfg: Mapping[str, Any] | None = None) -> None:
    """Give open_clip back the optional packages it was imported without, those ``cfg`` uses (None: all): re-runs
    the open_clip modules that were refused them (``timm_model`` for timm; ``hf_model`` and ``coca_model`` for
    transformers).

    A reload re-executes a module in its own namespace, where its classes' methods look up ``timm``, ``AutoModel``
    and the rest, so they find the real packages afterwards. The classes keep their identity: the ones other modules
    already hold (``open_clip.model``'s ``TimmModel`` and ``HFTextEncoder``, ``open_clip.CoCa``) are put back in
    place of their re-made twins, so ``isinstance`` answers the same everywhere.
    """
    wanted = set(DEFERRABLE) if cfg is None else needs_extras(cfg)
    if not any(wanted & refused for refused in _deferred.values()):
        return
    with _lock:
        for finder in [f for f in sys.meta_path if isinstance(f, _DeferFinder)]:
            sys.meta_path.remove(finder)  # open_clip is imported by now: nothing is left to defer
        for name, refused in list(_deferred.items()):
            module = sys.modules.get(name)
            if not wanted & refused or module is None:
                continue
            classes = {k: v for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == name}
            importlib.reload(module)
            ns = vars(module)
            # Put the old classes back where the reload re-made them (not where a stand-in, such as hf_model's
            # PretrainedConfig, is now the real package's class).
            remade = {k for k, v in ns.items() if isinstance(v, type) and v.__module__ == name}
            ns.update({k: v for k, v in classes.items() if k in remade})
            del _deferred[name]  # the reload tried every package again
