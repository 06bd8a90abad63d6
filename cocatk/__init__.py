"""cocatk: zero-shot image retrieval and classification with CoCa.

The public API is importable from the package root; heavy modules (torch, open_clip, faiss) load on first use, so
``import cocatk`` is cheap.

Example:
    >>> import cocatk
    >>> model = cocatk.load_model("coca-b32")                  # doctest: +SKIP
    >>> model.encode_texts(["a dog"]).shape                   # doctest: +SKIP
    (1, 512)
"""

from __future__ import annotations

from . import errors
from ._lazy import lazy_exports
from ._version import __version__
from .errors import CocatkError

# name -> module that defines it; resolved lazily by __getattr__.
_LAZY = {
    "load_model": ".models",
    "resolve_model": ".models",
    "CocaModel": ".models",
    "ModelSpec": ".models",
    "PRESETS": ".models",
    "Index": ".retrieval.index",
    "IndexReport": ".retrieval.index",
    "ZeroShotClassifier": ".zeroshot",
    "ZeroShotResult": ".evaluation.zeroshot",
    "evaluate_zeroshot": ".evaluation.zeroshot",
    "evaluate_retrieval": ".evaluation.retrieval",
}
__getattr__, __dir__ = lazy_exports(globals(), _LAZY)

__all__ = ["CocatkError", "__version__", "errors", *_LAZY]
