"""A text tower without torch, for cold text queries: open_clip's text tower exported to ONNX, run by ONNX Runtime.

A text-only ``cocatk search`` used to spend ~5 of its ~6 seconds importing torch and open_clip on a 2-core CPU; the
text tower itself takes ~60 ms (benchmarks/RESULTS.md section 5). So a process that already holds the model
(``cocatk index``, or a search that had to load torch) exports the text tower once per model identity, and a later
cold text query loads only numpy, ONNX Runtime and Hugging Face ``tokenizers``: the approach of rclip, which ships
its towers as ONNX files.

What is exported and checked:
    * the graph: token ids (N, context_length) int64 -> L2-normalised float32 embeddings (N, D), traced in fp32 from
      the same modules :meth:`cocatk.models.ClipModel.encode_texts` runs;
    * the tokenizer: open_clip's own BPE tables (``SimpleTokenizer``'s vocabulary and merge ranks) rebuilt as a
      ``tokenizers`` BPE with CLIP's pre-tokenising pattern; the text cleaning (ftfy, HTML entities, whitespace,
      lower case) runs here in Python, as open_clip does;
    * both against open_clip on :data:`PROBES` before anything is kept: equal token ids, and embeddings within
      :data:`MAX_ABS_DIFF` of torch's. A model whose tokenizer is not open_clip's BPE (SigLIP's and other hub
      tokenizers) is not exported; its queries keep the torch path.

Cache: ``$COCATK_CACHE/text-onnx/<key>/`` holding ``text.onnx`` (graph), ``text.onnx.data`` (weights, memory-mapped
by ONNX Runtime), ``tokenizer.json`` and ``meta.json``. The key hashes the model identity an index records (name,
architecture, weights id) with the export format and open_clip's version. The folder is written under a temporary
name and renamed into place, so a reader sees all of it or nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import config

if TYPE_CHECKING:  # pragma: no cover
    from .models import ClipModel

#: Bumped when the files or their meaning change: older exports are then ignored, re-made, and removed once the new
#: one is written. 3: CoCa's graph also returns the token embeddings, and the decoder is exported beside it; 4: the
#: image tower beside them; 5: a bf16 model's image tower is exported in float32 (format 4 recorded image_error).
FORMAT = 5
GRAPH, WEIGHTS, TOKENIZER, META = "text.onnx", "text.onnx.data", "tokenizer.json", "meta.json"
#: Largest |difference| allowed between an ONNX and a torch fp32 embedding component at export (measured 1.6e-7 on
#: coca_ViT-B-32 and 9e-8 on the demo model: the same float32 arithmetic in another order).
MAX_ABS_DIFF = 1e-4
#: CLIP's pre-tokenising pattern after the special tokens (open_clip ``SimpleTokenizer.pat``), run by the same
#: ``regex`` module with the same flags: the special tokens are words only where open_clip's scan meets them (a
#: symbol just before ``<end_of_text>`` swallows its ``<``, as in open_clip), which an added-token pass would not
#: reproduce.
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
#: Texts whose token ids and embeddings must match open_clip's at export: cleaning (entities, ftfy, whitespace,
#: case), the pattern's classes (contractions, digits, punctuation runs, letters of other scripts), bytes outside
#: the BPE's words (emoji), special tokens typed as text, and truncation at the context length.
PROBES: tuple[str, ...] = (
    "a red bicycle",
    "A photo of a DOG.",
    "two dogs playing in the snow at night",
    "it's a cat's toy, isn't it? we'll see; they'd've",
    "route 66 in 1999: 3.14159 km/h!!! (approx.)",
    "  tabs\tand\nnewlines   and  spaces  ",
    "fish &amp; chips &amp;amp; more &lt;b&gt;",
    "Café naïve façade Ünïcödé résumé",
    "東京の夜景 и москва ночью, قطة",
    "a dog 🐕 and a cat 🐈‍⬛ with ❤️",
    "â€™mojibake â€œquotesâ€\x9d",
    "<start_of_text> typed <end_of_text> tokens",
    "---///***+++===",
    "word " * 100,
    "x",
)


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
        from .errors import UsageError

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
        from .errors import UsageError

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
        in float32 (:mod:`cocatk.imageonnx`)."""
        from .imageonnx import ImageOnnx

        if self._image is None:
            self._image = ImageOnnx(self.folder, self.meta["image"])
        return self._image.encode_images(images)

    def decoder(self) -> Any:
        """The decoder graph (:class:`cocatk.decoderonnx.DecoderOnnx`), opened on first use."""
        from .decoderonnx import DecoderOnnx

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
        from .errors import ExportError, ExportUnreadableError

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
                from .decoderonnx import session_options

                # One thread, like torch's text queries: a query is ~60 ms, and a second spinning thread beside
                # another program costs far more than it gains (benchmarks/RESULTS.md section 5.1). No weight
                # pre-packing: the session opens in 0.18 s instead of 0.38 s (coca_ViT-B-32) for 25 ms more per query
                # (0.11 s against 0.085 s), a gain for the cold query this path exists for.
                opts = session_options(ort, threads=1)
                try:
                    tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER))
                    specials = "|".join(regex.escape(t) for t in self.meta["specials"])
                    pattern = regex.compile(f"{specials}|{_PATTERN}", regex.IGNORECASE)
                    session = ort.InferenceSession(str(self.folder / GRAPH), opts, providers=["CPUExecutionProvider"])
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


