"""open_clip's inference preprocessing split in two: a PIL half without torch, and a torch half on a whole batch.

open_clip preprocesses an image with a torchvision ``Compose``: resize (the shortest side, or "squash" to a square),
center crop, RGB, ``ToTensor`` (``/ 255``) and ``Normalize``. A process that only decodes (Ray's decode tasks) would
import torch, torchvision and open_clip for it: 5-10 s of a cold ``cocatk index --ray`` on 2 cores, with the
actor's own imports competing for the same cores. So:

- :func:`describe` (where the model's transform is at hand) turns a transform of that standard shape into a plain
  dict, and gives None for any other shape (the caller keeps the transform itself);
- :func:`resize_crop` (PIL and numpy only) does the geometric half: an (S, S, 3) uint8 array, a quarter of the
  float32 bytes to ship;
- :func:`normalize` (torch) does the arithmetic half on a batch, with torchvision's own operations in its order.

Together they equal the transform bit for bit (``tests/test_preprocess.py`` checks it against open_clip's on
images of every shape the geometry distinguishes).

Example:
    >>> spec = describe(model.preprocess)               # doctest: +SKIP
    >>> x = normalize(np.stack([resize_crop(im, spec) for im in images]), spec)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

#: torchvision's interpolation modes that a PIL resize reproduces (torchvision calls PIL with the same filter).
_PIL_FILTERS = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}


def describe(transform: Any) -> dict[str, Any] | None:
    """A plain description of ``transform`` when it is open_clip's standard inference transform, else None.

    Recognised: ``Compose([Resize(S or (S, S)), CenterCrop(S)?, MaybeConvertMode("RGB") or _convert_to_rgb,
    MaybeToTensor or ToTensor, Normalize(mean, std)])`` with a square output and no ``max_size``. Anything else
    (``resize_mode="longest"``, a non-square size, a transform cocatk does not know) gives None.
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", None) or [])
    if type(transform) is not T.Compose or len(steps) not in (4, 5):
        return None
    resize, *middle, to_tensor, norm = steps
    crop = middle[0] if len(middle) == 2 else None
    convert = middle[-1]
    if type(resize) is not T.Resize or resize.max_size is not None:
        return None
    mode = resize.interpolation.value
    if mode not in _PIL_FILTERS:
        return None
    size = resize.size
    if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
        side = int(size if isinstance(size, int) else size[0])
        kind = "shortest"
        if crop is None:
            return None  # the shortest side resized, nothing cropped: the output is not square
    elif isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        side = int(size[0])
        kind = "squash"
    else:
        return None
    if crop is not None and (type(crop) is not T.CenterCrop or tuple(crop.size) != (side, side)):
        return None
    if not _is_rgb_step(convert) or not _is_to_tensor(to_tensor):
        return None
    if type(norm) is not T.Normalize or norm.inplace:
        return None
    mean, std = [float(v) for v in norm.mean], [float(v) for v in norm.std]
    if len(mean) != 3 or len(std) != 3:
        return None
    return {"resize": kind, "size": side, "crop": crop is not None, "interpolation": mode, "mean": mean, "std": std}


def _is_rgb_step(step: Any) -> bool:
    if getattr(step, "__name__", "") == "_convert_to_rgb":
        return True
    return type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"


def _is_to_tensor(step: Any) -> bool:
    from torchvision import transforms as T

    return type(step) is T.ToTensor or type(step).__name__ == "MaybeToTensor"


def resize_crop(image: Image.Image, spec: dict[str, Any]) -> np.ndarray:
    """The geometric half of the transform: a C-contiguous (S, S, 3) uint8 array. No torch.

    Follows torchvision's ``resize`` and ``center_crop`` on a PIL image: the new long side is
    ``int(S * long / short)``, an image already at the output size is not resampled, and the crop box is rounded
    the way torchvision rounds it.
    """
    side = int(spec["size"])
    w, h = image.size
    if spec["resize"] == "squash":
        new_w = new_h = side
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = side, int(side * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), _PIL_FILTERS[spec["interpolation"]])
    if spec["crop"]:
        top = int(round((new_h - side) / 2.0))
        left = int(round((new_w - side) / 2.0))
        if (left, top, new_w, new_h) != (0, 0, side, side):
            image = image.crop((left, top, left + side, top + side))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy: torch takes it without a warning


def normalize(pixels: np.ndarray | torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """The arithmetic half, on a batch: (N, S, S, 3) uint8 to (N, 3, S, S) float32, as ``ToTensor`` then
    ``Normalize`` compute it (``/ 255``, ``- mean``, ``/ std`` in float32)."""
    import torch

    x = torch.as_tensor(pixels)
    x = x.permute(0, 3, 1, 2).contiguous().to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(spec["mean"], dtype=x.dtype).view(-1, 1, 1)
    std = torch.as_tensor(spec["std"], dtype=x.dtype).view(-1, 1, 1)
    return x.sub_(mean).div_(std)


__all__ = ["describe", "normalize", "resize_crop"]
