"""BLIP-ITM, the reranker family: score a first stage's top-k images against one text query.

Two rerankers, whatever model built the index (CoCa, CLIP, SigLIP, EVA):

- ``coca``: caption log-likelihood log p(text | image) from a CoCa's multimodal decoder
  (:meth:`cocatk.models.CocaModel.caption_loglik`). The index's own model when it is a CoCa, or a separate
  ``--rerank-model``; its decoder tokens come from the index's token cache when that cache was built for it.
- ``blip-itm`` (:class:`BlipItmReranker`): BLIP's image-text matching head, P(match | image, text) = softmax of
  ``BlipForImageTextRetrieval``'s ``itm_score`` (transformers, extra ``cocatk[blip]``).

Example:
    >>> from cocatk.models.blip import load_blip_itm
    >>> blip = load_blip_itm("Salesforce/blip-itm-base-coco")            # doctest: +SKIP
    >>> blip.score("a red bicycle", images)                               # doctest: +SKIP
    array([0.93, 0.02, ...])

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RerankerError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: The rerankers by name (``--reranker``).
RERANKERS = ("coca", "blip-itm")
#: BLIP ITM weights used when none are named: ViT-B/16 at 384 px, fine-tuned on COCO.
DEFAULT_BLIP = "Salesforce/blip-itm-base-coco"
#: Seed of random-weight BLIP models (plumbing and speed only).
RANDOM_SEED = 0
BLIP_RANDOM_NOTICE = "BLIP-ITM with random weights (pretrained none): its scores are plumbing and speed only"


def check_reranker(name: str) -> str:
    """Validate a ``--reranker`` value (``coca`` or ``blip-itm``)."""
    name = (name or "coca").strip().lower()
    if name not in RERANKERS:
        raise UsageError(f"unknown reranker '{name}'", hint=f"use one of: {', '.join(RERANKERS)}")
    return name


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise RerankerError(
            "the BLIP-ITM reranker needs transformers, which is not installed",
            hint="pip install 'cocatk[blip]' (or drop --reranker blip-itm)",
        ) from e
    return transformers


@dataclass
class BlipItmReranker:
    """A loaded ``BlipForImageTextRetrieval`` with its tokenizer and image processor. Create it with
    :func:`load_blip_itm`."""

    name: str
    model: Any
    tokenizer: Any
    image_processor: Any
    device: str
    is_random: bool = False
    batch_size: int = 16
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    kind = "blip-itm"

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def info(self) -> dict[str, Any]:
        return {"reranker": self.kind, "model": self.name, "random_weights": self.is_random, "device": self.device}

    def notices(self) -> list[str]:
        return [BLIP_RANDOM_NOTICE] if self.is_random else []

    def preprocess_images(self, images: Sequence[Image.Image]) -> Any:
        """BLIP's own image processor: (N, 3, S, S) float32."""
        import torch

        if not images:
            return torch.empty((0, 3, self.image_size, self.image_size))
        return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def image_embeds(self, images: Sequence[Image.Image] | Any, batch_size: int | None = None) -> Any:
        """The vision tower's output that the ITM text encoder cross-attends to: (K, P, W) float32 on the device.

        Compute it once per image to score many texts (an evaluation); :meth:`score` does both steps."""
        import torch

        pixels = images if isinstance(images, torch.Tensor) else self.preprocess_images(list(images))
        bs = batch_size or self.batch_size
        out = []
        with torch.inference_mode():
            for i in range(0, pixels.shape[0], bs):
                px = pixels[i : i + bs].to(self.device, torch.float32)
                out.append(self.model.vision_model(pixel_values=px).last_hidden_state)
        if not out:
            return torch.empty(0)
        return torch.cat(out)

    def score_embeds(self, text: str, image_embeds: Any, batch_size: int | None = None) -> np.ndarray:
        """P(match | image, text) from :meth:`image_embeds`: the text encoder (cross-attending to each image) and the
        ITM head, as ``BlipForImageTextRetrieval.forward(use_itm_head=True)`` does; float64 (K,)."""
        import torch

        if not text or not text.strip():
            raise UsageError("empty query text", hint="pass a non-empty text to score")
        k = int(image_embeds.shape[0]) if image_embeds.ndim == 3 else 0
        if k == 0:
            return np.zeros(0, np.float64)
        # BLIP's processor truncates at 35 tokens for retrieval (its max_length in the BLIP repo's ITM config).
        enc = self.tokenizer([text], return_tensors="pt", truncation=True, max_length=35)
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        bs = batch_size or self.batch_size
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for i in range(0, k, bs):
                emb = image_embeds[i : i + bs].to(self.device, torch.float32)
                n = emb.shape[0]
                hidden = self.model.text_encoder(
                    input_ids=ids.expand(n, -1),
                    attention_mask=mask.expand(n, -1),
                    encoder_hidden_states=emb,
                    encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long, device=emb.device),
                ).last_hidden_state
                logits = self.model.itm_head(hidden[:, 0, :])
                out.append(logits.float().softmax(dim=-1)[:, 1].double().cpu().numpy())
        return np.concatenate(out)

    def score(self, text: str, images: Sequence[Image.Image] | Any, batch_size: int | None = None) -> np.ndarray:
        """P(match | image, text) for one text against K images: softmax(itm_score)[:, 1], float64 (K,).

        Args:
            text: the query.
            images: PIL images, or pixel values from :meth:`preprocess_images`.
            batch_size: images per forward pass.
        """
        if not text or not text.strip():
            raise UsageError("empty query text", hint="pass a non-empty text to score")
        return self.score_embeds(text, self.image_embeds(images, batch_size), batch_size)


