"""The exported text tower at query time: :class:`TextOnnx` tokenises with open_clip's BPE rebuilt in
``tokenizers``, runs the graph in ONNX Runtime, and opens the decoder and the image tower exported beside it.
"""

from __future__ import annotations

import html
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cache

if TYPE_CHECKING:  # pragma: no cover
    pass


#: CLIP's pre-tokenising pattern after the special tokens (open_clip ``SimpleTokenizer.pat``), run by the same
#: ``regex`` module with the same flags: the special tokens are words only where open_clip's scan meets them (a
#: symbol just before ``<end_of_text>`` swallows its ``<``, as in open_clip), which an added-token pass would not
#: reproduce.
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TextOnnx:
    """An exported text tower: tokenise, run, normalise; no torch. Open with :func:`open_text_onnx`.

    It stands in for the model in a text-only search: :meth:`encode_texts`, :meth:`info` and :meth:`notices` answer
    as :class:`cocatk.models.ClipModel`'s do (embeddings equal to torch fp32's within :data:`MAX_ABS_DIFF`).
    """

    backend = "onnxruntime"
    device = "cpu"
    precision = "fp32"

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self._session: Any = None
        self._tokenizer: Any = None
        self._pattern: Any = None
        self._lock = threading.Lock()
        self._last: tuple[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]] | None = None
        self._decoder: Any = None
        self._image: Any = None

    # ---- facts ---------------------------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def image_size(self) -> int:
        return int(self.meta["info"]["image_size"])

    @property
    def context_length(self) -> int:
        return int(self.meta["context_length"])

    @property
    def kind(self) -> str:
        return str(self.meta["info"]["kind"])

    @property
    def has_decoder(self) -> bool:
        return self.kind == "coca"

    def info(self) -> dict[str, Any]:
        """As :meth:`cocatk.models.ClipModel.info`, plus ``backend``."""
        return {**self.meta["info"], "device": self.device, "precision": self.precision, "backend": self.backend}

    def notices(self) -> list[str]:
        return list(self.meta.get("notices", []))

    # ---- work ----------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Token ids (N, context_length) int64, equal to open_clip's tokenizer: [SOT, words..., EOT], truncated
        with the EOT kept last, padded with 0."""
        tok, pattern = self._load()[1:]
        sot, eot, ctx = int(self.meta["sot"]), int(self.meta["eot"]), self.context_length
        words = [pattern.findall(clean_text(t)) or [""] for t in texts]
        encoded = tok.encode_batch(words, is_pretokenized=True, add_special_tokens=False)
        out = np.zeros((len(texts), ctx), np.int64)
        for row, enc in zip(out, encoded, strict=True):
            ids = [sot, *enc.ids, eot]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = eot
            row[: len(ids)] = ids
        return out

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D), as :meth:`cocatk.models.ClipModel.encode_texts`."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 1:
            return self._one_text(texts[0])[0][None].copy()
        session = self._load()[0]
        out = [
            session.run(["emb"], {"ids": self.tokenize(texts[i : i + batch_size])})[0]
            for i in range(0, len(texts), batch_size)
        ]
        if not out:
            return np.zeros((0, self.embed_dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def _one_text(self, text: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """(embedding (D,), token embeddings (context, D) or None without a decoder, ids (context,)) of one text;
        the last text's are kept, so a search's stage 1 and rerank run the text tower once."""
        if self._last is not None and self._last[0] == text:
            return self._last[1]
        ids = self.tokenize([text])
        outs = self._load()[0].run(None, {"ids": ids})
        result = (outs[0][0], outs[1][0] if len(outs) > 1 else None, ids[0])
        self._last = (text, result)
        return result

    # ---- the decoder (CoCa): caption log-likelihood from cached image tokens ---------------------------------
    @property
    def can_rerank(self) -> bool:
        """True when the decoder was exported (and checked) beside the text tower."""
        return self.has_decoder and "decoder" in self.meta

    def caption_ids(self, text: str) -> np.ndarray:
        """[SOT, words..., EOT] (L+1,) int64, as :meth:`cocatk.models.CocaModel._caption_ids`: cut after the first
        EOT (id 0 is the real token '!').

        Raises:
            UsageError: an empty text.
        """
        from ...errors import UsageError

        if not text or not text.strip():
            raise UsageError("empty query text", hint="pass a non-empty text to score")
        ids = self._one_text(text)[2]
        ends = np.flatnonzero(ids == int(self.meta["eot"]))
        return ids[: int(ends[0]) + 1 if len(ends) else len(ids)]

    def caption_token_count(self, text: str) -> int:
        """How many tokens :meth:`caption_loglik` scores for ``text``: its words plus the EOT."""
        return len(self.caption_ids(text)) - 1

    def caption_loglik(self, text: str, image_tokens: Any) -> np.ndarray:
        """log p(text | image) for one text against K images' decoder tokens (K, T, D) (a numpy array or a CPU
        tensor; float16 as cached), as :meth:`cocatk.models.CocaModel.caption_loglik` computes it in float32.

        Returns:
            float64 (K,) summed log-probabilities (nats).

        Raises:
            UsageError: an empty text, or tokens of another shape than the model's.
            ExportUnreadableError: the decoder graph cannot be loaded.
        """
        from ...errors import UsageError

        tokens = np.asarray(image_tokens)
        shape = tuple(self.meta["decoder"]["token_shape"])
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != shape:
            raise UsageError(
                f"expected image tokens of shape (K, {shape[0]}, {shape[1]}), got {tuple(tokens.shape)}",
                hint="pass the decoder tokens of this model (an index's token cache)",
            )
        ids = self.caption_ids(text)
        steps = len(ids) - 1
        token_embs = self._one_text(text)[1]
        assert token_embs is not None  # can_rerank: the graph returns them
        embs = token_embs[None, :steps]
        return self.decoder().loglik(embs, ids[None, 1:], tokens)

    # ---- the image tower: cold image queries ----------------------------------------------------------------
    @property
    def can_embed_images(self) -> bool:
        """True when the image tower was exported (and checked) beside the text tower."""
        return "image" in self.meta

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of PIL images, as :meth:`cocatk.models.ClipModel.encode_images`
        in float32 (:mod:`cocatk.models.onnx.image`)."""
        from .image import ImageOnnx

        if self._image is None:
            self._image = ImageOnnx(self.folder, self.meta["image"])
        return self._image.encode_images(images)

    def decoder(self) -> Any:
        """The decoder graph (:class:`cocatk.models.onnx.decoder.DecoderOnnx`), opened on first use."""
        from .decoder import DecoderOnnx

        if self._decoder is None:
            self._decoder = DecoderOnnx(self.folder, self.meta["decoder"])
        return self._decoder

    def load(self) -> TextOnnx:
        """Load the graph and the tokenizer now (else the first query does); returns self.

        Raises:
            ExportUnreadableError: the files cannot be loaded (truncated, edited, an ONNX Runtime too old for the
                graph). ExportError: ONNX Runtime or tokenizers cannot be imported.
        """
        self._load()
        return self

    def _load(self) -> tuple[Any, Any, Any]:
        from ...errors import ExportError, ExportUnreadableError

        with self._lock:
            if self._session is None:
                # As open_clip does: a later fork (a DataLoader, Ray) would otherwise warn about the Rust threads.
                os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
                try:
                    import onnxruntime as ort
                    import regex
                    from tokenizers import Tokenizer
                except Exception as e:  # installed but broken (an ABI mismatch, a missing shared library)
                    raise ExportError(
                        f"ONNX Runtime or tokenizers cannot be imported ({type(e).__name__}: {str(e)[:120]})",
                        hint="reinstall them (`pip install --force-reinstall onnxruntime tokenizers`), or use "
                        "--backend torch",
                    ) from e
                from .session import session_options

                # One thread, like torch's text queries: a query is ~60 ms, and a second spinning thread beside
                # another program costs far more than it gains (benchmarks/RESULTS.md section 5.1). No weight
                # pre-packing: the session opens in 0.18 s instead of 0.38 s (coca_ViT-B-32) for 25 ms more per query
                # (0.11 s against 0.085 s), a gain for the cold query this path exists for.
                opts = session_options(ort, threads=1)
                try:
                    tokenizer = Tokenizer.from_file(str(self.folder / cache.TOKENIZER))
                    specials = "|".join(regex.escape(t) for t in self.meta["specials"])
                    pattern = regex.compile(f"{specials}|{_PATTERN}", regex.IGNORECASE)
                    session = ort.InferenceSession(
                        str(self.folder / cache.GRAPH), opts, providers=["CPUExecutionProvider"]
                    )
                except Exception as e:  # ONNX Runtime and tokenizers raise their own types (protobuf, I/O, parse)
                    raise ExportUnreadableError(
                        f"the ONNX text tower in {self.folder} cannot be loaded ({str(e).splitlines()[0][:120]})",
                        hint=f"delete {self.folder}: the next `cocatk index` exports it again; or use --backend torch",
                    ) from e
                self._tokenizer, self._pattern, self._session = tokenizer, pattern, session
            return self._session, self._tokenizer, self._pattern


