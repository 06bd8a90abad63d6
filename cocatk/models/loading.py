"""Loading a model for the torch runtime: build (or fetch from the process cache) the open_clip model of a
:class:`~cocatk.models.registry.ModelSpec`, read its checkpoint, wrap it in its family's class.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import config
from .._imports import ensure_open_clip_extras
from ..errors import (
    ModelConfigError,
    WeightsNotFoundError,
)
from .coca import CocaModel
from .dual import ClipModel
from .precision import BF16_MIN_TOWER_PARAMS, resolve_device, resolve_precision
from .registry import RANDOM_SEED, ModelSpec, fetch_tag_weights, resolve_model

if TYPE_CHECKING:  # pragma: no cover
    import torch


_CACHE: dict[tuple[str, str, str, str], ClipModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(
    name: str | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    precision: str | None = None,
) -> ClipModel:
    """Load a model (once per process: later calls with the same arguments return the same object).

    Args:
        name: preset (``coca-l14``, ``coca-b32``, ``coca-l14-coco``), open_clip architecture (CoCa, CLIP, SigLIP,
            EVA), or the path of an open_clip config JSON. None: ``$COCATK_MODEL``, else ``coca-l14`` on a CUDA GPU
            and ``coca-b32`` on the CPU (:func:`cocatk.config.default_model_choice`, for ``device``).
        pretrained: open_clip tag, local checkpoint path, or ``"none"`` for seeded random weights.
        device: ``cpu`` or ``cuda``; default cuda when available.
        precision: ``auto`` (default), ``fp32``, ``bf16`` or ``fp16`` (see :func:`resolve_precision`). On a GPU,
            bf16/fp16 are autocast and the weights stay fp32 (open_clip's ``precision="bf16"`` breaks CoCa's pooler
            and decoder). On a CPU, bf16 stores the image tower's weights in bf16 (oneDNN's AMX kernels; autocast was
            slower) and runs text queries and caption likelihood through bf16 copies of the text tower and decoder;
            the modules' inputs and outputs stay float32, and captioning keeps the fp32 modules.

    Returns:
        A :class:`CocaModel` for CoCa, a :class:`ClipModel` for a dual encoder (``kind`` "clip" or "siglip").

    Raises:
        UnknownModelError, WeightsNotFoundError, ModelConfigError, DeviceError.
    """
    spec = resolve_model(name, pretrained, device=device)
    dev = resolve_device(device)
    asked = precision or config.default_precision() or "auto"
    prec, notice = resolve_precision(asked, dev)
    key = (spec.arch, spec.pretrained, dev, asked)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = _build(spec, dev, prec, notice, auto=asked == "auto")
        return _CACHE[key]


def _create(spec: ModelSpec, device: str) -> tuple[Any, Any]:
    """open_clip's model of ``spec`` (no weights read) and its preprocessing with the weights' own settings."""
    import open_clip

    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.arch, pretrained=None, device=device, **_preprocess_kwargs(spec)
        )
    except Exception as e:
        raise ModelConfigError(
            f"cannot build {spec.arch}: {e}", hint="check the model config (see ../shared/COCA_NOTES.md rules)"
        ) from e
    return model, preprocess


def _preprocess_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The weights' own preprocessing (SigLIP: mean/std 0.5, squash resize; EVA, OpenAI CLIP: their own), as
    ``create_model_and_transforms`` overrides: open_clip applies it only when it loads a tag itself, and cocatk
    loads the file."""
    import open_clip

    pp_cfg = (open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}) if spec.weights_kind == "tag" else {}
    return {
        f"image_{k}": pp_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if pp_cfg.get(k) is not None
    }


def meta_model(name: str | None = None, pretrained: str | None = None) -> tuple[Any, Any, int]:
    """The open_clip model of ``name`` on the meta device (shapes, no weights), the preprocessing :func:`load_model`
    gives it (``ClipModel.preprocess``, the weights' own settings included) and its image size: ~0.1 s once
    open_clip is imported. For a driver that plans work which other processes encode (Ray's decode tasks get the
    preprocessing's description, :func:`cocatk.preprocess.describe`).

    Raises:
        UnknownModelError, ModelConfigError.
    """
    import open_clip
    import torch

    spec = resolve_model(name, pretrained)
    ensure_open_clip_extras(open_clip.get_model_config(spec.arch))
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "initialized randomly": no weights are wanted here
    try:
        # Parameters created on the meta device: their initialisation is skipped (1.5 s for coca_ViT-B-32 otherwise).
        with torch.device("meta"):
            model, preprocess = _create(spec, "meta")
    finally:
        logging.disable(previous)
    size = model.visual.image_size
    return model, preprocess, int(size[0] if isinstance(size, (tuple, list)) else size)


