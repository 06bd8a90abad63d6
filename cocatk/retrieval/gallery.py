"""Self-contained HTML galleries of search hits (thumbnails inlined as small base64 JPEGs).

Every thumbnail and path links to its file (:func:`cocatk.paths.file_url`: the exact bytes, percent-encoded); paths
are shown with :func:`cocatk.paths.display_path` and every text is HTML-escaped, so a file named ``<script>.jpg``
or ``[bold red]x.jpg`` is just text. A header lists what produced the page (``meta``: query, model, index, date)
and ``warnings`` are shown in an amber box above the results.

Example:
    >>> html = render_gallery("cocatk search", [GallerySection("a red circle", hits)],
    ...                       meta={"query": "a red circle", "model": "demo"})      # doctest: +SKIP
    >>> write_gallery("results.html", "cocatk search", [GallerySection("a red circle", hits)])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import contextlib
import errno
import html
import io
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..paths import display_path, file_url, text_path

#: Longest thumbnail side in pixels; small keeps a 50-hit page near 1 MB.
THUMB_SIZE = 192

#: The badge of a marked hit (``GallerySection.marked``).
MARK_BADGE = "✓ true image"


@dataclass
class GallerySection:
    """One block of the page: a heading (usually the query), a caption line, and the hits to show.

    ``marked`` holds hit ids to highlight (a green border and a "✓ true image" badge), e.g. the known true image
    of a demo query.
    """

    title: str
    hits: Sequence[Any]
    subtitle: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    marked: set[int] = field(default_factory=set)


def thumbnail_data_uri(path: str | Path, size: int = THUMB_SIZE) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail of an image file, or None when it cannot be decoded.

    ``path`` may hold undecodable bytes (a ``surrogateescape`` str from ``os.fsdecode``).
    """
    from ..errors import ImageError
    from ..images import load_image

    try:
        im = load_image(path, draft_size=size)
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=72)
    except (ImageError, OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _text(value: Any) -> str:
    """Any value as valid Unicode text (undecodable bytes as U+FFFD), HTML-escaped; newlines kept."""
    s = str(value)
    try:
        s = text_path(s)
    except UnicodeError:  # a lone surrogate that surrogateescape did not make
        s = s.encode("utf-8", "replace").decode("utf-8")
    return html.escape(s, quote=True)


def _shown(path: str) -> str:
    """A path for people (:func:`display_path`: U+FFFD, ``\\n`` escapes), HTML-escaped."""
    try:
        s = display_path(path)
    except UnicodeError:
        s = path.encode("utf-8", "replace").decode("utf-8")
    return html.escape(s, quote=True)


def _href(path: str) -> str:
    try:
        return html.escape(file_url(path), quote=True)
    except UnicodeError:
        return ""


_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d1d9e0;--bg:#f6f8fa;--card:#fff;--ok:#1a7f37;--warn:#9a6700}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:0;
 background:var(--bg);color:var(--fg);line-height:1.4}
main{max-width:1280px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 10px;overflow-wrap:anywhere}
h2{font-size:16px;margin:28px 0 2px;overflow-wrap:anywhere}
.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:0 0 14px;font-size:13px}
.meta dt{color:var(--muted)} .meta dd{margin:0;overflow-wrap:anywhere}
.warnings{background:#fff8c5;border:1px solid #d4a72c;border-left:6px solid #d4a72c;border-radius:6px;
 padding:10px 14px;margin:0 0 16px;color:#3b2300;font-size:14px}
.warnings p{margin:4px 0;white-space:pre-wrap} .warnings p::before{content:"⚠ ";color:var(--warn)}
.sub{color:var(--muted);font-size:13px;margin:0 0 10px;white-space:pre-wrap;overflow-wrap:anywhere}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:14px;align-items:start}
.hit{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px;font-size:12px;
 margin:0;min-width:0}
