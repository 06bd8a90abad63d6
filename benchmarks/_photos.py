"""Photo-like JPEGs for the decode and indexing benchmarks, generated once into a cache folder outside the repo.

A camera photo is not random noise (which JPEG cannot compress) nor a flat colour (which decodes too fast): these
images have a smooth random background (sky/ground-like gradients and blobs), a few hard-edged objects, and fine
sensor-like grain, saved at quality 90 with camera EXIF (make, model, date, and an Orientation that is 6 (rotated)
on every fourth photo so EXIF transposition is exercised). A 4000x3000 one is about 3-5 MB, like a 12 MP phone photo.

Example:
    >>> from benchmarks._photos import ensure_photo_set            # doctest: +SKIP
    >>> paths = ensure_photo_set("/tmp/cocatk-bench/12mp", 300, 4000, 3000)   # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Where the photo sets live (outside the repository; regenerated when missing).
CACHE_DIR = Path("/tmp/cocatk-bench")

_EXIF_MAKE, _EXIF_MODEL, _EXIF_DATETIME, _EXIF_ORIENTATION = 0x010F, 0x0110, 0x0132, 0x0112


def make_photo(seed: int, width: int, height: int) -> Image.Image:
    """A deterministic photo-like RGB image of ``width`` x ``height``."""
    rng = np.random.default_rng(seed)
    # Background: a coarse random field upsampled (smooth, like sky, walls, foliage out of focus).
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    top, bottom = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0, 1, 6)[:, None, None]
    coarse = (0.5 * coarse + 0.5 * ((1 - ramp) * top + ramp * bottom)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    # Objects: hard edges and textures JPEG has to spend bits on.
    for _ in range(int(rng.integers(4, 10))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 20, width // 3), rng.integers(height // 20, height // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    for _ in range(int(rng.integers(5, 15))):
        pts = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=int(max(2, width // 300)))
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1, width // 1500)))
    # Grain: a 256x256 noise tile repeated over the frame (a full-frame randn would dominate generation time).
    tile = rng.normal(0, 6, size=(256, 256, 3)).astype(np.int16)
    reps = (height // 256 + 1, width // 256 + 1, 1)
    noise = np.tile(tile, reps)[:height, :width]
    arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def photo_exif(seed: int) -> Image.Exif:
    exif = Image.Exif()
    exif[_EXIF_MAKE] = "cocatk"
    exif[_EXIF_MODEL] = "bench-cam 12MP"
    exif[_EXIF_DATETIME] = f"2024:0{1 + seed % 9}:{10 + seed % 18} 12:{seed % 60:02d}:00"
    exif[_EXIF_ORIENTATION] = 6 if seed % 4 == 3 else 1
    return exif


def photo_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
    """The JPEG bytes of :func:`make_photo` with camera EXIF."""
    buf = io.BytesIO()
    make_photo(seed, width, height).save(buf, "JPEG", quality=quality, exif=photo_exif(seed))
    return buf.getvalue()


def ensure_photo_set(folder: str | Path, n: int, width: int, height: int, workers: int = 4) -> list[Path]:
    """Generate ``n`` photos into ``folder`` unless they are already there (a ``set.json`` records the recipe)."""
    folder = Path(folder)
    recipe = {"n": n, "width": width, "height": height, "quality": 90, "version": 1}
    marker = folder / "set.json"
    paths = [folder / f"photo_{i:04d}.jpg" for i in range(n)]
    if marker.is_file() and json.loads(marker.read_text()) == recipe and all(p.is_file() for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        paths[i].write_bytes(photo_jpeg(i, width, height))

    # PIL releases the GIL while encoding, so threads help.
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    marker.write_text(json.dumps(recipe))
    return paths
