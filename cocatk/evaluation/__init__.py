"""How quality is measured: text <-> image retrieval recall and zero-shot classification accuracy.

- :mod:`.retrieval`: :func:`evaluate_retrieval` (R@1/5/10, contrastive and caption-likelihood rerank).
- :mod:`.zeroshot`: :func:`evaluate_zeroshot` (top-1/top-5 on a labelled set) and :func:`classify_images`.
- :mod:`.captioned` / :mod:`.labelled`: the evaluation sets (captioned images for retrieval, labelled images for
  zero-shot); :mod:`.data` holds what both share (Hugging Face opening, image-cell decoding, the decode loop).

The model side of zero-shot (templates, classifier build and cache, published numbers) lives in
:mod:`cocatk.zeroshot`. Names below load on first access, so ``import cocatk.evaluation`` imports neither numpy
nor torch. ``write_captioned_folder`` moved to :mod:`cocatk.demo.scenes`; its old spelling here
(``cocatk.evaluation.write_captioned_folder``, deprecated in 0.1.0 with a DeprecationWarning) is removed and raises
an AttributeError that names the new home: the evaluation never imports the demo, which sits above it.
"""

from __future__ import annotations

from typing import Any

from .._lazy import lazy_exports, lazy_table

# submodule -> the public names it defines; each loads on first access (see cocatk._lazy).
_LAZY = lazy_table(
    {
        ".captioned": ("CaptionedDataset", "open_captioned_dataset"),
        ".retrieval": ("RetrievalResult", "evaluate_retrieval"),
        ".labelled": ("ZeroShotDataset", "open_dataset"),
        ".zeroshot": ("ZeroShotResult", "classify_images", "evaluate_zeroshot"),
    }
)
_lazy_getattr, __dir__ = lazy_exports(globals(), _LAZY)


#: Names that moved out of this package, and where to import them from now.
MOVED = {"write_captioned_folder": "cocatk.demo.scenes"}


def __getattr__(name: str) -> Any:
    if name in MOVED:
        raise AttributeError(f"cocatk.evaluation.{name} moved: use `from {MOVED[name]} import {name}`")
    return _lazy_getattr(name)


__all__ = list(_LAZY)
