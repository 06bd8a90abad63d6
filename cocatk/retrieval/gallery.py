"""Self-contained HTML galleries of search hits (thumbnails inlined as small base64 JPEGs).

Example:
    >>> html = render_gallery("cocatk search", [GallerySection("a red circle", hits)])   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Longest thumbnail side in pixels; small keeps a 50-hit page near 1 MB.
THUMB_SIZE = 192


@dataclass
class GallerySection:
    """One block of the page: a heading (usually the query), a caption line, and the hits to show."""

    title: str
    hits: Sequence[Any]
    subtitle: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def thumbnail_data_uri(path: str | Path, size: int = THUMB_SIZE) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of an image file, or None when it cannot be decoded."""
    from ..errors import ImageError
    from ..images import load_image

    try:
        im = load_image(path, draft_size=size)
    except (ImageError, OSError):
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=72)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:20px} h2{font-size:17px;margin:28px 0 4px} .sub{color:#666;font-size:13px;margin-bottom:10px}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.hit{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;width:200px;font-size:12px}
.hit img{width:192px;height:192px;object-fit:contain;background:#eee;display:block}
.path{word-break:break-all;color:#333;margin-top:4px} .score{color:#555}
.missing{width:192px;height:192px;background:#eee;display:flex;align-items:center;justify-content:center;color:#999}
"""


def render_gallery(title: str, sections: Sequence[GallerySection], footer: str = "") -> str:
    """The HTML page (a string): one grid of thumbnails per section, with rank, path and both scores."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.subtitle:
            parts.append(f"<div class='sub'>{html.escape(section.subtitle)}</div>")
        parts.append("<div class='grid'>")
        for hit in section.hits:
            uri = thumbnail_data_uri(hit.path)
            img = (
                f"<img src='{uri}' alt='{html.escape(os.path.basename(hit.path))}'>"
                if uri
                else "<div class='missing'>unreadable</div>"
            )
            parts.append(
                f"<div class='hit'>{img}<div><b>#{hit.rank}</b> "
                f"<span class='score'>sim {_fmt(hit.similarity, 3)} · loglik {_fmt(hit.loglik, 2)}</span></div>"
                f"<div class='path' data-path='{html.escape(hit.path)}'>{html.escape(hit.path)}</div></div>"
            )
        if not section.hits:
            parts.append("<div class='sub'>no hits</div>")
        parts.append("</div>")
    if footer:
        parts.append(f"<p class='sub'>{html.escape(footer)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_gallery(path: str | Path, title: str, sections: Sequence[GallerySection], footer: str = "") -> Path:
    """Render and write the page atomically (temp file + rename); return the resolved path."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_gallery(title, sections, footer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
