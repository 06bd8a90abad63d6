"""File names as bytes on disk: how cocatk stores, shows and prints any path a filesystem can hold.

Inside cocatk a path is a ``str`` decoded the way Python's ``os`` module does (``os.fsdecode``: UTF-8 with
``surrogateescape``), so a name that is not UTF-8 (``fleur_caf\\xe9.jpg`` from a Latin-1 camera card) still opens.
Such a ``str`` cannot be encoded as strict UTF-8, so every edge converts it on purpose:

- SQLite stores the raw bytes (:func:`to_bytes` / :func:`from_bytes`).
- Tables and messages show :func:`display_path`: undecodable bytes become U+FFFD and control characters (a newline
  in a name) become visible escapes such as ``\\n``; the text is never interpreted as markup by the caller.
- ``--paths`` / ``-0`` print :func:`to_bytes`, the exact bytes, so ``xargs`` opens the file.
- JSON carries :func:`json_path`: ``path`` is the name as text (undecodable bytes as U+FFFD) and, only when the name
  is not valid UTF-8, ``path_b64`` holds the exact bytes in base64.

Example:
    >>> p = os.fsdecode(b"fleur_caf\\xe9.jpg")
    >>> display_path(p)
    'fleur_caf\\ufffd.jpg'
    >>> json_path(p)
    {'path': 'fleur_caf\\ufffd.jpg', 'path_b64': 'ZmxldXJfY2Fm6S5qcGc='}
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any

# C0 controls, DEL and the C1 range: shown as escapes so one name stays on one line and cannot move the cursor.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def to_bytes(path: str | os.PathLike[str] | bytes) -> bytes:
    """The exact bytes of a path (``os.fsencode``): what SQLite stores and ``--paths`` prints."""
    return os.fsencode(path)


def from_bytes(data: bytes | str) -> str:
    """A stored path back as the ``str`` that ``os`` functions accept (``os.fsdecode``)."""
    return data if isinstance(data, str) else os.fsdecode(data)


def is_utf8(path: str) -> bool:
    """True when the name is valid UTF-8 (no undecodable bytes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_path(path: str) -> str:
    """The name as valid Unicode text: undecodable bytes become U+FFFD; everything else is kept."""
    return path if is_utf8(path) else to_bytes(path).decode("utf-8", "replace")


def display_path(path: str) -> str:
    """The name for people: :func:`text_path`, with control characters shown as escapes (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text_path(path))


def json_path(path: str, key: str = "path") -> dict[str, Any]:
    """The documented JSON form: ``{key: text}``, plus ``{key}_b64`` (exact bytes) when the name is not UTF-8."""
    out: dict[str, Any] = {key: text_path(path)}
    if not is_utf8(path):
        out[f"{key}_b64"] = base64.b64encode(to_bytes(path)).decode("ascii")
    return out


def file_url(path: str) -> str:
    """A ``file://`` URL that names exactly these bytes (percent-encoded), for links in HTML pages."""
    from urllib.parse import quote

    return "file://" + quote(to_bytes(os.path.abspath(path)), safe="/")


__all__ = ["display_path", "file_url", "from_bytes", "is_utf8", "json_path", "text_path", "to_bytes"]
