"""Find image files and decode them safely into RGB PIL images.

Two public functions, shared by the indexer and by search (which re-decodes candidates exactly like the indexer):

- :func:`find_images` walks folders recursively and yields image files (absolute, resolved paths), skipping hidden
  folders, junk files (``._*``, ``.DS_Store``, ``Thumbs.db``) and, unless asked, symlinks.
- :func:`load_image` decodes one file into an RGB image: EXIF orientation applied, every mode converted to RGB
  (transparency over white), first frame of animations, a megapixel guard, and JPEG draft decoding near the model's
  input size. Any failure raises :class:`ImageDecodeError` (an :class:`~cocatk.errors.ImageError`) with a short
  ``reason`` such as ``"truncated"`` or ``"not an image"``.

Example:
    >>> from cocatk.images import find_images, load_image
    >>> for path in find_images(["~/Pictures"]):              # doctest: +SKIP
    ...     image = load_image(path, draft_size=224)

Pillow is imported inside the functions; HEIC/HEIF support (``pip install 'cocatk[heif]'``) is registered lazily.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .errors import ImageError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

#: Extensions Pillow decodes without plugins (lower case, with the dot).
BASE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".webp",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".ico",
        ".tga",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)
#: Read through the pillow-heif plugin (HEIC from phones); AVIF also when Pillow itself was built with it.
HEIF_EXTENSIONS = frozenset({".heic", ".heif", ".hif"})
AVIF_EXTENSIONS = frozenset({".avif"})
JPEG2000_EXTENSIONS = frozenset({".jp2", ".j2k", ".jpx"})

#: File names that are never images even when their extension says so (macOS resource forks, OS thumbnails).
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini"})

#: Default megapixel guard: a 100 MP RGB image is 300 MB decoded; larger files are skipped, not decoded.
DEFAULT_MAX_MEGAPIXELS = 100.0

_HEIF_LOCK = threading.Lock()
_HEIF_STATE: dict[str, bool] = {}


def _heif_available() -> bool:
    """Register pillow-heif's opener once (thread-safe); False when it is not installed."""
    with _HEIF_LOCK:
        if "ok" not in _HEIF_STATE:
            try:
                import pillow_heif

                pillow_heif.register_heif_opener()
                _HEIF_STATE["ok"] = True
            except Exception:  # not installed, or a broken libheif: HEIC files are then skipped as unreadable
                _HEIF_STATE["ok"] = False
        return _HEIF_STATE["ok"]


def image_extensions() -> frozenset[str]:
    """Every extension :func:`find_images` picks up on this machine (depends on optional plugins)."""
    from PIL import features

    exts = set(BASE_EXTENSIONS)
    if _heif_available():
        exts |= HEIF_EXTENSIONS
    if features.check("avif"):
        exts |= AVIF_EXTENSIONS
    if features.check("jpg_2000"):
        exts |= JPEG2000_EXTENSIONS
    return frozenset(exts)


def _is_junk(name: str) -> bool:
    # Hidden files include macOS '._x.jpg' resource forks and '.DS_Store'.
    return name.startswith(".") or name.lower() in JUNK_NAMES


def find_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    follow_symlinks: bool = False,
    extensions: Iterable[str] | None = None,
) -> Iterator[Path]:
    """Yield the image files under ``paths`` (files or folders), recursively, as absolute resolved paths.

    Folders are walked in sorted order; each file is yielded once even when reachable twice. Hidden folders and
    files, and junk names (``Thumbs.db``, ``desktop.ini``), are skipped. Symlinks (to files or folders) are skipped
    unless ``follow_symlinks``; then folder cycles are detected by (device, inode) and walked once.

    Args:
        paths: roots to scan. A root given as a file is yielded when its extension is an image extension.
        follow_symlinks: follow symlinked files and folders below the roots.
        extensions: lower-case extensions with the dot; default :func:`image_extensions`.

    Raises:
        UsageError: a root does not exist.
    """
    exts = frozenset(e.lower() for e in extensions) if extensions is not None else image_extensions()
    seen_files: set[Path] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for root in paths:
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise UsageError(f"{root} does not exist", hint="pass existing image files or folders")
        root_path = root_path.resolve()
        if root_path.is_file():
            if root_path.suffix.lower() in exts and root_path not in seen_files:
                seen_files.add(root_path)
                yield root_path
            continue
        stack = [root_path]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:  # symlink cycle or a folder reached twice
                continue
            seen_dirs.add(key)
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:  # unreadable folder: nothing to index there
                continue
            subdirs: list[Path] = []
            for entry in entries:
                if _is_junk(entry.name):
                    continue
                try:
                    is_link = entry.is_symlink()
                    if is_link and not follow_symlinks:
                        continue
                    is_dir = entry.is_dir(follow_symlinks=True)
                    is_file = not is_dir and entry.is_file(follow_symlinks=True)
                except OSError:
                    continue
                if is_dir:
                    subdirs.append(Path(entry.path))
                elif is_file and os.path.splitext(entry.name)[1].lower() in exts:
                    # Below a followed folder link a plain entry's path still runs through the link: resolve it.
                    path = Path(entry.path).resolve() if follow_symlinks else Path(entry.path)
                    if path not in seen_files:
                        seen_files.add(path)
                        yield path
            # Reverse so that popping from the stack walks subfolders in sorted order.
            stack.extend(reversed(subdirs))


