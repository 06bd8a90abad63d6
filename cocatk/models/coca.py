"""CoCa: :class:`CocaModel`, contrastive towers plus the multimodal decoder (rerank, captions, likelihood), and
:func:`decoder_logits`, the decoder's forward from cached tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import (
    UsageError,
)
from .dual import ClipModel

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class CocaModel(ClipModel):
    """A loaded CoCa model: the dual encoder's heads plus the multimodal decoder's (image tokens, caption
    log-likelihood). Create it with :func:`load_model`."""

    def _encode_batch(self, x: torch.Tensor, want_tokens: bool) -> tuple[np.ndarray, torch.Tensor | None]:
        import torch

        x = x.to(self.device, non_blocking=True)
        with self._inference():
            latent, tokens = self.model._encode_image(x, normalize=False)
        latent = torch.nn.functional.normalize(latent.float(), dim=-1)  # re-normalise in fp32 after autocast
        return latent.cpu().numpy(), (tokens.float() if want_tokens else None)

    def _text_tower(self) -> Any:
        """The unimodal text tower: a bf16 copy on a CPU in bf16 (2.5x faster per query on coca_ViT-B-32), else the
        model's own."""
        return self._bf16_copy("text", island=True) if self.cpu_bf16 else self.model.text

    def _encode_text_latent(self, ids: torch.Tensor) -> torch.Tensor:
        latent, _ = self._text_tower()(ids)  # open_clip's CoCa._encode_text(ids, normalize=False)
        return latent

    def fp32_text_latent(self, ids: torch.Tensor, module: Any = None) -> torch.Tensor:
        latent, _ = (module or self.model).text(ids)
        return latent

    def _caption_ids(self, text: str) -> torch.Tensor:
        """[SOT, words..., EOT] ids (1, L), trimmed at the EOT (not at id 0, which is the real token '!')."""
        if not text or not text.strip():
            raise UsageError("empty query text", hint="pass a non-empty text to score")
        ids = self.tokenize([text])
        eot = self.tokenizer.eot_token_id
        positions = (ids[0] == eot).nonzero()
        end = int(positions[0]) + 1 if len(positions) else ids.shape[1]
        return ids[:, :end]

    def caption_token_count(self, text: str) -> int:
        """How many tokens :meth:`caption_loglik` scores for ``text``: its words plus the EOT."""
        return int(self._caption_ids(text).shape[1]) - 1

    def caption_loglik(self, text: str, image_tokens: torch.Tensor, chunk_size: int | None = None) -> np.ndarray:
        """Caption log-likelihood log p(text | image) for one text against K images.

        score_k = sum over t >= 1 of log p(ids[t] | ids[<t], image_k) with ids = [SOT, words..., EOT]. The unimodal
        text tower runs once; the multimodal decoder runs over the K images in chunks.

        Args:
            text: the caption or query.
            image_tokens: (K, T, D) from :meth:`image_tokens` (any float dtype, any device).
            chunk_size: images per decoder pass; default keeps the (chunk, L, vocab) logits near 256 MB.

        Returns:
            float64 array (K,) of summed log-probabilities (nats). See :meth:`caption_token_count`.
        """
        import torch

        if image_tokens.ndim != 3:
            raise UsageError(
                f"expected image tokens of shape (K, T, D), got {tuple(image_tokens.shape)}",
                hint="pass the output of CocaModel.image_tokens",
            )
        ids = self._caption_ids(text).to(self.device)
        k = image_tokens.shape[0]
        if k == 0:
            return np.zeros(0, np.float64)
        steps = ids.shape[1] - 1
        vocab = int(self.model.text_decoder.text_projection.shape[-1])
        if chunk_size is None:
            chunk_size = max(1, (256 << 20) // max(1, steps * vocab * 4))
        targets = ids[:, 1:]
        scores: list[np.ndarray] = []
        # On a CPU in bf16 the decoder runs as a bf16 copy (1.7x faster over 50 images on coca_ViT-B-32, within
        # 0.02 nats per token: tests/test_precision.py).
        decoder = self._bf16_copy("text_decoder", island=False) if self.cpu_bf16 else self.model.text_decoder
        dtype = torch.bfloat16 if self.cpu_bf16 else torch.float32
        with self._inference():
            _, token_embs = self._text_tower()(ids)
            inputs = token_embs[:, :-1].to(dtype)
            for i in range(0, k, chunk_size):
                embs = image_tokens[i : i + chunk_size].to(self.device, dtype)  # fp16 caches too
                n = embs.shape[0]
                logits = decoder_logits(decoder, embs, inputs)
                logp = logits.float().log_softmax(dim=-1)
                picked = logp.gather(-1, targets.expand(n, -1).unsqueeze(-1)).squeeze(-1)
                scores.append(picked.sum(dim=-1).double().cpu().numpy())
        return np.concatenate(scores)


def decoder_logits(
    decoder: Any, image_embs: torch.Tensor, text_embs: torch.Tensor, fold: bool | None = None
) -> torch.Tensor:
    """open_clip's ``MultimodalTransformer.forward`` for ONE text against N images: logits (N, L, vocab).

    Same function, cheaper order of operations. The plain forward projects all T image tokens to keys and values in
    every cross-attention layer (2 T D^2 per image and layer), although only L text tokens (L << T for a query)
    attend to them. Here the projections are folded into the queries instead: q_h K_h^T = (q_h W_k,h) x^T (the key
    bias adds a per-row constant, which softmax ignores) and attn V_h = (attn x) W_v,h^T + b_v,h (attention rows sum to
    1), which costs 2 L D^2 + 2 H L T D per image and layer: about 4x less for a 13-token query over 255 tokens. The
    first layer's self-attention, which does not depend on the image, runs once. Long texts (H L >= T) take the
    plain path. Equal to the plain forward within float rounding (checked in the tests).

    Args:
        decoder: ``model.text_decoder`` (an open_clip ``MultimodalTransformer``, batch_first).
        image_embs: (N, T, D) image tokens.
        text_embs: (1, L, D) the text tower's token embeddings of the decoder input.
        fold: force the folded (True) or plain (False) order; None picks the cheaper one.
    """
    import torch.nn.functional as F

    n, t, _ = image_embs.shape
    length = text_embs.shape[1]
    heads = decoder.cross_attn[0].attn.num_heads
    if fold is None:
        fold = heads * length < t
    if not fold or not decoder.batch_first:
        return decoder(image_embs, text_embs.expand(n, -1, -1))
    mask = decoder.attn_mask[:length, :length]
    x = text_embs
    for resblock, cross in zip(decoder.resblocks, decoder.cross_attn, strict=True):
        x = resblock(x, attn_mask=mask)
        attn = cross.attn
        d = attn.embed_dim
        dh = d // heads
        w_q, w_k, w_v = attn.in_proj_weight.split(d)
        b_q, _, b_v = attn.in_proj_bias.split(d)
        kv = cross.ln_1_kv(image_embs)  # (N, T, D)
        q = F.linear(cross.ln_1(x), w_q, b_q) * dh**-0.5  # (1 or N, L, D)
        m = q.shape[0]
        # Per-head weights as (H, dh, D) batches; the text rows of all images share each head's matmul, so no
        # weight is broadcast (and copied) per image.
        q = q.view(m * length, heads, dh).transpose(0, 1)  # (H, M L, dh)
        qk = (q @ w_k.view(heads, dh, d)).view(heads, m, length, d)  # (H, M, L, D): queries in image-token space
        qk = qk.permute(1, 0, 2, 3).expand(n, -1, -1, -1).reshape(n, heads * length, d)  # (N, H L, D)
        scores = qk @ kv.transpose(1, 2)  # (N, H L, T)
        mixed = (scores.softmax(dim=-1) @ kv).view(n, heads, length, d)  # (N, H, L, D)
        mixed = mixed.transpose(0, 1).reshape(heads, n * length, d)  # (H, N L, D)
        out = mixed @ w_v.view(heads, dh, d).transpose(1, 2) + b_v.view(heads, 1, dh)  # (H, N L, dh)
        out = out.view(heads, n, length, dh).permute(1, 2, 0, 3)  # (N, L, H, dh)
        out = attn.out_proj(out.reshape(n, length, d))
        x = x + cross.ls_1(out)
        x = x + cross.ls_2(cross.mlp(cross.ln_2(x)))
    out = decoder.ln_final(x)
    return out @ decoder.text_projection if decoder.text_projection is not None else out