def _build(spec: ModelSpec, device: str, precision: str, notice: str | None = None, auto: bool = False) -> ClipModel:
    import open_clip
    import torch

    ensure_open_clip_extras(open_clip.get_model_config(spec.arch))
    kind = spec.weights_kind
    tokenizer = load_tokenizer(spec.arch)  # first: a SigLIP tokenizer missing offline fails before seconds of build
    weights = None
    if kind == "tag":
        weights = fetch_tag_weights(spec.arch, spec.pretrained)
    elif kind == "file":
        weights = spec.pretrained
    # A checkpoint replaces every parameter: build without initialising them and take the file's tensors (memory
    # mapped) as the parameters. open_clip's numpy checkpoints (big_vision .npz/.npy) keep its own loader.
    mapped = weights is not None and Path(weights).suffix not in (".npz", ".npy")

    # Build on the CPU under a fixed seed so random weights are identical in every process and on every device.
    # open_clip logs "initialized randomly" on the root logger; cocatk reports that itself (ClipModel.is_random).
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with contextlib.ExitStack() as stack:
        stack.callback(logging.disable, previous)
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(RANDOM_SEED)
        if mapped:
            stack.enter_context(_skip_param_init())
        model, preprocess = _create(spec, "cpu")
        if kind == "random" and spec.has_decoder:
            _init_decoder_projection(model)
    if weights is not None:
        try:
            if mapped:
                _load_checkpoint(model, weights)
            else:
                open_clip.load_checkpoint(model, weights, strict=True, weights_only=True)
        except Exception as e:
            raise ModelConfigError(
                f"checkpoint {weights} does not fit {spec.arch}: {str(e).splitlines()[0][:200]}",
                hint="pass the --model that the checkpoint was trained with",
            ) from e
    model = model.to(device).eval()
    if auto and device.startswith("cpu") and sum(p.numel() for p in model.visual.parameters()) < BF16_MIN_TOWER_PARAMS:
        # fp32 is the right choice for a tiny model on any CPU: no fallback, no notice (the demo model on every run).
        precision, notice = "fp32", None
    # On a CPU in bf16 the image tower becomes bf16 at its first use (ClipModel._image_tower_ready): a text-only
    # search never pays the cast (0.2-0.45 s of a cold `cocatk search` on 2 cores).
    cls = CocaModel if spec.has_decoder else ClipModel
    return cls(
        spec=spec,
        model=model,
        preprocess=preprocess,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        precision_notice=notice,
    )


def load_tokenizer(arch: str) -> Any:
    """open_clip's tokenizer of ``arch``; a one-line error when it must come from the hub and is not cached.

    CLIP, EVA and CoCa use open_clip's bundled BPE; SigLIP's (and other ``hf_tokenizer_name`` configs') comes from
    the Hugging Face hub through transformers, so it needs the network once or a warm cache.

    Raises:
        WeightsNotFoundError: the tokenizer is not cached and cannot be downloaded (or transformers is missing).
    """
    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.get_tokenizer(arch)
    except Exception as e:  # transformers' OSError offline, ImportError without transformers, fsspec's without aiohttp
        source = ((open_clip.get_model_config(arch) or {}).get("text_cfg") or {}).get("hf_tokenizer_name") or arch
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise WeightsNotFoundError(
            f"the tokenizer of {arch} ({source}) is not in the local Hugging Face cache and cannot be loaded: {reason}",
            hint=f"install transformers (`pip install 'cocatk[blip]'`) and, on a machine with network, run "
            f"`python -c \"import open_clip; open_clip.get_tokenizer('{arch}')\"` once (copy the hub cache over); "
            "CLIP, EVA and CoCa tokenizers ship with open_clip and work offline",
        ) from e
    finally:
        logging.disable(previous)


def _init_decoder_projection(model: Any) -> None:
    """open_clip leaves the decoder's output projection as ``torch.empty``; initialise it like its siblings."""
    import torch

    proj = model.text_decoder.text_projection
    width = proj.shape[0]
    with torch.no_grad():
        torch.nn.init.normal_(proj, std=width**-0.5)


