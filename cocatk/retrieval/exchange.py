"""clip-retrieval's embeddings folder: :func:`export_embeddings` writes an index as one, :func:`open_embeddings`
checks one for :mod:`.from_embeddings` (``cocatk index --from-embeddings``), which brings it into an index.

The folder is what ``clip-retrieval inference`` writes and what its reader, the ``embedding-reader`` package
(``EmbeddingReader(embeddings_folder=OUT/img_emb, file_format="parquet_npy", metadata_folder=OUT/metadata,
meta_columns=[...])``), clip-retrieval's back end and autofaiss read::

    OUT/img_emb/img_emb_0.npy             (N, D) float16 (or float32), L2-normalised, one row per image
    OUT/metadata/metadata_0.parquet       the same N rows in the same order: image_path, and what else is known
    OUT/cocatk.json                       only in cocatk's export: the model, dim, dtype, count, roots

Shards are numbered as clip-retrieval numbers them (zero-padded to the width of the shard count), so that the sorted
file names, which is how embedding-reader pairs an ``.npy`` with its ``.parquet``, are also the row order. cocatk's
export writes the rows in id order with the columns ``image_path`` (the name as text, :func:`cocatk.paths.text_path`),
``image_path_b64`` (only when some name is not UTF-8: the exact bytes, as :func:`cocatk.paths.json_path` has it),
``id``, ``caption`` (only when the index holds captions: the most recent caption of each file), and ``size``,
``mtime_ns``, ``hash`` (the stat and content hash the index keeps, so that an import on the same machine need not
read the files again). The export is atomic: a temporary folder beside ``OUT``, renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._version import __version__
from ..errors import EmptyIndexError, UsageError
from ..paths import display_path, is_utf8, json_path, text_path
from .layout import ProgressCallback

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder
    from .store import FileRow

#: The one format so far (``cocatk export --format``).
FORMAT = "clip-retrieval"
#: cocatk's record of the model beside the two folders (clip-retrieval's own output has none).
RECORD_NAME = "cocatk.json"
#: ``--dtype``: float16 is what clip-retrieval writes; float32 keeps the index's vectors exactly.
DTYPES = {"float16": "<f2", "float32": "<f4"}
#: Rows per shard: clip-retrieval's ``write_batch_size`` default.
DEFAULT_SHARD_SIZE = 1_000_000
#: Rows read from SQLite and written together (bounded memory whatever the shard size).
_BLOCK = 4096


# ---- export ------------------------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What :func:`export_embeddings` wrote; ``to_dict()`` is the JSON ``cocatk export --json`` prints."""

    out: str
    rows: int
    shards: int
    dim: int
    dtype: str
    captions: int
    model: str
    columns: list[str]
    bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), **json_path(self.out, "out"), "format": FORMAT}


def check_export_target(out: str | os.PathLike[str]) -> Path:
    """``out`` as an absolute path, checked before an index is opened.

    Raises:
        UsageError: ``out`` exists and is not an empty folder (an export never writes into or over one).
    """
    path = Path(out).expanduser().absolute()
    if path.is_symlink() or (path.exists() and (not path.is_dir() or any(path.iterdir()))):
        raise UsageError(
            f"{display_path(str(path))} already exists and is not an empty folder",
            hint="pass a new folder for OUT (it is written whole, then renamed into place), or move the old one away",
        )
    return path


