"""The CLIP-like dual encoders (CLIP, SigLIP, EVA, and the contrastive towers of CoCa): :class:`ClipModel`.

- ``clip``: a dual encoder scored by softmax(logit_scale x cosine) (CLIP, EVA, ...);
- ``siglip``: with a ``logit_bias``, scored by sigmoid(logit_scale x cosine + logit_bias).

Dual encoders have no decoder: what needs one raises :class:`~cocatk.errors.DecoderRequiredError`, whose hint names
the ``--rerank-model`` to pass.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    DecoderRequiredError,
    UsageError,
)
from .precision import FEW_TEXTS, bf16_island, torch_threads
from .registry import DECODER_HINT, DEMO_NOTICE, DEMO_PRESET, RANDOM_NOTICE, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


@dataclass
class ClipModel:
    """A loaded open_clip dual encoder (CLIP, SigLIP, EVA) with batched, inference-mode helpers; :class:`CocaModel`
    adds the multimodal decoder. Create either with :func:`load_model`.

    Embeddings are float32, C-contiguous, L2-normalised numpy arrays of shape (N, :attr:`embed_dim`). What needs a
    decoder (:meth:`image_tokens`, :meth:`caption_loglik`) raises :class:`~cocatk.errors.DecoderRequiredError`.
    """

    spec: ModelSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    device: str
    precision: str
    #: Why :attr:`precision` is not what was asked for (``auto`` falling back to fp32), else None.
    precision_notice: str | None = None
    image_batch_size: int = 32
    text_batch_size: int = 256
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: The runtime (:class:`~cocatk.models.base.QueryModel`); a class attribute, not a field.
    backend = "torch"

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The family: ``"coca"``, ``"clip"`` or ``"siglip"``."""
        return self.spec.kind

    @property
    def has_decoder(self) -> bool:
        """True for CoCa (caption likelihood, rerank, captions)."""
        return self.spec.has_decoder

    @functools.cached_property
    def embed_dim(self) -> int:
        """Embedding width D (the contrastive projection's output)."""
        proj = getattr(self.model.visual, "proj", None)
        if proj is not None and hasattr(proj, "shape"):
            return int(proj.shape[-1])
        return int(self.encode_texts(["a"]).shape[1])  # timm towers (SigLIP, EVA) hide the width in a head

    @property
    def logit_scale(self) -> float:
        """The learned temperature exp(logit_scale) (about 100 for trained CLIP and CoCa, ~110 for SigLIP)."""
        return float(self.model.logit_scale.detach().exp().float().cpu())

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learned bias (None for CLIP and CoCa)."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().cpu())

    def match_logits(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
        """The model's own logits (N images, M texts): logit_scale x cosine (+ logit_bias for SigLIP), float64."""
        cos = np.asarray(image_embeddings, np.float64) @ np.asarray(text_embeddings, np.float64).T
        return self.logit_scale * cos + (self.logit_bias or 0.0)

    def match_probability(self, image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray | None:
        """SigLIP's P(match | image, text) = sigmoid(logits), per pair (N, M); None for softmax models (CLIP, CoCa),
        whose probabilities exist only over a set of candidates."""
        if self.kind != "siglip":
            return None
        return 1.0 / (1.0 + np.exp(-self.match_logits(image_embeddings, text_embeddings)))

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def is_random(self) -> bool:
        """True for seeded random weights: results carry no meaning beyond tests and speed."""
        return self.spec.is_random

    def notices(self) -> list[str]:
        """What a reader of this model's results must know (shown under tables, in JSON and in HTML pages)."""
        if self.is_random:
            return [RANDOM_NOTICE]
        if self.spec.preset == DEMO_PRESET:
            return [DEMO_NOTICE]
        return []

    def info(self) -> dict[str, Any]:
        """A JSON-friendly description (used in result records and manifests)."""
        return {
            "model": self.spec.preset or self.spec.name,
            "kind": self.kind,
            "arch": self.spec.arch,
            "pretrained": self.spec.pretrained if self.spec.weights_kind != "file" else Path(self.spec.pretrained).name,
            "random_weights": self.is_random,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "device": self.device,
            "precision": self.precision,
        }

    @property
    def cpu_bf16(self) -> bool:
        """True when this model runs bf16 weights on a CPU (see :func:`load_model`'s ``precision``)."""
        return self.precision == "bf16" and self.device.startswith("cpu")

    def _bf16_copy(self, name: str, island: bool) -> Any:
        """A bf16 copy of the submodule ``name`` (made once; the fp32 module stays for captioning); ``island`` wraps
        it in float32 casts (see :func:`bf16_island`), else callers cast."""
        import copy

        import torch

        with self._lock:
            copies = self.__dict__.setdefault("_bf16_modules", {})
            if name not in copies:
                source = getattr(self.model, name)
                # Copy straight into bf16: the memo hands deepcopy the bf16 tensors, so the fp32 weights are read
                # once and never copied as fp32 (deepcopy then cast took 0.95 s for coca_ViT-B-32's text tower).
                memo: dict[int, Any] = {}
                for p in source.parameters():
                    cast = p.detach().to(torch.bfloat16) if p.is_floating_point() else p.detach().clone()
                    memo[id(p)] = torch.nn.Parameter(cast, requires_grad=False)
                for b in source.buffers():
                    memo[id(b)] = b.to(torch.bfloat16) if b.is_floating_point() else b.clone()
                module = copy.deepcopy(source, memo)
                copies[name] = bf16_island(module) if island else module
            return copies[name]

    def _image_tower_ready(self) -> None:
        """On a CPU in bf16, make the image tower a bf16 island (:func:`bf16_island`) before its first use."""
        if not self.cpu_bf16 or self.__dict__.get("_visual_bf16"):
            return
        with self._lock:
            if not self.__dict__.get("_visual_bf16"):
                bf16_island(self.model.visual)
                self.__dict__["_visual_bf16"] = True

    # ---- plumbing ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        import torch

        # Autocast on a GPU; on a CPU bf16 lives in the weights (autocast there was slower than fp32).
        dtype = None if self.cpu_bf16 else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with (
            torch.inference_mode(),
            torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None),
        ):
            yield

    def preprocess_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Apply the model's own preprocessing to PIL images: (N, 3, S, S) float32 on the CPU."""
        import torch

        if len(images) == 0:
            return torch.empty((0, 3, self.image_size, self.image_size))
        return torch.stack([self.preprocess(im) for im in images])

    def _batches(self, images: Any, batch_size: int) -> Iterator[torch.Tensor]:
        import torch

        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise UsageError(
                    f"expected a preprocessed image tensor of shape (N, 3, {self.image_size}, {self.image_size}), "
                    f"got {tuple(images.shape)}",
                    hint="pass PIL images or the output of CocaModel.preprocess_images",
                )
            for i in range(0, images.shape[0], batch_size):
                yield images[i : i + batch_size]
            return
        images = list(images)
        for i in range(0, len(images), batch_size):
            yield self.preprocess_images(images[i : i + batch_size])

    def _needs_decoder(self, what: str) -> DecoderRequiredError:
        return DecoderRequiredError(
            f"{what} needs CoCa's multimodal decoder; {self.spec.preset or self.spec.name} is a {self.kind} dual "
            "encoder",
            hint=DECODER_HINT,
        )

    def _encode_batch(self, x: torch.Tensor, want_tokens: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        import torch

        if want_tokens:
            raise self._needs_decoder("decoder tokens (rerank, likelihood)")
        x = x.to(self.device, non_blocking=True)
        with self._inference():
            latent = self.model.encode_image(x, normalize=False)
        latent = torch.nn.functional.normalize(latent.float(), dim=-1)  # normalise in fp32 after autocast
        return latent.cpu().numpy(), None

    def _encode_text_latent(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fp32_text_latent(ids)

    def fp32_text_latent(self, ids: torch.Tensor, module: Any = None) -> torch.Tensor:
        """The text tower's unnormalised output from the fp32 modules (never a bf16 copy), or from ``module``, a copy
        of :attr:`model` (a CPU copy of a GPU model): what an export traces (:mod:`cocatk.models.onnx`). Runs in the
        caller's grad mode."""
        return (module or self.model).encode_text(ids, normalize=False)

    # ---- public heads --------------------------------------------------------------------------------------
    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int | None = None) -> np.ndarray:
        """Contrastive image embeddings (attentional pooler query 0, projected; the class token in a CoCa config
        without the pooler, like the ``demo`` model), L2-normalised.

        Args:
            images: PIL images (any mode is converted by the model's preprocessing) or a tensor already
                preprocessed by :meth:`preprocess_images`.
            batch_size: images per forward pass (default :attr:`image_batch_size`).

        Returns:
            float32 array (N, D).
        """
        emb, _ = self.encode_images_and_tokens(images, batch_size=batch_size, tokens=False)
        return emb

    def image_tokens(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """The image tokens the multimodal decoder attends to: (N, T, D) float32 on the model's device.

        T is ``attn_pooler_queries - 1`` (255 for the released models), or the number of patches for a config
        without the attentional pooler (64 for the ``demo`` model).
        """
        _, tokens = self.encode_images_and_tokens(images, batch_size=batch_size, tokens=True)
        assert tokens is not None
        return tokens

    def encode_images_and_tokens(
        self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int | None = None, tokens: bool = True
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Embeddings and (optionally) decoder tokens from one pass of the image tower."""
        import torch

        if tokens and not self.has_decoder:
            raise self._needs_decoder("decoder tokens (rerank, likelihood)")
        self._image_tower_ready()

        bs = batch_size or self.image_batch_size
        embs: list[np.ndarray] = []
        toks: list[torch.Tensor] = []
        for x in self._batches(images, bs):
            e, t = self._encode_batch(x, tokens)
            embs.append(e)
            if t is not None:
                toks.append(t)
        if not embs:
            return np.zeros((0, self.embed_dim), np.float32), (torch.empty(0) if tokens else None)
        out = np.ascontiguousarray(np.concatenate(embs), dtype=np.float32)
        return out, (torch.cat(toks) if tokens else None)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length), padded with 0 as the pretrained weights expect."""
        return self.tokenizer(list(texts))

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Contrastive text embeddings (CoCa: the unimodal decoder's CLS output, projected; CLIP: the EOT token's;
        SigLIP: the last token's), L2-normalised.

        Always uses the full padded ids: the latent depends on the padding.

        Returns:
            float32 array (N, D).
        """
        import torch

        if isinstance(texts, str):
            texts = [texts]
        bs = batch_size or self.text_batch_size
        out: list[np.ndarray] = []
        # A query or two on a CPU runs on one thread: there a second spinning thread gains ~30 ms when the machine is
        # idle and costs seconds when another program holds a core (coca_ViT-B-32, one query: 59 ms on one thread,
        # 1.4 s on two beside another job; benchmarks/RESULTS.md section 5.1).
        one_thread = self.device.startswith("cpu") and len(texts) <= FEW_TEXTS
        with torch_threads(1 if one_thread else None):
            for i in range(0, len(texts), bs):
                ids = self.tokenize(texts[i : i + bs]).to(self.device)
                with self._inference():
                    latent = self._encode_text_latent(ids)
                out.append(torch.nn.functional.normalize(latent.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def caption_token_count(self, text: str) -> int:
        """How many tokens :meth:`caption_loglik` scores (CoCa only)."""
        raise self._needs_decoder("caption likelihood")

    def caption_loglik(self, text: str, image_tokens: torch.Tensor, chunk_size: int | None = None) -> np.ndarray:
        """Caption log-likelihood (CoCa only): see :meth:`CocaModel.caption_loglik`."""
        raise self._needs_decoder("caption likelihood")
