"""Where and in what precision the torch runtime runs a model: device and ``--precision`` resolution, CPU bf16
support, the bf16 image-tower island, torch thread counts.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import config
from ..errors import (
    DeviceError,
    UsageError,
)

if TYPE_CHECKING:  # pragma: no cover
    pass


def resolve_device(device: str | None) -> str:
    import torch

    device = device or config.default_device()
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "mps" or _CUDA.fullmatch(device)):
        raise UsageError(f"unknown device '{device}'", hint="use cpu, cuda, cuda:N (a GPU's number) or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was requested but no GPU is available", hint="use --device cpu")
        n = torch.cuda.device_count()
        if ":" in device and int(device.split(":")[1]) >= n:
            raise DeviceError(f"{device} was requested but this machine has {n} GPU(s)",
                              hint=f"use cuda:0 ... cuda:{n - 1}, or --device cpu")  # fmt: skip
    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS (an Apple GPU) was requested but is not available here", hint="use --device cpu")
    return device


_CUDA = re.compile(r"cuda(:[0-9]{1,3})?")


#: What ``--precision`` accepts; ``auto`` picks per device (see :func:`resolve_precision`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: ``auto`` keeps fp32 for an image tower smaller than this (parameters): bf16 weights were measured slower on the
#: 0.3 M ``demo`` tower (call overhead) and 3.3x faster on coca_ViT-B-32's 86 M (benchmarks/RESULTS.md).
BF16_MIN_TOWER_PARAMS = 10_000_000


def cpu_bf16_support() -> str | None:
    """How this CPU runs bf16 matrix products: ``"amx"`` (AMX tiles, Sapphire Rapids and later Xeons),
    ``"avx512_bf16"`` (dot-product instructions only: Cooper Lake, AMD Zen 4/5), or None (emulated in fp32)."""
    import torch

    cpu = getattr(torch, "cpu", None)

    def probe(name: str) -> bool:
        fn = getattr(cpu, name, None)
        try:
            return bool(fn()) if fn is not None else False
        except Exception:  # a private helper that changed: treat as unsupported
            return False

    if probe("_is_amx_tile_supported"):
        return "amx"
    if probe("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    return None


def resolve_precision(precision: str | None, device: str) -> tuple[str, str | None]:
    """The precision to run at on ``device`` and, when it is not what was asked for, why.

    - ``auto`` (the default): bf16 autocast on a GPU; on a CPU, bf16 weights for the towers where that was measured
      faster (a CPU with AMX; see :data:`BF16_MIN_TOWER_PARAMS` for the model size), fp32 elsewhere, with a notice.
    - ``fp32``, ``bf16``, ``fp16``: as asked (on a CPU, bf16 without native support runs emulated, with a notice).

    Returns:
        (precision, notice): precision is ``"fp32"``, ``"bf16"`` or ``"fp16"``; ``auto`` on a CPU returns
        ``"bf16"`` only as a candidate that :func:`load_model` confirms against the model's size.

    Raises:
        UsageError: an unknown precision, or fp16 on a CPU.
    """
    precision = precision or config.default_precision() or "auto"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'", hint=f"use one of: {', '.join(PRECISIONS)}")
    if not device.startswith("cpu"):
        return ("bf16" if precision == "auto" else precision), None
    if precision == "fp16":
        raise UsageError("fp16 is not supported on the CPU", hint="use --precision bf16, fp32 or auto")
    support = cpu_bf16_support()
    if precision == "auto":
        if support == "amx":
            return "bf16", None
        return "fp32", (
            "fp32: bf16 is used only on CPUs where it was measured faster (AMX, recent Xeons); this CPU has "
            f"{'avx512_bf16 without AMX' if support else 'no native bf16'} (--precision bf16 forces it)"
        )
    if precision == "bf16" and support is None:
        return "bf16", "bf16 on a CPU without native bf16 instructions is emulated and likely slower than fp32"
    return precision, None


#: :meth:`ClipModel.encode_texts` of this many texts or fewer on a CPU runs on one torch thread (queries).
FEW_TEXTS = 4


@contextlib.contextmanager
def torch_threads(n: int | None = None) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside (None: left as it is) and put back after, whatever the code
    inside set it to."""
    import torch

    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def bf16_island(module: Any) -> Any:
    """Store ``module``'s weights in bf16 behind a float32 interface: floating inputs are cast to bf16 on the way in
    and floating outputs (a tensor or a tuple of them) back to float32 on the way out, so its callers (open_clip's
    ``encode_image``, captioning, the Ray actors) need no change. Returns the module."""
    import torch

    def cast(value: Any, dtype: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v, dtype) for v in value)
        return value

    module.to(torch.bfloat16)
    module.register_forward_pre_hook(lambda _m, args: cast(args, torch.bfloat16))
    module.register_forward_hook(lambda _m, _args, out: cast(out, torch.float32))
    return module


def float32_copy(module: Any) -> Any:
    """A float32 deep copy of ``module``, without the casting hooks :func:`bf16_island` gave it (``module`` itself
    is left as it is): what an ONNX export of a bf16 tower on the CPU runs and is checked against."""
    import copy

    import torch

    clone = copy.deepcopy(module).to(torch.float32)
    for m in clone.modules():
        m._forward_pre_hooks.clear()
        m._forward_hooks.clear()
    return clone