.hit.marked{border:3px solid var(--ok);padding:6px;box-shadow:0 0 0 3px #dafbe1}
.thumb{display:flex;align-items:center;justify-content:center;aspect-ratio:1/1;background:#eaeef2;
 border-radius:4px;overflow:hidden}
.thumb img{max-width:100%;max-height:100%;display:block}
.missing{color:var(--muted)}
.line{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 8px;margin-top:6px}
.rank{font-weight:600} .score{color:var(--muted);font-variant-numeric:tabular-nums}
.badge{background:var(--ok);color:#fff;border-radius:10px;padding:1px 8px;font-weight:600;white-space:nowrap}
.path{display:block;margin-top:4px;color:#0969da;text-decoration:none}
.caption{margin-top:4px;color:#444;font-style:italic}
.path:hover .name{text-decoration:underline}
.dir{display:block;color:var(--muted);white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.name{display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:5;overflow:hidden;overflow-wrap:anywhere}
footer{margin-top:28px;color:var(--muted);font-size:13px;white-space:pre-wrap}
@media (max-width:600px){main{padding:14px 12px 28px}.grid{grid-template-columns:repeat(2,minmax(0,1fr));gap:10px}}
"""


def _header(title: str, meta: Mapping[str, str] | None, warnings: Sequence[str]) -> list[str]:
    items = dict(meta or {})
    if "date" not in items:
        items["date"] = datetime.now().astimezone().isoformat(sep=" ", timespec="seconds")
    parts = [f"<h1>{_text(title)}</h1>", '<dl class="meta">']
    parts += [f"<dt>{_text(k)}</dt><dd>{_shown(str(v))}</dd>" for k, v in items.items()]
    parts.append("</dl>")
    if warnings:
        parts.append('<div class="warnings" role="alert">')
        parts += [f"<p>{_text(w)}</p>" for w in warnings]
        parts.append("</div>")
    return parts


def _split(path: str) -> str:
    """The folder (one muted line) and the file name, each shown like :func:`_shown`."""
    folder, name = os.path.split(path)
    if not folder:
        return f'<span class="name">{_shown(name)}</span>'
    return f'<span class="dir">{_shown(os.path.join(folder, ""))}</span><span class="name">{_shown(name)}</span>'


def _hit(hit: Any, marked: bool) -> str:
    shown = _shown(hit.path)
    href = _href(hit.path)
    uri = thumbnail_data_uri(hit.path)
    img = f'<img src="{uri}" alt="{shown}" loading="lazy">' if uri else '<span class="missing">unreadable</span>'
    badge = f' <span class="badge">{MARK_BADGE}</span>' if marked else ""
    text = getattr(hit, "caption", None)
    caption = f'<div class="caption">{_text(text)}</div>' if text else ""
    return (
        f'<figure class="hit{" marked" if marked else ""}" data-id="{_text(hit.id)}" data-path="{shown}">'
        f'<a class="thumb" href="{href}" title="{shown}">{img}</a>'
        f'<div class="line"><span class="rank">#{_text(hit.rank)}</span>{badge}'
        f'<span class="score">sim {_fmt(hit.similarity, 3)} · loglik {_fmt(hit.loglik, 2)}</span></div>'
        f"{caption}"
        f'<a class="path" href="{href}" title="{shown}">{_split(hit.path)}</a></figure>'
    )


def render_gallery(
    title: str,
    sections: Sequence[GallerySection],
    footer: str = "",
    *,
    meta: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """The HTML page (a string): a header, then one grid of thumbnails per section, with rank, path and both scores.

    Args:
        title: page title and heading.
        sections: the blocks of hits (see :class:`GallerySection`).
        footer: a line at the bottom.
        meta: shown as a definition list under the heading, in order (e.g. query, model, index); ``date`` defaults
            to the current local date-time.
        warnings: lines shown in an amber box above the results.
    """
    parts = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_text(title)}</title><style>{_CSS}</style></head><body><main>",
        *_header(title, meta, warnings),
    ]
    for section in sections:
        parts.append(f"<section><h2>{_text(section.title)}</h2>")
        if section.subtitle:
            parts.append(f'<p class="sub">{_text(section.subtitle)}</p>')
        if section.hits:
            parts.append('<div class="grid">')
            parts += [_hit(hit, getattr(hit, "id", None) in section.marked) for hit in section.hits]
            parts.append("</div>")
        else:
            parts.append('<p class="sub">no hits</p>')
        parts.append("</section>")
    if footer:
        parts.append(f"<footer>{_text(footer)}</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _folder_error(folder: Path) -> Exception:
    from ..errors import UsageError

    shown = display_path(str(folder))
    example = display_path(str(folder / "results.html"))
    return UsageError(f"--html {shown} is a folder", hint=f"pass a file name such as {example}")


def _write_error(target: Path, e: OSError) -> Exception:
    from ..errors import CocatkError

    shown = display_path(str(target))
    reason = e.strerror or type(e).__name__
    if isinstance(e, IsADirectoryError):
        return _folder_error(target)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "pass a path in a folder you can write to"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some disk space or write the page to another disk"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG):
        hint = "pass a file name in an existing folder (or one that can be created)"
    else:
        hint = "pass another path"
    return CocatkError(f"cannot write {shown}: {reason}", hint=hint)


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """Create a new temp file next to the target, mode 0o666 filtered by the umask like any newly created file
    (``mkstemp`` would force 0o600)."""
    stem = name[:40]
    for _ in range(100):
        tmp = folder / f".{stem}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary file name", str(folder))


def check_target(path: str | Path) -> Path:
    """The resolved page path, or UsageError when it names a folder (callers check before long work)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise _folder_error(target)
    return target.resolve()


def write_gallery(
    path: str | Path,
    title: str,
    sections: Sequence[GallerySection],
    footer: str = "",
    *,
    meta: Mapping[str, str] | None = None,
    warnings: Sequence[str] = (),
) -> Path:
    """Render and write the page atomically (temp file + rename); return the resolved path.

    The file gets the permissions of any newly created file (0o666 less the umask), or keeps the mode of the file
    it replaces. Nothing is left behind on failure.

    Raises:
        UsageError: ``path`` is a folder (checked before anything is created).
        CocatkError: the page cannot be written (permission, disk full, ...); the hint says what to do.
    """
    target = check_target(path)
    text = render_gallery(title, sections, footer, meta=meta, warnings=warnings)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(target.parent, target.name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = None
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
        tmp = None
    except OSError as e:
        raise _write_error(target, e) from e
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return target