_CACHE: dict[tuple[str, str, str], BlipItmReranker] = {}
_CACHE_LOCK = threading.Lock()


def load_blip_itm(name: str | None = None, pretrained: str | None = None, device: str | None = None) -> BlipItmReranker:
    """Load BLIP's image-text matching model (once per process).

    Args:
        name: a Hugging Face repo (default ``Salesforce/blip-itm-base-coco``) or a local folder saved with
            ``save_pretrained`` (config, weights, tokenizer, ``preprocessor_config.json``).
        pretrained: ``"none"`` builds ``name``'s architecture (the default: BLIP base, 384 px) with seeded random
            weights and a generated stand-in tokenizer, for plumbing and speed only; anything else loads ``name``.
        device: ``cpu`` or ``cuda``; default cuda when available.

    Raises:
        RerankerError: transformers is missing, or the weights / tokenizer are neither a local folder nor in the
            Hugging Face cache and cannot be downloaded.
    """
    from .precision import resolve_device

    name = (name or DEFAULT_BLIP).strip()
    dev = resolve_device(device)
    random_weights = (pretrained or "").strip().lower() == "none"
    key = (name, "none" if random_weights else "", dev)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build_random(name, dev) if random_weights else _load_pretrained(name, dev)
        return _CACHE[key]


def _load_pretrained(name: str, device: str) -> BlipItmReranker:
    from .registry import hub_unreachable_reason

    tf = _transformers()
    local = Path(name).expanduser()
    is_dir = local.is_dir()
    looks_local = name.startswith((os.sep, ".", "~")) or name.count("/") > 1
    if not is_dir and looks_local:
        raise RerankerError(f"BLIP model folder {name} not found", hint="pass an existing folder or a hub repo name")
    source = str(local) if is_dir else name
    offline = None if is_dir else hub_unreachable_reason()
    try:
        with _quiet():
            model = tf.BlipForImageTextRetrieval.from_pretrained(source, local_files_only=offline is not None)
            tokenizer = tf.AutoTokenizer.from_pretrained(source, local_files_only=offline is not None)
            processor = tf.BlipImageProcessor.from_pretrained(source, local_files_only=offline is not None)
    except Exception as e:  # hub and file errors come in many types; all mean "not here"
        reason = offline or (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise RerankerError(
            f"BLIP-ITM {name} is not in the local Hugging Face cache and cannot be loaded: {reason}",
            hint=f'on a machine with network run `python -c "from transformers import BlipForImageTextRetrieval, '
            f"BlipProcessor as P; BlipForImageTextRetrieval.from_pretrained('{name}'); P.from_pretrained('{name}')\"` "
            "(copy the hub cache over), or pass a local folder saved with save_pretrained to --rerank-model",
        ) from e
    return BlipItmReranker(name, model.to(device).eval(), tokenizer, processor, device)


def _build_random(name: str, device: str) -> BlipItmReranker:
    import torch

    tf = _transformers()
    local = Path(name).expanduser()
    try:
        config = tf.BlipConfig.from_pretrained(str(local) if local.is_dir() else name, local_files_only=True)
    except Exception:  # no cached config: BLIP base (ViT-B/16 at 384 px, BERT-base text), as blip-itm-base-coco
        config = tf.BlipConfig()
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(RANDOM_SEED)
        model = tf.BlipForImageTextRetrieval(config)
    size = int(config.vision_config.image_size)
    processor = tf.BlipImageProcessor(size={"height": size, "width": size})
    tokenizer = stand_in_tokenizer(int(config.text_config.vocab_size))
    return BlipItmReranker(f"{name} (random weights)", model.to(device).eval(), tokenizer, processor, device, True)


def stand_in_tokenizer(vocab_size: int, folder: str | os.PathLike[str] | None = None) -> Any:
    """A BERT WordPiece tokenizer over a generated vocabulary (special tokens, characters, ``##`` suffixes), for
    random-weight BLIP models and tests: offline, no hub. Not BLIP's real vocabulary."""
    import tempfile

    tf = _transformers()
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    if vocab_size < len(vocab):
        raise UsageError(f"a stand-in tokenizer needs a vocabulary of >= {len(vocab)}, the model has {vocab_size}")
    with contextlib.ExitStack() as stack:
        where = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        where.mkdir(parents=True, exist_ok=True)
        (where / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return tf.BertTokenizerFast(vocab_file=str(where / "vocab.txt"), do_lower_case=True)


@contextlib.contextmanager
def _quiet() -> Any:
    """transformers warns about unused weights and random init on loggers; cocatk reports random weights itself."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    hf_logging = _transformers().utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars on stderr: the CLI reports its own progress
    try:
        yield
    finally:
        logging.disable(previous)
        if bars:
            hf_logging.enable_progress_bar()
