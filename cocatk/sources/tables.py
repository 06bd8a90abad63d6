"""Image tables: Parquet files (img2dataset's ``--output_format parquet``, a Hugging Face dataset's parquet export)
and the Arrow files of Hugging Face datasets (``save_to_disk`` folders and the local datasets cache).

A table's items are its rows: identity ``/abs/file.parquet#ROW``, the image in one column (raw bytes, as
img2dataset writes ``jpg``, or Hugging Face's ``Image`` cell ``{"bytes", "path"}``), the caption in another, and the
other scalar columns (``url``, ``width``, ``height``, ``key``, ...) kept as the item's metadata. The columns are
named with ``--image-column`` / ``--caption-column``, or found as ``zeroshot`` finds them: the column Hugging Face's
features mark as an ``Image``, else the first of :data:`IMAGE_COLUMNS` holding bytes; the caption the first of
:data:`CAPTION_COLUMNS` holding text.

:func:`scan_table` reads the table once, a record batch at a time (the image column's byte lengths, the caption and
the metadata); :func:`read_row` reads one row's image again (a thumbnail, a rerank, an encode job). Arrow files are
memory-mapped, so a row is a slice; a Parquet row is read with its row group's column, and the last few row groups
read are kept, so the in-order reads of an index run decode each row group once. Nothing here downloads data:
``hf:NAME`` resolves only from the local Hugging Face cache.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError, UsageError
from .base import Member, ShardScan

#: File suffixes read as image tables.
TABLE_SUFFIXES = (".parquet", ".arrow")
#: Image columns looked for, in this order, when none is named (zeroshot's preference, then img2dataset's).
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
#: Caption columns looked for, in this order, when none is named.
CAPTION_COLUMNS = ("caption", "captions", "txt", "text", "sentences", "raw")
#: Text metadata longer than this is not kept (a url or a key is far shorter).
MAX_META_CHARS = 2048
#: Rows per record batch while a table is scanned.
_SCAN_BATCH = 1024
#: Parquet row groups (one column each) kept decoded by :func:`read_row`, per process.
_KEEP_GROUPS = 4


@dataclass(frozen=True)
class Columns:
    """The columns a user named (None: found as the module docstring says)."""

    image: str | None = None
    caption: str | None = None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Force datasets and huggingface_hub offline for one call: cocatk never downloads data silently."""
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    saved = (dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE)
    dconfig.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconfig.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved


def is_table(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).lower().endswith(TABLE_SUFFIXES)


# ---- Hugging Face -------------------------------------------------------------------------------------------
def hf_files(spec: str) -> list[str]:
    """The Arrow files of ``hf:PATH`` (a ``save_to_disk`` folder: a Dataset, or a DatasetDict's every split) or
    ``hf:NAME`` (a dataset in the local Hugging Face cache, every split; also a local folder of data files, which
    ``datasets`` converts into its cache once).

    Raises:
        DatasetError: neither (the hint says how to get it here).
    """
    target = spec[3:] if spec.startswith("hf:") else spec
    path = Path(target).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _saved_files(path, spec)
    try:
        import datasets

        with offline():
            ds = datasets.load_dataset(target, download_config=datasets.DownloadConfig(local_files_only=True))
    except Exception as e:  # datasets raises many kinds here (FileNotFoundError, ConnectionError, DatasetNotFound)
        raise DatasetError(
            f"{spec} is neither a folder written by save_to_disk nor a dataset in the local Hugging Face cache "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
            hint="save it with ds.save_to_disk(PATH) and pass hf:PATH, or load it once with datasets.load_dataset "
            "where there is network (cocatk never downloads)",
        ) from e
    splits = ds.values() if isinstance(ds, dict) else [ds]
    return [str(Path(f["filename"]).resolve()) for split in splits for f in split.cache_files]


