"""The one interface a search asks of a model, whichever runtime runs it.

Two runtimes answer it: torch, through the family wrappers (:class:`~cocatk.models.dual.ClipModel`,
:class:`~cocatk.models.coca.CocaModel`, loaded by :func:`~cocatk.models.loading.load_model`), and ONNX Runtime,
through the exported towers (:class:`~cocatk.models.onnx.text.TextOnnx`: the text tower, and beside it CoCa's decoder
and the image tower). :func:`cocatk.retrieval.search.search_index` picks one per query (``backend``) and then only
uses what :class:`QueryModel` lists. A new runtime implements these members and is picked there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class QueryModel(Protocol):
    """What embeds and scores a query: both runtimes' models have these members, with the same meaning.

    ``backend`` names the runtime (``"torch"`` or ``"onnxruntime"``), ``device`` and ``precision`` where and how it
    runs. Embeddings are float32, L2-normalised, (N, :attr:`embed_dim`). :meth:`caption_loglik` (a CoCa:
    :attr:`has_decoder`) is log p(``text`` | image) for each candidate's decoder tokens (N, T, D).
    """

    backend: str
    device: str
    precision: str

    @property
    def embed_dim(self) -> int: ...

    @property
    def kind(self) -> str: ...

    @property
    def has_decoder(self) -> bool: ...

    def info(self) -> dict[str, Any]: ...

    def notices(self) -> list[str]: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence[Any]) -> np.ndarray: ...

    def caption_token_count(self, text: str) -> int: ...

    def caption_loglik(self, text: str, image_tokens: Any) -> np.ndarray: ...


__all__ = ["QueryModel"]