def export_embeddings(
    index: IndexFolder,
    out: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: ProgressCallback | None = None,
) -> ExportReport:
    """Write ``index`` as clip-retrieval's embeddings folder ``out`` (see the module docstring), atomically: into a
    temporary folder beside ``out``, then renamed. The rows are one committed checkpoint (a writer may run meanwhile).

    Args:
        dtype: ``float16`` (clip-retrieval's) or ``float32`` (the index's vectors exactly).
        shard_size: rows per ``img_emb_N.npy`` / ``metadata_N.parquet`` pair.
        progress: ``progress("export", rows_done, rows)``.

    Raises:
        UsageError: a bad dtype or shard size, or ``out`` exists and is not empty. EmptyIndexError: no images.

    Example:
        >>> export_embeddings(Index.open("~/idx"), "~/idx-emb").rows   # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", hint=f"pass one of: {', '.join(DTYPES)}")
    if shard_size < 1:
        raise UsageError(f"shard size must be >= 1, got {shard_size}", hint="pass --shard-size 1 or more")
    target = check_export_target(out)
    t0 = time.monotonic()
    manifest = index.manifest
    dim = int(manifest["embed_dim"])
    store = index.store
    tell = progress or (lambda stage, done, total: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with store.snapshot():
            rows = sorted(store.file_rows().values(), key=lambda r: r.id)
            if not rows:
                raise EmptyIndexError(
                    f"the index at {index.dir} holds no images: nothing to export",
                    hint=f"index some first: `cocatk index PATH --index {index.dir}`",
                )
            captions = store.captions_for_ids([r.id for r in rows]) if store.caption_count() else None
            generation = store.generation
            roots = store.roots()
            columns = _export_columns(rows, captions)
            (tmp / "img_emb").mkdir(parents=True)
            (tmp / "metadata").mkdir()
            shards = math.ceil(len(rows) / shard_size)
            width = int(math.log10(shards)) + 1  # clip-retrieval's zero padding: sorted names are the row order
            tell("export", 0, len(rows))
            for k in range(shards):
                part = rows[k * shard_size : (k + 1) * shard_size]
                name = str(k).zfill(width)
                npy = tmp / "img_emb" / f"img_emb_{name}.npy"
                # Written through a memory map: a shard of a million 768-d rows never sits in memory whole.
                arr = np.lib.format.open_memmap(npy, mode="w+", dtype=np.dtype(DTYPES[dtype]), shape=(len(part), dim))
                for a in range(0, len(part), _BLOCK):
                    block = part[a : a + _BLOCK]
                    arr[a : a + len(block)] = store.embeddings([r.id for r in block], dim)
                    tell("export", k * shard_size + a + len(block), len(rows))
                arr.flush()
                del arr
                _fsync(npy)
                parquet = tmp / "metadata" / f"metadata_{name}.parquet"
                pq.write_table(pa.table(_metadata(part, captions, columns)), parquet)
                _fsync(parquet)
        record = {
            "format": FORMAT,
            "written_by": f"cocatk {__version__}",
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "index": json_path(str(index.dir)),
            "generation": generation,
            "model": manifest["model"],
            "pretrained": manifest["pretrained"],
            "identity": manifest["identity"],
            "embed_dim": dim,
            "normalized": True,
            "metric": "inner_product",
            "dtype": dtype,
            "count": len(rows),
            "shards": shards,
            "columns": columns,
            "precisions": manifest.get("precisions", []),
            "roots": [json_path(r) for r in roots],
        }
        (tmp / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        _fsync(tmp / RECORD_NAME)
        for folder in (tmp / "img_emb", tmp / "metadata", tmp):
            _fsync(folder)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        try:
            os.replace(tmp, target)  # over an empty folder too; a folder that filled up meanwhile refuses
        except OSError as e:
            raise UsageError(
                f"cannot move the export into {display_path(str(target))}: {e.strerror}",
                hint="pass a new folder for OUT (something else wrote there while exporting)",
            ) from e
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(
        out=str(target),
        rows=len(rows),
        shards=shards,
        dim=dim,
        dtype=dtype,
        captions=len(captions or {}),
        model=str(manifest["model"]),
        columns=columns,
        bytes=size,
        seconds=round(time.monotonic() - t0, 3),
    )


def _export_columns(rows: Sequence[FileRow], captions: dict[int, str] | None) -> list[str]:
    columns = ["image_path"]
    if any(not is_utf8(r.path) for r in rows):
        columns.append("image_path_b64")
    columns.append("id")
    if captions is not None:
        columns.append("caption")
    return [*columns, "size", "mtime_ns", "hash"]


def _metadata(rows: Sequence[FileRow], captions: dict[int, str] | None, columns: list[str]) -> dict[str, Any]:
    import pyarrow as pa

    data: dict[str, Any] = {
        "image_path": pa.array([text_path(r.path) for r in rows], pa.string()),
        "image_path_b64": pa.array([json_path(r.path).get("path_b64") for r in rows], pa.string()),
        "id": pa.array([r.id for r in rows], pa.int64()),
        "caption": pa.array([(captions or {}).get(r.id) for r in rows], pa.string()),
        "size": pa.array([r.size for r in rows], pa.int64()),
        "mtime_ns": pa.array([r.mtime_ns for r in rows], pa.int64()),
        "hash": pa.array([r.hash for r in rows], pa.string()),
    }
    return {c: data[c] for c in columns}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- reading a folder --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingShard:
    """One ``img_emb_N.npy`` and the ``metadata_N.parquet`` beside it."""

    npy: Path
    parquet: Path
    rows: int


@dataclass
class EmbeddingsFolder:
    """A clip-retrieval embeddings folder, checked: :func:`open_embeddings`."""

    root: Path
    shards: list[EmbeddingShard]
    dim: int
    dtype: str
    columns: list[str]
    #: cocatk's ``cocatk.json`` (model, identity, dim, roots), or None (clip-retrieval's own output).
    record: dict[str, Any] | None

    @property
    def count(self) -> int:
        return sum(s.rows for s in self.shards)


def open_embeddings(path: str | os.PathLike[str]) -> EmbeddingsFolder:
    """Check a clip-retrieval embeddings folder (``OUT`` with ``img_emb/`` and ``metadata/``): shards paired by
    sorted name as embedding-reader pairs them, the same row count on both sides, one dim, an ``image_path``
    column. Reads headers only.

    Raises:
        UsageError: not such a folder, or its files disagree (with what was expected and what was found).
    """
    import pyarrow.parquet as pq

    root = Path(path).expanduser().absolute()
    emb, meta = root / "img_emb", root / "metadata"
    if not emb.is_dir() or not meta.is_dir():
        raise UsageError(
            f"{display_path(str(root))} is not a clip-retrieval embeddings folder (no img_emb/ and metadata/ in it)",
            hint="pass the folder that `clip-retrieval inference --output_folder` or `cocatk export` wrote",
        )
    npys = sorted(emb.rglob("*.npy"), key=lambda p: str(p))
    parquets = sorted(meta.rglob("*.parquet"), key=lambda p: str(p))
    if not npys or len(npys) != len(parquets):
        raise UsageError(
            f"{display_path(str(root))} holds {len(npys)} img_emb .npy files and {len(parquets)} metadata .parquet "
            "files; an import needs one of each per shard",
            hint="pass a complete embeddings folder (an interrupted clip-retrieval run leaves some out)",
        )
    shards: list[EmbeddingShard] = []
    dim, dtype, columns = 0, "", []
    for npy, parquet in zip(npys, parquets, strict=True):
        arr = load_npy(npy)
        try:
            rows = pq.ParquetFile(parquet).metadata.num_rows
            names = list(pq.read_schema(parquet).names)
        except Exception as e:  # pyarrow's ArrowInvalid, OSError: a damaged or truncated file
            raise UsageError(f"cannot read {display_path(str(parquet))}: {e}", hint="pass an intact folder") from e
        if "image_path" not in names:
            raise UsageError(
                f"{display_path(str(parquet))} has no image_path column (it has {', '.join(names) or 'none'})",
                hint="an import keys every row by its image_path: pass metadata written with it",
            )
        if rows != arr.shape[0]:
            raise UsageError(
                f"{display_path(str(npy))} holds {arr.shape[0]} rows and {display_path(str(parquet))} {rows}",
                hint="each .npy and its .parquet must hold the same rows in the same order",
            )
        if not shards:
            dim, dtype, columns = int(arr.shape[1]), arr.dtype.name, names
        elif arr.shape[1] != dim:
            raise UsageError(
                f"{display_path(str(npy))} holds {arr.shape[1]}-d vectors, {display_path(str(npys[0]))} {dim}-d",
                hint="pass a folder of one model's embeddings",
            )
        shards.append(EmbeddingShard(npy, parquet, rows))
    record = _read_record(root, dim)
    return EmbeddingsFolder(root, shards, dim, dtype, columns, record)


def load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {display_path(str(path))}: {e}", hint="pass an intact folder") from e
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise UsageError(
            f"{display_path(str(path))} holds a {arr.dtype} array of shape {arr.shape}; expected (N, D) floats",
            hint="pass clip-retrieval's img_emb files (float16 or float32, one row per image)",
        )
    return arr


def _read_record(root: Path, dim: int) -> dict[str, Any] | None:
    path = root / RECORD_NAME
    if not path.is_file():
        return None
    hint = f"remove {RECORD_NAME} to import with only the dimension checked, or export again"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {display_path(str(path))}: {e}", hint=hint) from e
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("identity"), dict)
        and isinstance(record.get("model"), str)
        and isinstance(record.get("embed_dim"), int)
    )
    if not ok:
        raise UsageError(f"{display_path(str(path))} is not a cocatk export record", hint=hint)
    if record["embed_dim"] != dim:
        raise UsageError(
            f"{display_path(str(path))} records {record['embed_dim']}-d vectors; img_emb holds {dim}-d", hint=hint
        )
    return record


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "DTYPES",
    "FORMAT",
    "RECORD_NAME",
    "EmbeddingShard",
    "EmbeddingsFolder",
    "ExportReport",
    "check_export_target",
    "export_embeddings",
    "load_npy",
    "open_embeddings",
]