def available() -> bool:
    """True when ONNX Runtime and ``tokenizers`` can be imported (the query side's packages)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "tokenizers"))


def cache_folder(identity: dict[str, str]) -> Path:
    """Where the export of the model with this identity (as an index manifest records it) lives."""
    oc = _package_version("open_clip_torch")
    blob = json.dumps({"identity": identity, "format": FORMAT, "open_clip": oc}, sort_keys=True)
    return config.cache_dir() / "text-onnx" / hashlib.sha256(blob.encode()).hexdigest()[:24]


def read_meta(identity: dict[str, str]) -> dict[str, Any] | None:
    """The cache's record for ``identity``: an export (``error`` absent), a model that cannot be exported (``error``
    says why; it is not tried again), or None when no export was tried."""
    try:
        meta = json.loads((cache_folder(identity) / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("identity") != identity:
        return None
    return meta


def open_text_onnx(identity: dict[str, str]) -> TextOnnx | None:
    """The exported text tower of the model with ``identity``, or None when there is none (not exported yet, a model
    that cannot be) or ONNX Runtime is not installed. Nothing heavy is loaded until the first query."""
    meta = read_meta(identity)
    if meta is None or "error" in meta or not available():
        return None
    return TextOnnx(cache_folder(identity), meta)


def describe(identity: dict[str, str]) -> dict[str, Any]:
    """What embeds a cold text query of the model with ``identity``, for ``cocatk info``: ``backend``
    (``onnxruntime`` or ``torch``), and ``export`` (the folder) or ``why`` torch; for a CoCa export, ``rerank``: what
    runs the rerank from cached tokens (the same keys)."""
    meta = read_meta(identity)
    if meta is None:
        why = "not exported yet (the next `cocatk index` run exports it)"
        if not config.text_onnx_enabled():
            why = "export switched off ($COCATK_TEXT_ONNX=0)"
        return {"backend": "torch", "why": why}
    if "error" in meta:
        return {"backend": "torch", "why": f"cannot be exported: {meta['error']}"}
    if not available():
        return {"backend": "torch", "why": "onnxruntime or tokenizers is not installed"}
    out = {"backend": "onnxruntime", "export": str(cache_folder(identity)), "max_abs_diff": meta.get("max_abs_diff")}
    out["images"] = (
        {"backend": "onnxruntime", "max_abs_diff": meta["image"].get("max_abs_diff")}
        if "image" in meta
        else {"backend": "torch", "why": meta.get("image_error", "no image tower in this export")}
    )
    if "decoder" in meta:  # the rerank from cached tokens runs there too
        out["rerank"] = {"backend": "onnxruntime", "max_nats_per_token": meta["decoder"].get("max_nats_per_token")}
    elif meta.get("info", {}).get("kind") == "coca":
        out["rerank"] = {"backend": "torch", "why": meta.get("decoder_error", "no decoder in this export")}
    return out


def needs_export(identity: dict[str, str]) -> bool:
    """True when no export of ``identity`` was tried, or a failed one was made with other package versions (torch,
    onnx, ONNX Runtime, tokenizers: a newer one may succeed)."""
    meta = read_meta(identity)
    return meta is None or ("error" in meta and meta.get("versions") != _versions())


def _versions() -> dict[str, str]:
    return {name: _package_version(name) for name in ("torch", "onnx", "onnxruntime", "tokenizers")}


@functools.cache
def _package_version(name: str) -> str:
    """An installed distribution's version, or ``"absent"``; read once per process (~7 ms each: a search's cache
    lookup asks for open_clip's twice)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def export_text_onnx(model: ClipModel, identity: dict[str, str] | None = None) -> Path | None:
    """Export ``model``'s text tower and tokenizer to the cache (see the module docstring), once per identity.

    A model that cannot be exported faithfully (a tokenizer other than open_clip's BPE, an op the exporter lacks, a
    mismatch on :data:`PROBES`) is recorded as such with the package versions, so no later run pays for trying
    again until one of them changes. The export traces and checks a float32 CPU copy when the model sits on a GPU.

    Args:
        identity: the identity an index recorded for this model (default the model's own). When the model's differs
            (a weights file changed since the index was built), nothing is exported.

    Returns:
        The cache folder, or None when the model cannot be exported (now or on an earlier try).

    Raises:
        ExportError: the export failed (recorded when it is the model's doing, see above), or it cannot be written
            (disk full, read-only cache: not recorded, tried again next time).
    """
    from .errors import ExportError, ExportMismatchError

    own = model.spec.identity()
    if identity is not None and identity != own:
        raise ExportError(
            f"the weights of {own.get('model')} changed since the index was built ({identity.get('weights')} then, "
            f"{own.get('weights')} now)",
            hint="rebuild the index with `cocatk index --rebuild`, or restore the weights file",
        )
    folder = cache_folder(own)
    if not needs_export(own):
        meta = read_meta(own)
        return None if meta is None or "error" in meta else folder
    tok = model.tokenizer
    if (
        type(tok).__name__ != "SimpleTokenizer"
        or getattr(tok, "reduction_fn", None) is not None
        or getattr(getattr(tok, "clean_fn", None), "__name__", "") != "_clean_lower"
    ):
        _record_failure(folder, own, f"tokenizer {type(tok).__name__} is not open_clip's lower-case BPE")
        return None
    started = time.perf_counter()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _sweep(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise _write_error(folder, e) from e
    try:
        latent, module, device = _fp32_cpu_text(model)
        try:
            _write_graph(latent, module, model.tokenize(list(PROBES[:2])), tmp, model.has_decoder)
            _build_tokenizer(tok).save(str(tmp / TOKENIZER))
        except OSError:
            raise
        except Exception as e:  # the exporter's and onnx's own errors: an op without ONNX form, a graph too big
            reason = f"the ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            _record_failure(folder, own, reason)
            hint = "text queries keep the torch path; report this with `cocatk info --json`"
            raise ExportError(reason, hint=hint) from e
        meta = {
            "format": FORMAT,
            "identity": own,
            "info": {k: v for k, v in model.info().items() if k not in ("device", "precision")},
            "notices": model.notices(),
            "embed_dim": model.embed_dim,
            "context_length": model.context_length,
            "sot": int(tok.sot_token_id),
            "eot": int(tok.eot_token_id),
            "specials": _specials(tok),
            "traced_on": device,
            "versions": _versions(),
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            max_diff = _verify(model, latent, TextOnnx(tmp, meta).load())
        except ExportMismatchError as e:  # the model's doing (a session that cannot load is the environment's)
            _record_failure(folder, own, e.message)
            raise
        meta.update(max_abs_diff=max_diff, text_seconds=round(time.perf_counter() - started, 2))
        if model.has_decoder:
            _add_decoder(model, module, tmp, meta)
        _add_image_tower(model, module, tmp, meta)
        meta.update(export_seconds=round(time.perf_counter() - started, 2))
        meta["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _rename_into_place(tmp, folder)
    except OSError as e:
        raise _write_error(folder, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = read_meta(own)
    if done is not None and "error" not in done:
        remove_older_exports(own)
        return folder
    return None


def _add_decoder(model: ClipModel, module: Any, tmp: Path, meta: dict[str, Any]) -> None:
    """Export and check CoCa's decoder into ``tmp`` (:mod:`cocatk.decoderonnx`), recording the outcome in ``meta``:
    ``decoder`` (checked; its figures) or ``decoder_error`` (why not: the text tower is kept, the rerank stays
    torch's until a package version changes)."""
    from . import decoderonnx as dec

    t0 = time.perf_counter()
    try:
        tokens = dec.probe_tokens(model)
        ids = model.tokenize(list(dec.PROBES[1:2]))
        embs = module.text(ids)[1][:, :4].detach()
        dec.export_decoder(module.text_decoder, tmp, tokens[:2], embs)
    except OSError:
        raise
    except Exception as e:  # the exporter's own errors (an op without ONNX form, onnxscript missing)
        first = str(e).splitlines()[0][:160] if str(e) else ""
        meta["decoder_error"] = f"the ONNX export failed: {type(e).__name__}: {first}"
        for name in (dec.GRAPH, dec.WEIGHTS):
            (tmp / name).unlink(missing_ok=True)
        return
    meta["decoder"] = {
        "vocab": int(module.text_decoder.text_projection.shape[-1]),
        "token_shape": [int(tokens.shape[1]), int(tokens.shape[2])],
    }
    try:
        meta["decoder"]["max_nats_per_token"] = _verify_decoder(model, module, TextOnnx(tmp, meta), tokens)
    except Exception as e:  # a mismatch, or a graph ONNX Runtime cannot run
        del meta["decoder"]
        meta["decoder_error"] = str(getattr(e, "message", e)).splitlines()[0][:200]
        for name in (dec.GRAPH, dec.WEIGHTS):
            (tmp / name).unlink(missing_ok=True)
        return
    meta["decoder"]["export_seconds"] = round(time.perf_counter() - t0, 2)


def _add_image_tower(model: ClipModel, module: Any, tmp: Path, meta: dict[str, Any]) -> None:
    """Export and check the image tower into ``tmp`` (:mod:`cocatk.imageonnx`), recording ``image`` (checked) or
    ``image_error`` (why not: image queries keep torch) in ``meta``."""
    from . import imageonnx
    from .preprocess import describe as describe_transform

    t0 = time.perf_counter()
    spec = describe_transform(model.preprocess)
    if spec is None:
        meta["image_error"] = "its preprocessing is not open_clip's standard transform"
        return
    info = {"preprocess": spec, "embed_dim": int(model.embed_dim)}
    try:
        module = imageonnx.fp32_image_module(module)
        example = imageonnx.ImageOnnx(tmp, info).pixels(imageonnx.probe_images(int(model.image_size))[:2])
        imageonnx.export_image_tower(module, spec, tmp, example)
        info["max_abs_diff"] = imageonnx.verify(model, module, imageonnx.ImageOnnx(tmp, info))
    except OSError:
        raise
    except Exception as e:  # the exporter's errors, a mismatch, a graph ONNX Runtime cannot run
        first = str(getattr(e, "message", e)).splitlines()[0][:160] if str(e) else type(e).__name__
        meta["image_error"] = f"{type(e).__name__}: {first}"
        for name in (imageonnx.GRAPH, imageonnx.WEIGHTS):
            (tmp / name).unlink(missing_ok=True)
        return
    info["export_seconds"] = round(time.perf_counter() - t0, 2)
    meta["image"] = info


def _verify_decoder(model: ClipModel, module: Any, onnx_model: TextOnnx, tokens: Any) -> float:
    """Score :data:`cocatk.decoderonnx.PROBES` against the probe images' tokens through the whole ONNX path
    (tokenizer, text graph, decoder graph) and through open_clip's own decoder forward in float32 (trimmed ids, as
    torch's rerank runs them); the largest difference per scored token.

    Raises:
        ExportMismatchError: a difference over :data:`cocatk.decoderonnx.MAX_NATS_PER_TOKEN`.
    """
    import torch

    from . import decoderonnx as dec
    from .errors import ExportMismatchError

    worst = 0.0
    for text in dec.PROBES:
        ids = model._caption_ids(text).cpu()  # noqa: SLF001 - the model's own trimming is the reference's
        with torch.inference_mode():
            embs = module.text(ids)[1][:, :-1]
        ref = dec.reference_loglik(module.text_decoder, embs, ids[:, 1:], tokens)
        whole, alone = (
            onnx_model.caption_loglik(text, tokens.numpy()),
            onnx_model.caption_loglik(text, tokens[:1].numpy()),
        )
        for got in (whole, alone):
            worst = max(worst, float(np.abs(got - ref[: len(got)]).max()) / (ids.shape[1] - 1))
    if not worst <= dec.MAX_NATS_PER_TOKEN:
        raise ExportMismatchError(
            f"the ONNX decoder differs from torch's by {worst:.2e} nats per token "
            f"(allowed {dec.MAX_NATS_PER_TOKEN:.0e})",
            hint="the rerank keeps the torch path; report this with `cocatk info --json`",
        )
    return worst


def remove_older_exports(identity: dict[str, str]) -> list[Path]:
    """Delete the exports of the model ``identity`` other than the current one (an older format or open_clip
    version: an upgrade would otherwise leave ~250 MB per model behind); the folders removed."""
    current = cache_folder(identity)
    removed = []
    for meta_file in current.parent.glob(f"*/{META}"):
        folder = meta_file.parent
        if folder == current:
            continue
        try:
            other = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(other, dict) and other.get("identity") == identity:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _fp32_cpu_text(model: ClipModel) -> tuple[Any, Any, str]:
    """``ids -> unnormalised latent`` from float32 modules on the CPU (what ONNX Runtime will run), the open_clip
    module holding their weights, and where the model sits. A model on a GPU is copied to the CPU for the export
    (once per model; the copy is dropped after)."""
    import copy

    if model.device.startswith("cpu"):
        return model.fp32_text_latent, model.model, model.device
    module = copy.deepcopy(model.model).float().cpu()
    return (lambda ids: model.fp32_text_latent(ids, module=module)), module, model.device


def _record_failure(folder: Path, identity: dict[str, str], reason: str) -> None:
    _publish(folder, {"format": FORMAT, "identity": identity, "error": reason, "versions": _versions()})


#: A temporary export folder older than this is a killed export's: swept at the next export.
_STALE_SECONDS = 3600


def _sweep(parent: Path) -> None:
    """Remove temporary folders (``.<key>-*``) that killed exports left behind."""
    now = time.time()
    for p in parent.glob(".*-*"):
        with contextlib.suppress(OSError):
            if p.is_dir() and now - p.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)


def _publish(folder: Path, meta: dict[str, Any]) -> None:
    """Write a folder holding only ``meta`` (a model that cannot be exported), atomically; best effort."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            (tmp / META).write_text(json.dumps(meta, indent=1))
            _rename_into_place(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # not recorded: the next run tries again


def _rename_into_place(tmp: Path, folder: Path) -> None:
    """Move the finished ``tmp`` to ``folder``. A folder already there is replaced when it holds no valid record (a
    hand edit, a crash of older code) or a failure record while ``tmp`` holds an export; a valid export there
    (another process won) is kept."""
    mine = json.loads((tmp / META).read_text())
    there = read_meta(mine["identity"])
    if folder.exists() and (there is None or ("error" in there and "error" not in mine)):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if read_meta(mine["identity"]) is None:  # not another exporter's finished folder: a real failure
            raise


def _write_error(folder: Path, e: OSError) -> Exception:
    from .errors import ExportError

    return ExportError(
        f"cannot write the ONNX text tower under {folder.parent}: {e.strerror or e}",
        hint="free disk space or point $COCATK_CACHE at a writable folder",
    )


def remove_export(identity: dict[str, str]) -> bool:
    """Delete the export of ``identity`` (best effort: another process may be doing the same); True when it is
    gone."""
    folder = cache_folder(identity)
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def _write_graph(latent: Any, module: Any, ids: Any, folder: Path, tokens: bool = False) -> None:
    """Trace ``ids -> normalize(latent(ids))`` (float32, CPU; ``module`` holds the weights) to ``folder``/text.onnx,
    weights in text.onnx.data. With ``tokens`` (CoCa) the graph also returns the text tower's token embeddings
    ``token_embs`` (N, context, D), the decoder's input."""
    import onnx
    import torch

    class _Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module  # registered, so the exporter sees the weights as initialisers, not constants

        def forward(self, x: torch.Tensor) -> Any:
            if tokens:  # CoCa's text tower returns (latent, token embeddings); causal: a position sees no padding
                lat, embs = module.text(x)
                return torch.nn.functional.normalize(lat.float(), dim=-1), embs.float()
            return torch.nn.functional.normalize(latent(x).float(), dim=-1)

    trace = folder / "trace"  # the exporter may write side files of its own (towers over 2 GB): all dropped below
    trace.mkdir()
    single = trace / "single.onnx"
    # Without nn.MultiheadAttention's fused inference fast path (a tower without a mask takes it under no_grad):
    # ONNX has no op for it. The switch is process-wide; it is restored at once and changes speed only.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _stderr_to_devnull():
            # The tracer's warnings are about shapes the graph keeps dynamic; one comes from C++ straight to fd 2.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Tower().eval(), (ids,), str(single), input_names=["ids"],
                output_names=["emb", "token_embs"] if tokens else ["emb"], opset_version=17, dynamo=False,
                dynamic_axes={"ids": {0: "n"}, "emb": {0: "n"}, **({"token_embs": {0: "n"}} if tokens else {})},
            )  # fmt: skip
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    graph = onnx.load(str(single))
    # Weights in one side file: ONNX Runtime maps it, so a cold query starts in ~0.35 s instead of ~0.65 s
    # parsing a 250 MB protobuf (coca_ViT-B-32).
    onnx.save_model(graph, str(folder / GRAPH), save_as_external_data=True, location=WEIGHTS, size_threshold=1024)
    shutil.rmtree(trace)


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the block (C++ writes there directly)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _build_tokenizer(tok: Any) -> Any:
    """open_clip's ``SimpleTokenizer`` as a ``tokenizers`` BPE (same vocabulary, merge ranks and pattern)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    bpe = models.BPE(vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>", fuse_unk=False)
    out = Tokenizer(bpe)
    # Words come split by open_clip's pattern (TextOnnx.tokenize): here only bytes -> BPE symbols, as open_clip's
    # byte encoder. A special token arrives as a whole word and is matched as one.
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out.decoder = decoders.ByteLevel()
    out.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in _specials(tok)])
    return out


def _specials(tok: Any) -> list[str]:
    return [tok.decoder[i] for i in tok.all_special_ids]


def _verify(model: ClipModel, latent: Any, onnx_model: TextOnnx) -> float:
    """Check the export against open_clip on :data:`PROBES` (as one batch, and the first alone, as a query runs); the
    largest embedding difference.

    Raises:
        ExportMismatchError: other token ids, or embeddings further than :data:`MAX_ABS_DIFF` from torch's.
    """
    import torch

    from .errors import ExportMismatchError

    ref_ids = np.asarray(model.tokenize(list(PROBES)))
    ids = onnx_model.tokenize(PROBES)
    bad = [p for p, a, b in zip(PROBES, ref_ids, ids, strict=True) if not np.array_equal(a, b)]
    if bad:
        raise ExportMismatchError(
            f"the rebuilt tokenizer differs from open_clip's on {bad[0][:40]!r}",
            hint="text queries keep the torch path; report this with `cocatk info --json`",
        )
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(latent(torch.from_numpy(ref_ids)).float(), dim=-1).numpy()
    got = np.concatenate([onnx_model.encode_texts(list(PROBES)), onnx_model.encode_texts(list(PROBES[:1]))])
    diff = float(np.abs(np.concatenate([ref, ref[:1]]) - got).max())
    if not diff <= MAX_ABS_DIFF:
        raise ExportMismatchError(
            f"the ONNX text tower differs from torch's by {diff:.2e} (allowed {MAX_ABS_DIFF:.0e})",
            hint="text queries keep the torch path; report this with `cocatk info --json`",
        )
    return diff