def _saved_files(path: Path, spec: str) -> list[str]:
    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            return [f for s in splits for f in _saved_files(path / s, spec)]
        state = json.loads((path / "state.json").read_text())
        return [str((path / f["filename"]).resolve()) for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(
            f"{spec}: {path} is not a readable save_to_disk folder ({type(e).__name__}: {e})",
            hint="save the dataset again with ds.save_to_disk(PATH)",
        ) from e


# ---- columns ------------------------------------------------------------------------------------------------
def _hf_features(schema: Any) -> dict[str, Any]:
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    with contextlib.suppress(ValueError, AttributeError):
        return dict(json.loads(meta).get("info", {}).get("features", {}))
    return {}


def _holds_image(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _holds_text(t: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_scalar(t: Any) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)
                or pa.types.is_floating(t) or pa.types.is_boolean(t))  # fmt: skip


def pick_columns(schema: Any, columns: Columns, what: str) -> tuple[str, str | None]:
    """(image column, caption column or None) of a table with this Arrow ``schema``; see the module docstring.

    Raises:
        UsageError: a named column is missing or holds no images / no text. DatasetError: no image column found.
    """
    names = list(schema.names)
    listed = ", ".join(names)
    image = columns.image
    if image is not None:
        if image not in names or not _holds_image(schema.field(image).type):
            why = "has no column" if image not in names else "holds no image bytes in column"
            raise UsageError(f"{what} {why} {image!r} (columns: {listed})",
                             hint="pass --image-column with a column of encoded images")  # fmt: skip
    else:
        features = _hf_features(schema)
        marked = [c for c in names if isinstance(features.get(c), dict) and features[c].get("_type") == "Image"]
        holding = [c for c in names if _holds_image(schema.field(c).type)]
        preferred = [c for c in IMAGE_COLUMNS if c in holding]
        found = (marked + preferred + holding)[:1]
        if not found:
            raise DatasetError(f"{what} has no column of image bytes (columns: {listed})",
                               hint="pass --image-column NAME")  # fmt: skip
        image = found[0]
    caption = columns.caption
    if caption is not None:
        if caption not in names or not _holds_text(schema.field(caption).type):
            raise UsageError(f"{what} has no text column {caption!r} (columns: {listed})",
                             hint="pass --caption-column with a column of text, or leave it out")  # fmt: skip
    else:
        caption = next((c for c in CAPTION_COLUMNS if c in names and _holds_text(schema.field(c).type)), None)
    return image, caption


# ---- scanning -----------------------------------------------------------------------------------------------
def _open(path: str) -> tuple[Any, Any]:
    """(schema, batches(columns)) of a Parquet or Arrow file."""
    import pyarrow.parquet as pq

    if path.lower().endswith(".parquet"):
        pf = pq.ParquetFile(path)
        return pf.schema_arrow, lambda cols: pf.iter_batches(batch_size=_SCAN_BATCH, columns=cols)
    table = _arrow_table(path)
    return table.schema, lambda cols: table.select(cols).to_batches(max_chunksize=_SCAN_BATCH)


def _arrow_table(path: str) -> Any:
    """An Arrow IPC file (Hugging Face writes the stream format), memory-mapped: its rows are read in place."""
    import pyarrow as pa

    source = pa.memory_map(path, "r")
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source).read_all()


