"""Loading shared by both evaluation sets (:mod:`.captioned` for retrieval, :mod:`.labelled` for zero-shot).

- Hugging Face datasets from a ``save_to_disk`` folder or the local cache, never downloaded (:func:`load_saved`,
  :func:`load_cached`), with one rule for choosing a split (:func:`pick_split`).
- Image cells of such datasets (``{"bytes", "path"}``, a path, raw bytes or a decoded image) turned into RGB images
  by the caller's file decoder (:func:`decode_cell`); :func:`undecoded` keeps Arrow from decoding them itself.
- The image loop: :func:`iter_batches` decodes the next batch in a thread pool while the model encodes this one.

Everything here imports ``datasets`` and PIL inside the functions that need them.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DatasetError, UsageError
from ..sources import offline

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from PIL import Image


# ---- Hugging Face ------------------------------------------------------------------------------------------
def pick_split(ds: Any, split: str | None, what: str, prefer: Sequence[str]) -> tuple[Any, str | None]:
    """One split of a ``DatasetDict`` (``split``, else the first of ``prefer``, else the first one); a ``Dataset``
    is returned as it is.

    Raises:
        UsageError: ``split`` is not in the dict (the hint lists the splits). DatasetError: the dict is empty.
    """
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is not None:
            if split not in ds:
                raise UsageError(f"{what} has no split '{split}'", hint=f"use --split with one of: {', '.join(names)}")
            return ds[split], split
        for name in (*prefer, *names):
            if name in ds:
                return ds[name], name
        raise DatasetError(f"{what} has no splits", hint="save a dataset with at least one split")
    return ds, split


def load_cached(name: str, split: str | None, prefer: Sequence[str]) -> tuple[Any, str | None]:
    """A Hugging Face dataset from the local cache only, and the split used (see :func:`pick_split`)."""
    import datasets

    with offline():
        ds = datasets.load_dataset(name, split=split, download_config=datasets.DownloadConfig(local_files_only=True))
    return pick_split(ds, split, name, prefer)


def load_saved(path: Path, split: str | None, prefer: Sequence[str], what: str | None = None) -> tuple[Any, str | None]:
    """A ``Dataset`` or ``DatasetDict`` written by ``save_to_disk``, and the split used (see :func:`pick_split`).

    Raises:
        DatasetError: ``path`` is not such a folder.
    """
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(
            f"{path} is not a folder written by Dataset.save_to_disk: {e}",
            hint="save it with ds.save_to_disk(PATH) (a Dataset or a DatasetDict)",
        ) from e
    return pick_split(ds, split, what or str(path), prefer)


def undecoded(ds: Any, column: str) -> Any:
    """``ds`` with an ``Image`` column read as ``{"bytes", "path"}`` cells, so decoding happens in the worker
    threads (:func:`decode_cell`) rather than in Arrow's getter; other columns are left alone."""
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    return ds


def decode_cell(cell: Any, decode_file: Callable[[Any], Image.Image]) -> Image.Image:
    """An RGB image from a Hugging Face image cell: ``{"bytes", "path"}``, a path, raw encoded bytes, or an already
    decoded PIL image. Files and bytes go through ``decode_file`` (a path or a binary file object -> RGB image), so
    each evaluation keeps its own decoding protocol.

    Raises:
        ValueError: a cell of another kind; whatever ``decode_file`` raises.
    """
    from PIL import Image

    if isinstance(cell, Image.Image):
        return cell.convert("RGB")
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return decode_file(io.BytesIO(cell["bytes"]))
        if cell.get("path"):
            return decode_file(cell["path"])
    if isinstance(cell, bytes):
        return decode_file(io.BytesIO(cell))
    if isinstance(cell, str):
        return decode_file(cell)
    raise ValueError(f"unsupported image cell {type(cell).__name__}")


# ---- the image loop ----------------------------------------------------------------------------------------
def default_workers() -> int:
    """Decode threads when none are asked for: one per core, at most 8 (beyond that the model is the bottleneck)."""
    return max(1, min(8, os.cpu_count() or 1))


def iter_batches(
    indices: np.ndarray,
    fetch: Callable[[list[int]], Sequence[Any]],
    load: Callable[[Any], Any],
    batch_size: int,
    workers: int,
    *,
    skip_failures: bool = True,
) -> Iterator[tuple[np.ndarray, list[Any], list[str]]]:
    """Yield ``(indices, loaded items, failures)`` per batch; loading runs ahead in a thread pool.

    Two batches are in flight so the pool decodes batch i+1 while the model encodes batch i.

    Args:
        indices: the items to load, in order (int64).
        fetch: indices -> raw items (paths, cells, ...); called from the calling thread.
        load: raw item -> what the caller wants (an image, a preprocessed tensor); thread-safe.
        workers: loading threads (0: load in the calling thread).
        skip_failures: a failing item is left out of its batch and reported as ``"what: Error: message"`` in
            ``failures``; False lets the first exception propagate (for sets where every item is needed).
    """

    def guarded(raw: Any) -> Any:
        try:
            return load(raw)
        except Exception as e:  # a bad file is skipped and counted, never fatal
            return f"{raw if isinstance(raw, (str, Path)) else 'image'}: {type(e).__name__}: {e}"

    work = guarded if skip_failures else load
    starts = iter(range(0, len(indices), batch_size))
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None

    def submit(start: int) -> tuple[np.ndarray, list[Future[Any] | Any]]:
        idx = indices[start : start + batch_size]
        raws = fetch(idx.tolist())
        return idx, [pool.submit(work, r) if pool else r for r in raws]

    try:
        pending: deque[tuple[np.ndarray, list[Any]]] = deque()
        for _ in range(2):
            s = next(starts, None)
            if s is not None:
                pending.append(submit(s))
        while pending:
            idx, items = pending.popleft()
            s = next(starts, None)
            if s is not None:
                pending.append(submit(s))
            results = [f.result() if pool else work(f) for f in items]
            if not skip_failures:
                yield idx, results, []
                continue
            keep = [i for i, r in enumerate(results) if not isinstance(r, str)]
            failures = [r for r in results if isinstance(r, str)]
            yield idx[keep], [results[i] for i in keep], failures
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
