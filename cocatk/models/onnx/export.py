"""Exporting a model for the ONNX Runtime: the text tower and tokenizer, then CoCa's decoder
(:mod:`.decoder`) and the image tower (:mod:`.image`), each checked against torch before the folder is published
(:mod:`.cache`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cache
from .text import TextOnnx

if TYPE_CHECKING:  # pragma: no cover
    from ..dual import ClipModel


#: Largest |difference| allowed between an ONNX and a torch fp32 embedding component at export (measured 1.6e-7 on
#: coca_ViT-B-32 and 9e-8 on the demo model: the same float32 arithmetic in another order).
MAX_ABS_DIFF = 1e-4

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
    from ...errors import ExportError, ExportMismatchError

    own = model.spec.identity()
    if identity is not None and identity != own:
        raise ExportError(
            f"the weights of {own.get('model')} changed since the index was built ({identity.get('weights')} then, "
            f"{own.get('weights')} now)",
            hint="rebuild the index with `cocatk index --rebuild`, or restore the weights file",
        )
    folder = cache.cache_folder(own)
    if not cache.needs_export(own):
        meta = cache.read_meta(own)
        return None if meta is None or "error" in meta else folder
    tok = model.tokenizer
    if (
        type(tok).__name__ != "SimpleTokenizer"
        or getattr(tok, "reduction_fn", None) is not None
        or getattr(getattr(tok, "clean_fn", None), "__name__", "") != "_clean_lower"
    ):
        cache.record_failure(folder, own, f"tokenizer {type(tok).__name__} is not open_clip's lower-case BPE")
        return None
    started = time.perf_counter()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        cache.sweep_stale(folder.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as e:
        raise cache.write_error(folder, e) from e
    try:
        latent, module, device = _fp32_cpu_text(model)
        try:
            _write_graph(latent, module, model.tokenize(list(PROBES[:2])), tmp, model.has_decoder)
            _build_tokenizer(tok).save(str(tmp / cache.TOKENIZER))
        except OSError:
            raise
        except Exception as e:  # the exporter's and onnx's own errors: an op without ONNX form, a graph too big
            reason = f"the ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            cache.record_failure(folder, own, reason)
            hint = "text queries keep the torch path; report this with `cocatk info --json`"
            raise ExportError(reason, hint=hint) from e
        meta = {
            "format": cache.FORMAT,
            "identity": own,
            "info": {k: v for k, v in model.info().items() if k not in ("device", "precision")},
            "notices": model.notices(),
            "embed_dim": model.embed_dim,
            "context_length": model.context_length,
            "sot": int(tok.sot_token_id),
            "eot": int(tok.eot_token_id),
            "specials": _specials(tok),
            "traced_on": device,
            "versions": cache.versions(),
        }
        (tmp / cache.META).write_text(json.dumps(meta, indent=1))
        try:
            max_diff = _verify(model, latent, TextOnnx(tmp, meta).load())
        except ExportMismatchError as e:  # the model's doing (a session that cannot load is the environment's)
            cache.record_failure(folder, own, e.message)
            raise
        meta.update(max_abs_diff=max_diff, text_seconds=round(time.perf_counter() - started, 2))
        if model.has_decoder:
            _add_decoder(model, module, tmp, meta)
        _add_image_tower(model, module, tmp, meta)
        meta.update(export_seconds=round(time.perf_counter() - started, 2))
        meta["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        (tmp / cache.META).write_text(json.dumps(meta, indent=1))
        cache.rename_into_place(tmp, folder)
    except OSError as e:
        raise cache.write_error(folder, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done = cache.read_meta(own)
    if done is not None and "error" not in done:
        cache.remove_older_exports(own)
        return folder
    return None


def _add_decoder(model: ClipModel, module: Any, tmp: Path, meta: dict[str, Any]) -> None:
    """Export and check CoCa's decoder into ``tmp`` (:mod:`.decoder`), recording the outcome in ``meta``: ``decoder``
    (checked; its figures) or ``decoder_error`` (why not: the text tower is kept, the rerank stays torch's until a
    package version changes)."""
    from . import decoder as dec

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
    """Export and check the image tower into ``tmp`` (:mod:`cocatk.models.onnx.image`), recording ``image`` (checked) or
    ``image_error`` (why not: image queries keep torch) in ``meta``."""
    from ...preprocess import describe as describe_transform
    from . import image as imageonnx

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
    """Score :data:`cocatk.models.onnx.decoder.PROBES` against the probe images' tokens through the whole ONNX path
    (tokenizer, text graph, decoder graph) and through open_clip's own decoder forward in float32 (trimmed ids, as
    torch's rerank runs them); the largest difference per scored token.

    Raises:
        ExportMismatchError: a difference over :data:`cocatk.models.onnx.decoder.MAX_NATS_PER_TOKEN`.
    """
    import torch

    from ...errors import ExportMismatchError
    from . import decoder as dec

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


def _fp32_cpu_text(model: ClipModel) -> tuple[Any, Any, str]:
    """``ids -> unnormalised latent`` from float32 modules on the CPU (what ONNX Runtime will run), the open_clip
    module holding their weights, and where the model sits. A model on a GPU is copied to the CPU for the export
    (once per model; the copy is dropped after)."""
    import copy

    if model.device.startswith("cpu"):
        return model.fp32_text_latent, model.model, model.device
    module = copy.deepcopy(model.model).float().cpu()
    return (lambda ids: model.fp32_text_latent(ids, module=module)), module, model.device


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
    onnx.save_model(
        graph, str(folder / cache.GRAPH), save_as_external_data=True, location=cache.WEIGHTS, size_threshold=1024
    )
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

    from ...errors import ExportMismatchError

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
