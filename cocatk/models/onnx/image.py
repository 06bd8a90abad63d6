"""The image tower without torch, for cold image queries: open_clip's image tower exported to ONNX beside the text
tower (:mod:`cocatk.models.onnx`, same cache folder and records), run by ONNX Runtime.

A cold ``cocatk search --image PHOTO`` spent ~2.7 of its ~3.3 s importing torch and open_clip and building the model
(benchmarks/RESULTS.md section 6.3); the image tower itself takes 0.1-0.4 s. So ``cocatk index`` exports the image
tower too, and a cold image query decodes the photo with PIL, resizes and crops it with
:func:`cocatk.preprocess.resize_crop` (uint8, bit-equal to open_clip's transform) and runs the graph, whose first
operations are the transform's arithmetic half (``/ 255``, ``- mean``, ``/ std`` in float32, in torchvision's order).

Checked at export: probe images (seeded noise, flat colours) through the whole ONNX path against torch's float32
``encode_image`` of open_clip's own transform, within :data:`MAX_ABS_DIFF`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .session import open_session

if TYPE_CHECKING:  # pragma: no cover
    pass


GRAPH, WEIGHTS = "image.onnx", "image.onnx.data"

#: Largest |ONNX - torch fp32| embedding component allowed at export.
MAX_ABS_DIFF = 1e-4


class ImageOnnx:
    """An exported image tower: PIL images in, L2-normalised float32 embeddings (N, D) out. Made by
    :meth:`cocatk.models.onnx.text.TextOnnx.image_tower`; nothing is loaded until the first call."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta  # {"preprocess": cocatk.preprocess.describe(...), ...}
        self._session: Any = None
        self._lock = threading.Lock()

    def pixels(self, images: Sequence[Any]) -> np.ndarray:
        """(N, S, S, 3) uint8: open_clip's resize and crop, without torch."""
        from ...preprocess import resize_crop

        spec = self.meta["preprocess"]
        return np.ascontiguousarray(np.stack([resize_crop(im, spec) for im in images]))

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings (N, D) of PIL images, as :meth:`cocatk.models.ClipModel.encode_images`
        in float32."""
        if not len(images):
            return np.zeros((0, int(self.meta["embed_dim"])), np.float32)
        return np.ascontiguousarray(self.load().run(None, {"pixels": self.pixels(images)})[0], dtype=np.float32)

    def load(self) -> Any:
        """The ONNX Runtime session (opened once).

        Raises:
            ExportUnreadableError: the graph cannot be loaded.
        """
        with self._lock:
            if self._session is None:
                self._session = open_session(self.folder / GRAPH, "image tower")
            return self._session


def export_image_tower(module: Any, spec: dict[str, Any], folder: Path, example: np.ndarray) -> None:
    """Write ``module``'s image tower (open_clip CLIP or CoCa, float32 on the CPU) with the transform's arithmetic
    half in front as ``folder``/image.onnx (weights in image.onnx.data): uint8 pixels (N, S, S, 3) -> L2-normalised
    float32 embeddings (N, D)."""
    import torch

    from .decoder import export_graph

    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)

    class _Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module  # registered: the weights are initialisers

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = pixels.permute(0, 3, 1, 2).to(torch.float32).div(255)
            x = (x - mean) / std
            return torch.nn.functional.normalize(self.model.encode_image(x, normalize=False).float(), dim=-1)

    export_graph(
        _Tower().eval(), (torch.from_numpy(example),), folder / GRAPH, WEIGHTS, input_names=["pixels"],
        output_names=["emb"], dynamic={"pixels": {0: "N"}},
    )  # fmt: skip


def fp32_image_module(module: Any) -> Any:
    """``module`` itself when its image tower is float32, else a shallow copy whose image tower is a float32 copy
    (:func:`cocatk.models.float32_copy`) and whose other towers are ``module``'s own: a model on the CPU in bf16
    exports and is checked in float32 (ONNX Runtime's CPU Conv takes no bfloat16)."""
    import copy

    import torch

    from ..precision import float32_copy

    if all(p.dtype == torch.float32 for p in module.visual.parameters()):
        return module
    clone = copy.deepcopy(module, memo={id(child): child for child in module.children()})
    clone.visual = float32_copy(module.visual)
    return clone


def probe_images(size: int) -> list[Any]:
    """Seeded noise at sizes the geometry treats differently, and a flat colour."""
    from PIL import Image

    rng = np.random.default_rng(1)
    shapes = [(size, size), (size + 37, size * 2), (size * 3, size + 5)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    return [*images, Image.new("RGB", (size, size), (200, 30, 30))]


def verify(model: Any, module: Any, tower: ImageOnnx) -> float:
    """The largest embedding difference between the whole ONNX path and torch's float32 ``encode_image`` of open_clip's
    own transform, on :func:`probe_images` (as one batch, and the first alone).

    Raises:
        ExportMismatchError: over :data:`MAX_ABS_DIFF`.
    """
    import torch

    from ...errors import ExportMismatchError

    images = probe_images(int(model.image_size))
    x = torch.stack([model.preprocess(im) for im in images])
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(module.encode_image(x, normalize=False).float(), dim=-1).numpy()
    got = np.concatenate([tower.encode_images(images), tower.encode_images(images[:1])])
    diff = float(np.abs(np.concatenate([ref, ref[:1]]) - got).max())
    if not diff <= MAX_ABS_DIFF:
        raise ExportMismatchError(
            f"the ONNX image tower differs from torch's by {diff:.2e} (allowed {MAX_ABS_DIFF:.0e})",
            hint="image queries keep the torch path; report this with `cocatk info --json`",
        )
    return diff
