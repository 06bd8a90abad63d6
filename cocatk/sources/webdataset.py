"""WebDataset tar shards: the items of a shard and their byte ranges.

A shard is an uncompressed POSIX tar whose members are grouped into samples by key, as the webdataset library
does it (``webdataset.tariterators.base_plus_ext``): the key is the member name up to the first dot of its base
name, the rest is the field (``jpg``, ``txt``, ``json``, ``seg.png``), and a sample is a run of consecutive members
with one key. img2dataset writes ``000000000.jpg``, ``000000000.txt`` (the caption) and ``000000000.json`` (url,
width, height, ...) per sample.

:func:`scan_shard` reads the tar headers (and the small text and JSON fields) once, in order, and records for each
sample's image member where its bytes lie in the shard, so :func:`read_member` can read one image again with one
``pread`` (a thumbnail, a rerank, a caption) without scanning the shard. A truncated shard yields the samples before
the damage and says where it stopped; a corrupt image is only found when it is decoded, as a file's would be.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

from .base import Member, ShardScan

#: File suffixes read as tar shards. Compressed tars (.tar.gz) have no byte ranges to read a member from.
TAR_SUFFIXES = (".tar",)
#: Text and JSON fields larger than this are not kept (a caption or a metadata record is far smaller).
MAX_FIELD_BYTES = 1 << 16
#: webdataset's rule (tariterators.base_plus_ext): key = up to the first dot of the base name, field = the rest.
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_key(name: str) -> tuple[str, str] | None:
    """(key, field) of a member name, webdataset's way; None for a name without a field."""
    m = _KEY.match(name)
    return (m.group(1), m.group(2)) if m else None


def scan_shard(path: str, image_fields: Sequence[str]) -> ShardScan:
    """The samples of the shard at ``path`` that hold an image (a member whose last field, with a dot, is in
    ``image_fields``, e.g. ``.jpg``), in shard order; never raises for a damaged shard (see :class:`ShardScan`).

    Raises:
        OSError: the shard cannot be opened.
    """
    st = os.stat(path)
    out = ShardScan(path, st.st_size, st.st_mtime_ns)
    exts = {e.lower() for e in image_fields}
    seen: set[str] = set()
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is None:
            return
        key, image = current["key"], current.get("image")
        if key in seen:
            out.skipped.append((key, "the key repeats an earlier sample of the shard"))
        elif image is None:
            out.skipped.append((key, "no image field"))
        else:
            seen.add(key)
            out.members.append(Member(key, image[0], image[1], image[2], current.get("txt"), current.get("json")))

    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tf:
            while True:
                info = tf.next()
                if info is None:
                    break
                if not info.isfile():
                    continue
                parts = split_key(info.name)
                if parts is None:
                    continue
                key, fld = parts
                if info.offset_data + info.size > out.size:
                    out.error = f"truncated: member {info.name} ends past the end of the file"
                    break
                if current is None or current["key"] != key:
                    flush()
                    current = {"key": key}
                last = "." + fld.rsplit(".", 1)[-1].lower()
                if last in exts and "image" not in current:
                    current["image"] = (fld, info.offset_data, info.size)
                elif fld.lower() in ("txt", "json") and info.size <= MAX_FIELD_BYTES:
                    data = raw_read(raw, info.offset_data, info.size)
                    _keep_field(current, fld.lower(), data)
        flush()
    except (tarfile.TarError, EOFError) as e:
        flush()
        out.error = f"truncated or not a tar: {str(e) or type(e).__name__}"
    return out


def raw_read(f: Any, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` of the open file ``f``, keeping its position (tarfile reads on from it)."""
    here = f.tell()
    try:
        f.seek(offset)
        return f.read(size)
    finally:
        f.seek(here)


def _keep_field(sample: dict[str, Any], fld: str, data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    if fld == "txt":
        sample["txt"] = text.strip()
        return
    try:
        value = json.loads(text)
    except ValueError:
        return
    if isinstance(value, dict):
        sample["json"] = value


def read_member(shard: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """The ``size`` bytes at ``offset`` of ``shard`` (an item's image, as :func:`scan_shard` recorded it).

    Raises:
        OSError: the shard cannot be read, or it is shorter than the recorded range (it changed since indexing).
    """
    fd = os.open(shard, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(0, f"the shard ends {size - len(data)} bytes before this member (it changed since indexing)")
    return data
