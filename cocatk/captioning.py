"""Caption images with CoCa's multimodal decoder: greedy, beam search and sampling.

Decoding runs on open_clip's modules directly, not ``CoCa.generate`` (open_clip 3.3 imports transformers'
``BeamSearchScorer`` from where only transformers < 4.56 exports it). With ``score_space="logits"`` it reproduces
``CoCa.generate`` token for token (the tests compare with the real ``generate`` under transformers 4.55). How the
settings map:

- ``generate(seq_len=30)`` counts the SOT: ``max_len=29`` ids after it (words and EOT). The default ``max_len=None``
  is 29 capped at the model's context - 1 (15 for the ``demo`` model), so a caption always fits the tokenizer again.
- ``min_seq_len=5``: ``min_len=4``, EOT banned before 4 tokens after SOT (HF ``MinLengthLogitsProcessor``). The
  ``demo`` model's one-object captions have 3 words: caption it with ``min_len=0``.
- greedy: open_clip's ``generation_type="top_k", top_k=1`` (it has no other); its last step forces an EOT.
- ``generation_type="beam_search"``: ``strategy="beam"``. open_clip's default ``num_beams=6, num_beam_groups=3``
  has no diversity penalty, so its 3 groups are 3 copies of one 2-beam search: ``num_beams=2`` decodes the same.
- ``repetition_penalty``: HF ``RepetitionPenaltyLogitsProcessor`` (a score s of a token in the prefix becomes
  s / p if s > 0 else s * p), after the min-length ban, as open_clip orders them.
- ``length_penalty``: the ``BeamSearchScorer``'s; open_clip cannot set it (always 1.0).
- ``top_k`` / ``top_p`` sampling: HF's warpers, then ``softmax(scores / temperature)`` as open_clip does.

Beam search (HF ``BeamSearchScorer``, ``early_stopping=False``): each step keeps the top ``2 K`` continuations of
the ``K`` beams by summed score; an EOT among the first ``K`` closes a hypothesis scored ``sum / len ** length_penalty``
(len counts SOT, words and EOT); an image is done when its ``K`` hypotheses are full and the worst beats the best
running sum divided by the current length; at ``max_len`` the running beams join the hypotheses without an EOT.

``score_space``: open_clip 3.3 feeds **raw logits** to the processors and sums them as beam scores (HF's own
``generate`` takes the log-softmax first). ``"logprobs"`` (the default) decodes by log-probabilities, which is what
beam search means; ``"logits"`` reproduces open_clip. Greedy decoding without a repetition penalty is the same in
both. Whatever the space, :attr:`Caption.logprob` is the model's log-probability of the caption's tokens, without
penalties, as :meth:`cocatk.models.CocaModel.caption_loglik` scores it.

Example:
    >>> from cocatk import load_model
    >>> model = load_model("demo", device="cpu")                                       # doctest: +SKIP
    >>> caps = generate_captions(model, images, GenerationConfig(strategy="greedy"))    # doctest: +SKIP
    >>> caps[0].text                                                                    # doctest: +SKIP
    'a red circle left of a blue square'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from .models import CocaModel

SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
STRATEGIES = ("greedy", "beam", "sample")
SCORE_SPACES = ("logprobs", "logits")
#: open_clip's ``generate(seq_len=30)`` counts SOT: 29 ids after it.
DEFAULT_MAX_LEN = 29
#: Initial score of every beam but the first (as open_clip): the first step expands one beam only.
_DEAD_BEAM = -1e9


@dataclass(frozen=True)
class GenerationConfig:
    """How captions are decoded. Validated on creation (:class:`~cocatk.errors.UsageError`).

    Attributes:
        strategy: ``"greedy"``, ``"beam"`` or ``"sample"``.
        num_beams: beams per image (beam only), >= 1; 1 is greedy.
        length_penalty: hypothesis score = sum / len ** length_penalty (beam only).
        min_len: EOT is banned before this many tokens after SOT (open_clip's ``min_seq_len - 1``).
        max_len: at most this many ids after SOT (words and EOT); None is 29 (open_clip's ``seq_len=30``) capped at
            the model's context - 1, so that every caption fits the tokenizer again.
        repetition_penalty: HF's: a score s of a token already in the prefix becomes s / p if s > 0 else s * p.
        top_k: sample among the k best tokens (0: all).
        top_p: sample among the smallest set of tokens with probability >= top_p (1: all).
        temperature: sampling temperature (applied after top-k/top-p, as open_clip does).
        seed: sampling seed; image i of a call draws from its own generator seeded (seed, i), so a caption does
            not depend on the batch it was decoded in. None draws from torch's global generator.
        score_space: ``"logprobs"`` or ``"logits"`` (open_clip 3.3's generate); see the module docs.
    """

    strategy: str = "beam"
    num_beams: int = 3
    length_penalty: float = 1.0
    min_len: int = 4
    max_len: int | None = None
    repetition_penalty: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int | None = None
    score_space: str = "logprobs"

    def __post_init__(self) -> None:
        def bad(what: str, hint: str) -> UsageError:
            return UsageError(what, hint=hint)

        if self.strategy not in STRATEGIES:
            raise bad(f"unknown caption strategy '{self.strategy}'", f"use one of: {', '.join(STRATEGIES)}")
        if self.score_space not in SCORE_SPACES:
            raise bad(f"unknown score space '{self.score_space}'", f"use one of: {', '.join(SCORE_SPACES)}")
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise bad(f"num_beams must be an integer >= 1, got {self.num_beams!r}", "pass --beams 1 or more")
        if not isinstance(self.min_len, int) or self.min_len < 0:
            raise bad(f"min_len must be an integer >= 0, got {self.min_len!r}", "pass --min-len 0 or more")
        if self.max_len is not None:
            if not isinstance(self.max_len, int) or self.max_len < 1:
                raise bad(f"max_len must be an integer >= 1, got {self.max_len!r}", "pass --max-len 1 or more")
            if self.max_len <= self.min_len:
                raise bad(
                    f"max_len ({self.max_len}) must be larger than min_len ({self.min_len})",
                    "raise --max-len or lower --min-len",
                )
        if not self.repetition_penalty > 0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "1.0 means no penalty")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be an integer >= 0, got {self.top_k!r}", "0 keeps every token")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "1.0 keeps every token")
        if not self.temperature > 0:
            raise bad(f"temperature must be > 0, got {self.temperature}", "1.0 samples from the model's distribution")

    def resolved_max_len(self, context_length: int) -> int:
        """``max_len`` for a model whose tokenizer holds ``context_length`` ids (SOT and EOT included).

        Raises:
            UsageError: ``max_len`` does not fit the model's context.
        """
        limit = context_length - 1
        if self.min_len >= limit:
            raise UsageError(
                f"min_len {self.min_len} leaves no room in this model's context of {context_length} tokens",
                hint=f"pass --min-len {limit - 1} or less",
            )
        if self.max_len is None:
            return min(DEFAULT_MAX_LEN, limit)
        if self.max_len > limit:
            raise UsageError(
                f"max_len {self.max_len} does not fit this model's context of {context_length} tokens",
                hint=f"pass --max-len {limit} or less",
            )
        return self.max_len

    def identity(self) -> dict[str, Any]:
        """What an index records beside each caption: the settings that change the decoded text."""
        keys = ["strategy", "min_len", "max_len", "repetition_penalty", "score_space"]
        if self.strategy == "beam":
            keys += ["num_beams", "length_penalty"]
        elif self.strategy == "sample":
            keys += ["top_k", "top_p", "temperature", "seed"]
        full = asdict(self)
        return {"decoder": "cocatk.captioning/1", **{k: full[k] for k in keys}}


@dataclass(frozen=True)
class Caption:
    """One decoded caption.

    Attributes:
        text: the words, detokenised.
        token_ids: the ids after SOT: the words, then EOT (absent when beam search reached ``max_len``).
        logprob: sum over ``token_ids`` of log p(token | prefix, image) under the model (no penalties), in nats.
    """

    text: str
    token_ids: tuple[int, ...]
    logprob: float

    @property
    def finished(self) -> bool:
        """True when the caption ends with EOT. Greedy and sampling end a caption cut at ``max_len`` with a forced
        EOT, as open_clip does; beam search leaves it without one."""
        return bool(self.token_ids) and self.token_ids[-1] == EOT_ID

    @property
    def mean_logprob(self) -> float:
        """``logprob`` per scored token."""
        return self.logprob / max(1, len(self.token_ids))

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "logprob": self.logprob,
            "mean_logprob": self.mean_logprob,
        }


#: Presets whose captions are shorter than open_clip's minimum of 4 tokens (the demo's one-object scenes are three
#: words: "a red circle"); they caption with no minimum length unless one is asked for.
_SHORT_CAPTION_PRESETS = frozenset({"demo"})


def make_config(model: CocaModel, config: GenerationConfig | Mapping[str, Any] | None = None) -> GenerationConfig:
    """The settings to caption with: ``config`` as given, or built from a mapping of the fields the user set, the
    rest taking their defaults for this model (``min_len`` 0 for the ``demo`` preset, open_clip's 4 otherwise)."""
    if isinstance(config, GenerationConfig):
        return config
    fields = {k: v for k, v in dict(config or {}).items() if v is not None}
    if "min_len" not in fields and model.spec.preset in _SHORT_CAPTION_PRESETS:
        fields["min_len"] = 0
    return GenerationConfig(**fields)


def generate_captions(
    model: CocaModel,
    images: Sequence[Image.Image] | torch.Tensor,
    config: GenerationConfig | None = None,
    batch_size: int | None = None,
) -> list[Caption]:
    """Caption images with the model's multimodal decoder.

    Args:
        model: a loaded :class:`~cocatk.models.CocaModel`.
        images: PIL images, a preprocessed tensor (N, 3, S, S) from :meth:`CocaModel.preprocess_images`, or image
            tokens (N, T, D) from :meth:`CocaModel.image_tokens` or an index's token cache (fp16 is fine).
        config: decoding settings (default: beam search, 3 beams).
        batch_size: images decoded together (each with its beams); default 16.

    Returns:
        One :class:`Caption` per image, in order.

    Raises:
        UsageError: a bad tensor shape, or ``max_len`` beyond the model's context.
    """
    import torch

    cfg = config or GenerationConfig()
    max_len = cfg.resolved_max_len(model.context_length)
    bs = 16 if batch_size is None else batch_size
    if bs < 1:
        raise UsageError(f"batch_size must be >= 1, got {bs}", hint="pass a positive batch size")
    out: list[Caption] = []
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        width = int(model.model.text_decoder.text_projection.shape[0])
        if images.shape[2] != width:
            raise UsageError(
                f"image tokens of width {images.shape[2]} do not fit this model's decoder (width {width})",
                hint="use the tokens of the model that captions (an index's token cache records its model)",
            )
        n = images.shape[0]
        for i in range(0, n, bs):
            out.extend(_decode(model, images[i : i + bs], cfg, max_len, offset=i))
        return out
    if isinstance(images, torch.Tensor) and images.ndim != 4:
        raise UsageError(
            f"expected images (N, 3, S, S) or image tokens (N, T, D), got a tensor of shape {tuple(images.shape)}",
            hint="pass PIL images, CocaModel.preprocess_images(...) or CocaModel.image_tokens(...)",
        )
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    for i in range(0, n, bs):
        chunk = images[i : i + bs]
        out.extend(_decode(model, model.image_tokens(chunk), cfg, max_len, offset=i))
    return out


# ---- decoding -----------------------------------------------------------------------------------------------------


class _Stepper:
    """Next-token logits for a batch of growing prefixes against a batch of images.

    open_clip's ``generate`` reruns the text tower and the decoder over the whole prefix at every step, and its
    decoder projects the T image tokens to keys and values in every cross-attention layer on every call (2 T D^2 per
    row, layer and step). Here (``cached``) each image's cross-attention keys and values are projected once and
    shared by its beams (the K beams of an image attend as K query rows of one call: no copy per beam), the
    self-attention keys and values of both towers are cached, so a step runs one new position per row, and only
    that position goes through the vocabulary projection. Equal to open_clip's forward within float rounding; the
    tests check that the decoded ids are identical. ``cached=False`` runs open_clip's own blocks on the full prefix
    (the check path).
    """

    def __init__(self, model: CocaModel, image_tokens: torch.Tensor, cached: bool = True) -> None:
        import torch

        self.m = model.model
        self.dec = self.m.text_decoder
        self.images = image_tokens
        self.cached = cached and _cache_supported(self.m)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.text_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dec_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        if self.cached:
            for cross in self.dec.cross_attn:
                attn = cross.attn
                d, heads = attn.embed_dim, attn.num_heads
                _, w_k, w_v = attn.in_proj_weight.split(d)
                _, b_k, b_v = attn.in_proj_bias.split(d)
                x = cross.ln_1_kv(image_tokens)
                n, t, _ = x.shape
                k = torch.nn.functional.linear(x, w_k, b_k).view(n, t, heads, d // heads).transpose(1, 2)
                v = torch.nn.functional.linear(x, w_v, b_v).view(n, t, heads, d // heads).transpose(1, 2)
                self.kv.append((k, v))

    def logits(
        self, ids: torch.Tensor, parents: torch.Tensor | None, items: torch.Tensor, per_item: int
    ) -> torch.Tensor:
        """fp32 logits (R, V) of the token after each prefix ``ids`` (R, L).

        Rows are ``per_item`` consecutive prefixes for each image index in ``items`` (R = len(items) * per_item).
        ``parents[r]``: the row of the previous call whose prefix row r extends by one token (None on the first
        call, when every prefix is the SOT alone).
        """
        if not self.cached:
            return self._logits_full(ids, items, per_item)
        return self._logits_cached(ids, parents, items, per_item)

    def _logits_full(self, ids: torch.Tensor, items: torch.Tensor, per_item: int) -> torch.Tensor:
        _, x = self.m._encode_text(ids)  # (R, L, D)
        r, length, d = x.shape
        a = items.shape[0]
        mask = self.dec.attn_mask[:length, :length]
        img = self.images[items]
        for block, cross in zip(self.dec.resblocks, self.dec.cross_attn, strict=True):
            x = block(x, attn_mask=mask)
            # open_clip's own block; the beams of an image share one call as extra query rows
            x = cross(x.reshape(a, per_item * length, d), k_x=img, v_x=img).reshape(r, length, d)
        return self._project(x[:, -1])

    def _project(self, last: torch.Tensor) -> torch.Tensor:
        out = self.dec.ln_final(last)
        proj = self.dec.text_projection
        return (out @ proj if proj is not None else out).float()

    def _logits_cached(
        self, ids: torch.Tensor, parents: torch.Tensor | None, items: torch.Tensor, per_item: int
    ) -> torch.Tensor:
        text = self.m.text
        pos = ids.shape[1] - 1
        if parents is not None:
            self.text_cache = [(k[parents], v[parents]) for k, v in self.text_cache]
            self.dec_cache = [(k[parents], v[parents]) for k, v in self.dec_cache]
        first = parents is None
        x = text.token_embedding(ids[:, -1:]) + text.positional_embedding[pos]  # (R, 1, D)
        new_text = []
        for i, block in enumerate(text.transformer.resblocks):
            x, kv = _cached_block(block, x, None if first else self.text_cache[i])
            new_text.append(kv)
        self.text_cache = new_text
        r, _, d = x.shape
        a = items.shape[0]
        new_dec = []
        for i, (block, cross) in enumerate(zip(self.dec.resblocks, self.dec.cross_attn, strict=True)):
            x, kv = _cached_block(block, x, None if first else self.dec_cache[i])
            new_dec.append(kv)
            k, v = self.kv[i]
            x = _cross_block(cross, x.view(a, per_item, d), k[items], v[items]).view(r, 1, d)
        self.dec_cache = new_dec
        return self._project(x[:, 0])


def _cache_supported(m: Any) -> bool:
    """The cached step reimplements open_clip's plain pre-LN blocks; anything else takes the full path."""
    from torch import nn

    blocks = [*m.text.transformer.resblocks, *m.text_decoder.resblocks, *m.text_decoder.cross_attn]
    plain = all(
        type(b).__name__ == "ResidualAttentionBlock"
        and isinstance(b.attn, nn.MultiheadAttention)
        and b.attn._qkv_same_embed_dim
        and b.attn.in_proj_bias is not None
        and b.attn.bias_k is None
        and not b.attn.add_zero_attn
        for b in blocks
    )
    return (
        plain
        and m.text.cls_emb is not None  # tokens do not go through the text tower's ln_final
        and not getattr(m.text, "use_pad_mask", False)
        and m.text.transformer.batch_first
        and m.text_decoder.batch_first
    )


def _cached_block(block: Any, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None) -> Any:
    """open_clip's causal ResidualAttentionBlock for one new position (R, 1, D), its keys/values appended to
    ``cache`` ((R, H, L, dh) each); returns the output and the grown cache."""
    import torch
    import torch.nn.functional as F

    attn = block.attn
    r, _, d = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    q, k, v = (t.view(r, 1, heads, d // heads).transpose(1, 2) for t in (q, k, v))  # (R, H, 1, dh)
    if cache is not None:
        k = torch.cat([cache[0], k], dim=2)
        v = torch.cat([cache[1], v], dim=2)
    o = F.scaled_dot_product_attention(q, k, v)  # the new position sees every earlier one: causal by construction
    o = attn.out_proj(o.transpose(1, 2).reshape(r, 1, d))
    x = x + block.ls_1(o)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, (k, v)


def _cross_block(cross: Any, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """open_clip's cross-attention block for (A, Q, D) text rows against precomputed image keys/values
    (A, H, T, dh)."""
    import torch.nn.functional as F

    attn = cross.attn
    a, nq, d = x.shape
    heads = attn.num_heads
    q = F.linear(cross.ln_1(x), attn.in_proj_weight[:d], attn.in_proj_bias[:d])
    q = q.view(a, nq, heads, d // heads).transpose(1, 2)  # (A, H, Q, dh)
    o = F.scaled_dot_product_attention(q, k, v)
    o = attn.out_proj(o.transpose(1, 2).reshape(a, nq, d))
    x = x + cross.ls_1(o)
    return x + cross.ls_2(cross.mlp(cross.ln_2(x)))


def _process(scores: torch.Tensor, prefix: torch.Tensor, cfg: GenerationConfig, eos_banned: bool) -> torch.Tensor:
    """HF's MinLengthLogitsProcessor then RepetitionPenaltyLogitsProcessor, the order open_clip uses."""
    import torch

    if eos_banned:  # in place: the caller's tensor is fresh, and EOT cannot be picked while banned
        scores[:, EOT_ID] = -float("inf")
    if cfg.repetition_penalty != 1.0:
        picked = torch.gather(scores, 1, prefix)
        picked = torch.where(picked < 0, picked * cfg.repetition_penalty, picked / cfg.repetition_penalty)
        scores = scores.scatter(1, prefix, picked)
    return scores


def _warp(scores: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """HF's TopKLogitsWarper and TopPLogitsWarper (keep at least one token)."""
    import torch

    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if cfg.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - cfg.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return scores


def _decode(
    model: CocaModel, image_tokens: torch.Tensor, cfg: GenerationConfig, max_len: int, offset: int
) -> list[Caption]:
    import torch

    with model._inference():
        tokens = image_tokens.to(model.device, torch.float32)  # fp16 caches too
        stepper = _Stepper(model, tokens, cached=_CACHED)
        if cfg.strategy == "beam" and cfg.num_beams > 1:
            seqs = _beam_search(stepper, tokens.shape[0], cfg, max_len, model.device)
        else:
            seqs = _sample_or_greedy(stepper, tokens.shape[0], cfg, max_len, model.device, offset)
    out = []
    for ids, lp in seqs:
        words = [t for t in ids if t != EOT_ID]
        text = model.tokenizer.decode(words).strip() if words else ""
        out.append(Caption(text=" ".join(text.split()), token_ids=tuple(ids), logprob=float(lp)))
    return out


#: Cached decoder steps (False: open_clip's own blocks on the full prefix at every step; for checks).
_CACHED = True


def _sample_or_greedy(
    stepper: _Stepper, n: int, cfg: GenerationConfig, max_len: int, device: str, offset: int
) -> list[tuple[list[int], float]]:
    """open_clip's sampling loop (``generate`` with top_k / top_p); greedy is its top_k=1 (the argmax)."""
    import torch

    prefix = torch.full((n, 1), SOT_ID, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    logprob = torch.zeros(n, dtype=torch.float64, device=device)
    gens = None
    if cfg.strategy == "sample" and cfg.seed is not None:
        gens = [torch.Generator(device=device).manual_seed(_row_seed(cfg.seed, offset + i)) for i in range(n)]
    greedy = cfg.strategy != "sample" or cfg.top_k == 1
    prev_alive = None
    for step in range(max_len):
        alive = (~done).nonzero().squeeze(1)
        if alive.numel() == 0:
            break
        ids = prefix[alive]
        parents = None if prev_alive is None else torch.searchsorted(prev_alive, alive)
        logits = stepper.logits(ids, parents, alive, 1)
        prev_alive = alive
        logp = logits.log_softmax(dim=-1)
        scores = logp if cfg.score_space == "logprobs" else logits
        scores = _process(scores, ids, cfg, eos_banned=step < cfg.min_len)
        if step == max_len - 1:  # open_clip ends every caption at seq_len with an EOT
            nxt = torch.full((alive.numel(),), EOT_ID, dtype=torch.long, device=device)
        elif greedy:
            nxt = scores.argmax(dim=-1)
        else:
            probs = (_warp(scores, cfg) / cfg.temperature).softmax(dim=-1)
            if gens is None:
                nxt = torch.multinomial(probs, 1).squeeze(1)
            else:
                nxt = torch.stack(
                    [torch.multinomial(probs[j], 1, generator=gens[int(i)])[0] for j, i in enumerate(alive)]
                )
        col = torch.full((n,), PAD_ID, dtype=torch.long, device=device)
        col[alive] = nxt
        logprob[alive] += logp.gather(1, nxt[:, None]).squeeze(1).double()
        prefix = torch.cat([prefix, col[:, None]], dim=1)
        done[alive] |= nxt == EOT_ID
    result = []
    for i in range(n):
        ids = prefix[i, 1:].tolist()
        if EOT_ID in ids:
            ids = ids[: ids.index(EOT_ID) + 1]
        result.append((ids, float(logprob[i])))
    return result


def _row_seed(seed: int, index: int) -> int:
    """The sampling seed of image ``index`` of a call: independent of the batch the image is decoded in."""
    return (seed * 1_000_003 + index) % (1 << 63)


class _Hypotheses:
    """HF's BeamHypotheses (transformers 4.57, ``early_stopping=False``): the best ``num_beams`` finished beams."""

    def __init__(self, num_beams: int, length_penalty: float) -> None:
        self.num_beams = num_beams
        self.length_penalty = length_penalty
        self.beams: list[tuple[float, list[int], float]] = []  # (score, ids without SOT, model logprob)
        self.worst_score = 1e9

    def add(self, ids: list[int], sum_scores: float, generated_len: int, logprob: float) -> None:
        score = sum_scores / (generated_len**self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, ids, logprob))
            if len(self.beams) > self.num_beams:
                ranked = sorted([(s, idx) for idx, (s, _, _) in enumerate(self.beams)])
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        return self.worst_score >= best_sum / cur_len**self.length_penalty


def _beam_search(
    stepper: _Stepper, n: int, cfg: GenerationConfig, max_len: int, device: str
) -> list[tuple[list[int], float]]:
    """open_clip's ``_generate_beamsearch`` with HF's BeamSearchScorer (one beam group); finished images drop out."""
    import torch

    k = cfg.num_beams
    seq_len = max_len + 1
    # Running beams: ids as a tensor (the model's input), scores and model log-probabilities as Python floats
    # (fp32 scores round-trip exactly; HF's scorer reads them with .item() as well).
    prefix = torch.full((n * k, 1), SOT_ID, dtype=torch.long, device=device)
    beam_scores = [0.0 if j == 0 else _DEAD_BEAM for _ in range(n) for j in range(k)]
    beam_lp = [0.0] * (n * k)
    hyps = [_Hypotheses(k, cfg.length_penalty) for _ in range(n)]
    done = [False] * n
    order: list[int] | None = None
    prev_rows: list[int] = []
    while True:
        cur_len = prefix.shape[1] + 1  # HF's length of the sequence after this step (SOT counted)
        items = [i for i in range(n) if not done[i]]
        row_list = [i * k + j for i in items for j in range(k)]
        rows = torch.tensor(row_list, dtype=torch.long, device=device)
        ids = prefix[rows]
        parents = None
        if order is not None:  # where each row's prefix was in the previous step's batch
            where = {row: i for i, row in enumerate(prev_rows)}
            parents = torch.tensor([where[order[r]] for r in row_list], dtype=torch.long, device=device)
        logits = stepper.logits(ids, parents, torch.tensor(items, dtype=torch.long, device=device), k)
        prev_rows = row_list
        logp = logits.log_softmax(dim=-1)
        scores = logp if cfg.score_space == "logprobs" else logits
        scores = _process(scores, ids, cfg, eos_banned=prefix.shape[1] < cfg.min_len + 1)
        vocab = scores.shape[-1]
        start = torch.tensor([beam_scores[r] for r in row_list], dtype=torch.float32, device=device)
        total = (scores + start.unsqueeze(-1)).view(len(items), k * vocab)
        top_scores, top_flat = torch.topk(total, 2 * k, dim=1, largest=True, sorted=True)
        cand_lp = logp.view(len(items), k * vocab).gather(1, top_flat).tolist()
        top_scores_l, top_flat_l = top_scores.tolist(), top_flat.tolist()
        order = list(range(n * k))  # row of the previous prefix each new row continues (done items: itself)
        col = [PAD_ID] * (n * k)
        old_lp = list(beam_lp)  # beam_lp is rewritten below while its old values are still read
        for a, item in enumerate(items):
            slot = 0
            for rank in range(2 * k):
                b, tok = divmod(top_flat_l[a][rank], vocab)
                sc = top_scores_l[a][rank]
                token_lp = old_lp[item * k + b] + cand_lp[a][rank]
                if tok == EOT_ID:
                    if rank >= k:
                        continue
                    words = prefix[item * k + b, 1:].tolist() + [EOT_ID]
                    hyps[item].add(words, sc, cur_len, token_lp)
                else:
                    dst = item * k + slot
                    order[dst] = item * k + b
                    col[dst] = tok
                    beam_scores[dst] = sc
                    beam_lp[dst] = token_lp
                    slot += 1
                if slot == k:
                    break
            done[item] = done[item] or hyps[item].is_done(top_scores_l[a][0], cur_len)
        new_col = torch.tensor(col, dtype=torch.long, device=device)[:, None]
        prefix = torch.cat([prefix[torch.tensor(order, device=device)], new_col], dim=1)
        if all(done) or prefix.shape[1] >= seq_len:
            break
    result = []
    for i in range(n):
        if not done[i]:  # HF's finalize: running beams join without an EOT
            for j in range(k):
                r = i * k + j
                hyps[i].add(prefix[r, 1:].tolist(), beam_scores[r], prefix.shape[1], beam_lp[r])
        best = sorted(hyps[i].beams, key=lambda h: h[0])[-1]
        result.append((best[1], best[2]))
    return result