#: In-place tensor methods that fill values: while a model is built for a checkpoint, they are skipped on parameters.
_FILL_METHODS = frozenset(
    {
        *("normal_", "uniform_", "fill_", "zero_", "copy_", "erfinv_", "mul_", "add_", "sub_", "div_", "clamp_"),
        *("clamp_min_", "clamp_max_", "exponential_", "log_normal_", "cauchy_", "geometric_", "random_"),
        *("bernoulli_", "masked_fill_", "index_fill_"),
    }
)


@functools.cache
def _skip_init_mode() -> type:
    import torch
    from torch.overrides import TorchFunctionMode

    class SkipParamInit(TorchFunctionMode):
        """Leaves parameters as allocated (``torch.empty``): ``torch.nn.init`` functions and value-filling in-place
        methods called on an ``nn.Parameter`` return it untouched. Buffers, plain tensors and everything else run as
        usual, so buffers that no checkpoint holds (attention masks) come out exactly as in a normal build."""

        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            # torch.nn.init's functions pass their tensor by keyword to this hook, Tensor methods as args[0]
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.nn.Parameter):
                name = getattr(func, "__name__", "")
                if name in _FILL_METHODS or (
                    getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_") and name[0] != "_"
                ):
                    return target
            return func(*args, **kwargs)

    return SkipParamInit


def _skip_param_init() -> Any:
    """A context (this thread only, like every torch function mode) in which building a model leaves its
    parameters uninitialised: 2.6 s -> 0.15 s for coca_ViT-B-32 on 2 cores. Only for a model whose every parameter a
    strict checkpoint load then replaces."""
    return _skip_init_mode()()


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """open_clip's ``load_state_dict`` (open_clip 3.3 ``factory.py``) with the file memory-mapped: safetensors'
    ``load_file`` maps it, ``torch.load(mmap=True, weights_only=True)`` maps a zip checkpoint (.bin, .pt); a
    legacy (pre-zip) ``torch.save`` file cannot be mapped and is read."""
    import torch

    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint: Any = load_file(path, device="cpu")
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = checkpoint["state_dict"] if isinstance(checkpoint, dict) and "state_dict" in checkpoint else checkpoint
    if next(iter(state_dict.items()))[0].startswith("module"):
        state_dict = {k[7:]: v for k, v in state_dict.items()}
    return state_dict


def _load_checkpoint(model: Any, path: str) -> None:
    """``open_clip.load_checkpoint(model, path, strict=True)`` without copies: the file's tensors become the
    parameters (``load_state_dict(assign=True)``), so a model built under :func:`_skip_param_init` is never filled
    twice and the weights are read once, lazily, through the memory map.

    The state dict gets open_clip 3.3's adjustments, in its order (third-party formats, the old text layout, scalar
    logit_scale/bias, position ids, resized position embeddings). A tensor whose dtype or layout differs from the
    model's is copied into the model's own tensor first, which is what the plain load does with every tensor: the
    parameters come out bit for bit the same (tests/test_cold_start.py). Mismatched keys and shapes raise
    load_state_dict's own error.
    """
    import torch
    from open_clip.factory import convert_state_dict, resize_pos_embed, resize_text_pos_embed
    from open_clip.model import convert_to_custom_text_state_dict

    sd = convert_state_dict(model, _read_state_dict(path))
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and model.logit_scale.ndim != sd["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    if "logit_bias" in sd and model.logit_bias.ndim != sd["logit_bias"].ndim:
        sd["logit_bias"] = sd["logit_bias"].reshape(model.logit_bias.shape)
    if "logit_bias" not in sd and model.logit_bias is not None:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    sd.pop("text.transformer.embeddings.position_ids", None)  # open_clip drops it for every model
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)

    own = model.state_dict(keep_vars=True)
    if len({id(t) for t in own.values()}) < len(own):  # tied weights: assigning would untie them
        model.load_state_dict(sd, strict=True)
        return
    with torch.no_grad():
        for key, value in sd.items():
            mine = own.get(key)
            if (
                isinstance(mine, torch.Tensor)
                and isinstance(value, torch.Tensor)
                and mine.shape == value.shape
                and (mine.dtype != value.dtype or mine.stride() != value.stride() or mine.device != value.device)
            ):
                sd[key] = mine.detach().copy_(value)
    model.load_state_dict(sd, strict=True, assign=True)