def _image_sizes(column: Any) -> list[tuple[int, str | None] | None]:
    """Per row: (bytes, None) for an image held in the table, (file size, path) for an ``Image`` cell that names a
    file, None for no image."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_struct(column.type):
        data = column.field("bytes")
        paths = column.field("path").to_pylist() if column.type.get_field_index("path") >= 0 else None
    else:
        data, paths = column, None
    lengths = pc.binary_length(data).to_pylist()
    out: list[tuple[int, str | None] | None] = []
    for i, n in enumerate(lengths):
        if n:
            out.append((int(n), None))
        elif paths is not None and paths[i] and os.path.isfile(paths[i]):
            out.append((os.path.getsize(paths[i]), paths[i]))
        else:
            out.append(None)
    return out


def _text(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value.strip() if isinstance(value, str) and value.strip() else None


def scan_table(path: str, columns: Columns) -> ShardScan:
    """The rows of the table at ``path`` that hold an image, in row order; a table that cannot be read, or stops
    part way, is reported in ``error`` with the rows before it kept (never raises for a damaged file).

    Raises:
        OSError: it cannot be opened. UsageError, DatasetError: as :func:`pick_columns`.
    """
    import pyarrow as pa

    st = os.stat(path)
    out = ShardScan(path, st.st_size, st.st_mtime_ns, kind="parquet" if path.lower().endswith(".parquet") else "arrow")
    try:
        schema, batches = _open(path)
    except (pa.ArrowException, OSError, EOFError) as e:
        out.error = f"not a readable {out.kind} file: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
        return out
    image, caption = pick_columns(schema, columns, path)
    meta_cols = [c for c in schema.names if c not in (image, caption) and _is_scalar(schema.field(c).type)]
    row = 0
    try:
        for batch in batches([image, *([caption] if caption else []), *meta_cols]):
            sizes = _image_sizes(batch.column(image))
            texts = batch.column(caption).to_pylist() if caption else [None] * batch.num_rows
            metas = {c: batch.column(c).to_pylist() for c in meta_cols}
            for i in range(batch.num_rows):
                key, found = str(row + i), sizes[i]
                if found is None:
                    out.skipped.append((key, "no image field"))
                    continue
                meta = {c: _meta_value(v[i]) for c, v in metas.items() if v[i] is not None}
                if found[1] is not None:
                    meta["image_path"] = found[1]
                out.members.append(Member(key, image, row + i, found[0], _text(texts[i]), meta or None))
            row += batch.num_rows
    except (pa.ArrowException, OSError, EOFError) as e:
        out.error = f"truncated or damaged at row {row}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
    return out


def _meta_value(v: Any) -> Any:
    return v[:MAX_META_CHARS] if isinstance(v, str) else v


# ---- reading one row ----------------------------------------------------------------------------------------
_lock = threading.Lock()
_opened: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()  # Arrow tables, Parquet files
_groups: collections.OrderedDict[tuple[str, int, int, str], Any] = collections.OrderedDict()


def read_row(path: str, row: int, column: str) -> bytes:
    """The image of row ``row`` of the table at ``path``, column ``column`` (its bytes, or the file its
    ``Image`` cell names).

    Raises:
        OSError: the table cannot be read, it has no such row or column (it changed since indexing), or the row
            holds no image.
    """
    import pyarrow as pa

    try:
        mtime = os.stat(path).st_mtime_ns
        cell = _cell(path, mtime, int(row), column)
    except (pa.ArrowException, KeyError, IndexError, ValueError, EOFError) as e:
        raise OSError(0, f"row {row} of {path} cannot be read (it changed since indexing?): {e}") from e
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        if cell.get("path"):
            with open(cell["path"], "rb") as f:
                return f.read()
        cell = None
    if not cell:
        raise OSError(0, f"row {row} of {path} holds no image in column {column!r}")
    return bytes(cell)


def _kept(cache: collections.OrderedDict[Any, Any], key: Any, make: Any) -> Any:
    """``cache[key]``, made when missing; the least recently used beyond :data:`_KEEP_GROUPS` are dropped."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    cache.move_to_end(key)
    while len(cache) > _KEEP_GROUPS:
        cache.popitem(last=False)
    return value


def _cell(path: str, mtime: int, row: int, column: str) -> Any:
    import pyarrow.parquet as pq

    parquet = path.lower().endswith(".parquet")
    if row < 0:
        raise IndexError("a negative row")
    with _lock:
        opened = _kept(_opened, (path, mtime), lambda: pq.ParquetFile(path) if parquet else _arrow_table(path))
        if not parquet:
            if not 0 <= row < opened.num_rows:
                raise IndexError(f"the table has {opened.num_rows} rows")
            return opened.column(column)[row].as_py()
        meta, start = opened.metadata, 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group).num_rows
            if row < start + rows:
                break
            start += rows
        else:
            raise IndexError(f"the table has {start} rows")
        values = _kept(_groups, (path, mtime, group, column),
                       lambda: opened.read_row_group(group, columns=[column]).column(0))  # fmt: skip
    return values[row - start].as_py()


__all__ = [
    "CAPTION_COLUMNS",
    "IMAGE_COLUMNS",
    "TABLE_SUFFIXES",
    "Columns",
    "hf_files",
    "is_table",
    "offline",
    "pick_columns",
    "read_row",
    "scan_table",
]