class ImageDecodeError(ImageError):
    """An image file could not be decoded. ``reason`` is short and stable (used to group failures):
    ``empty file``, ``not an image``, ``truncated``, ``too large``, ``unreadable``, ``decode error``,
    ``unsupported format``."""

    def __init__(self, reason: str, detail: str = "", path: str | None = None) -> None:
        where = f"{path}: " if path else ""
        super().__init__(
            f"{where}{reason}" + (f" ({detail})" if detail else ""),
            hint="the file is skipped; re-export or repair it, or remove it from the folder",
        )
        self.reason = reason
        self.detail = detail
        self.path = path


def _classify(exc: BaseException) -> tuple[str, str]:
    from PIL import Image, UnidentifiedImageError

    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        return "not an image", "unknown or unsupported format"
    if isinstance(exc, Image.DecompressionBombError):
        return "too large", text
    if isinstance(exc, MemoryError):
        return "too large", "out of memory while decoding"
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return "unreadable", text
    low = text.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "broken data stream" in low or "premature end" in low:
        return "truncated", text
    return "decode error", text


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited over white, 16-bit and float scaled to 8 bits."""
    import numpy as np
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
            if lo < 0 or hi > 255:  # 32-bit data of unknown range: stretch to 0..255
                arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def load_image(
    source: str | os.PathLike[str] | bytes | IO[bytes],
    *,
    draft_size: int | None = None,
    max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
) -> Image.Image:
    """Decode an image file into an RGB PIL image, the way the indexer does.

    Steps: open (HEIC/HEIF through pillow-heif when installed), refuse images above ``max_megapixels`` (read from
    the header, before decoding), JPEG draft mode when ``draft_size`` is given (libjpeg decodes at 1/2, 1/4 or 1/8
    scale while both sides stay >= ``draft_size``, so the model's resize still sees at least its input size),
    first frame of animations, EXIF orientation, and conversion of every mode to RGB (P, LA, RGBA composited over
    white, CMYK, I;16, 1, ...).

    Args:
        source: a path, the file's bytes, or a binary file object.
        draft_size: the model's input size (e.g. 224); None decodes at full resolution.
        max_megapixels: images with more pixels are refused as ``"too large"``; None disables the guard
            (Pillow's own decompression-bomb limit still applies).

    Returns:
        A loaded RGB ``PIL.Image.Image`` (the file is closed).

    Raises:
        ImageDecodeError: (an :class:`~cocatk.errors.ImageError`) with ``reason`` one of ``empty file``,
            ``not an image``, ``truncated``, ``too large``, ``unreadable``, ``decode error``.

    Example:
        >>> load_image("photo.jpg", draft_size=224).mode        # doctest: +SKIP
        'RGB'
    """
    from PIL import Image, ImageOps

    name: str | None = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty file")
        fp: IO[bytes] | str = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        try:
            st = os.stat(name)
        except OSError as e:
            raise ImageDecodeError("unreadable", e.strerror or type(e).__name__, name) from e
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError("unreadable", "not a regular file", name)
        if st.st_size == 0:
            raise ImageDecodeError("empty file", "", name)
        fp = name
    else:
        fp = source
    if name and os.path.splitext(name)[1].lower() in HEIF_EXTENSIONS:
        _heif_available()
    try:
        with warnings.catch_warnings():
            # cocatk applies its own megapixel guard; Pillow's bomb *warning* would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                width, height = im.size
                if max_megapixels is not None and width * height > max_megapixels * 1e6:
                    raise ImageDecodeError(
                        "too large", f"{width}x{height} = {width * height / 1e6:.0f} MP > {max_megapixels:g} MP", name
                    )
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)
                if draft_size and im.format == "JPEG":
                    im.draft("RGB", (draft_size, draft_size))
                im.load()
                out = ImageOps.exif_transpose(im) or im
                out = _to_rgb(out)
                if out is im:
                    out = im.copy()  # detach from the file before it closes
                return out
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, zlib.error, ...
        reason, detail = _classify(e)
        heif = bool(name) and os.path.splitext(name or "")[1].lower() in HEIF_EXTENSIONS
        if reason == "not an image" and heif and not _heif_available():
            reason, detail = "unsupported format", "HEIC/HEIF needs `pip install 'cocatk[heif]'`"
        raise ImageDecodeError(reason, detail, name) from e


__all__ = [
    "BASE_EXTENSIONS",
    "DEFAULT_MAX_MEGAPIXELS",
    "ImageDecodeError",
    "find_images",
    "image_extensions",
    "load_image",
]