def clean_text(text: str) -> str:
    """open_clip's ``_clean_lower``: ftfy, HTML entities twice, whitespace collapsed, lower case.

    ftfy (0.1 s to import) runs only where it can change something: on printable ASCII without ``&`` it is the
    identity, and the two HTML passes too.
    """
    if not (text.isascii() and text.isprintable() and "&" not in text):
        import ftfy

        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.strip().split()).lower()


#: The engine opened last for each export folder, with the record it was opened from: a later query of the same
#: process reuses its loaded sessions (as the torch path reuses its loaded model) instead of paying the session
#: start again (0.2-0.5 s for coca_ViT-B-32's towers on a 2-core CPU). A new record (a re-export) replaces it.
_OPEN: dict[str, tuple[str, TextOnnx]] = {}
_OPEN_LOCK = threading.Lock()


def open_text_onnx(identity: dict[str, str]) -> TextOnnx | None:
    """The exported text tower of the model with ``identity``, or None when there is none (not exported yet, a model
    that cannot be) or ONNX Runtime is not installed. Nothing heavy is loaded until the first query; the same engine
    (and its loaded sessions) answers this process's later calls while the export's record stays the same."""
    meta = cache.read_meta(identity)
    if meta is None or "error" in meta or not cache.available():
        return None
    folder = cache.cache_folder(identity)
    record = json.dumps(meta, sort_keys=True)
    with _OPEN_LOCK:
        held = _OPEN.get(str(folder))
        if held is None or held[0] != record:
            held = _OPEN[str(folder)] = (record, TextOnnx(folder, meta))
    return held[1]


def forget_open_engines() -> None:
    """Drop the engines :func:`open_text_onnx` holds (their sessions close when nothing else refers to them)."""
    with _OPEN_LOCK:
        _OPEN.clear()
