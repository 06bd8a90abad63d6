"""Duplicate and near-duplicate images in an index: groups, facts about each file, and a suggested keeper.

Two files belong to one group when they hold the same content (same SHA-256, an exact copy) or when their embeddings
have a cosine similarity at or above a threshold (a near-duplicate: resized, recompressed, cropped, rotated, colour
adjusted). Groups are the connected components of that graph, so A~B and B~C put A, B and C in one group.

The pairs come from one exact range search over the stored embeddings (one vector per distinct content: exact copies
share an embedding, so they are searched once), blocked matrix products over the upper triangle; the components from
a union-find in numpy. Nothing on disk is deleted or moved: the result is a list, with a *keeper* suggested per group
(largest resolution, then oldest date, then lowest id).

The default threshold depends on the model (see :data:`DEFAULT_THRESHOLDS` and the README table "cocatk duplicates"
for the measurement behind each value).

Example:
    >>> from cocatk import Index
    >>> report = Index.open().duplicates(threshold=0.95)                      # doctest: +SKIP
    >>> [(g.kind, g.keeper.path, len(g.files)) for g in report.groups]        # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EmptyIndexError, UsageError
from ..paths import display_path, json_path, text_path

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder

#: Default threshold per kind of weights, measured on the generated near-duplicate set of
#: ``benchmarks/bench_duplicates.py`` (README, "cocatk duplicates"): the lowest threshold whose pair precision is 1.0
#: there. ``random`` is any ``--pretrained none`` model, ``demo`` the ``demo`` preset.
DEFAULT_THRESHOLDS: dict[str, float] = {"demo": 0.99, "random": 0.999}
#: Real CoCa weights (coca-b32, coca-l14, ...): not measured offline (no weights here); a strict value, because a
#: loose one groups thousands of distinct photos (immich users' reports). Pass --threshold to loosen it.
FALLBACK_THRESHOLD = 0.95
#: Rows per block of the similarity matrix: 512 x 100k x 4 bytes = 200 MB at most.
_BLOCK = 512
#: EXIF tags: the Exif sub-IFD, DateTimeOriginal inside it, and DateTime in IFD0.
_EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME = 0x8769, 36867, 306


@dataclass
class DuplicateFile:
    """One file of a group. ``similarity`` is its cosine with the keeper (1.0 for the keeper and exact copies)."""

    id: int
    path: str
    size: int
    width: int | None
    height: int | None
    date: str | None
    date_source: str  # "exif" (DateTimeOriginal), "mtime", or "none" (file gone)
    hash: str
    similarity: float = 1.0
    keeper: bool = False
    _timestamp: float = field(default=math.inf, repr=False)

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    # The gallery's hit protocol (rank, similarity, loglik) so a group renders like search results.
    rank: int = 0
    loglik: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            **json_path(self.path),
            "size": self.size,
            "width": self.width,
            "height": self.height,
            "date": self.date,
            "date_source": self.date_source,
            "hash": self.hash,
            "similarity": round(float(self.similarity), 4),
            "keeper": self.keeper,
        }


@dataclass
class DuplicateGroup:
    """Files that are copies (``kind == "exact"``: one content hash) or near-duplicates (``"near"``) of each other.

    ``files`` starts with the keeper; the others follow by decreasing similarity to it.
    """

    number: int
    kind: str
    files: list[DuplicateFile]

    @property
    def keeper(self) -> DuplicateFile:
        return self.files[0]

    @property
    def reclaimable_bytes(self) -> int:
        """Bytes the files other than the keeper take."""
        return sum(f.size for f in self.files[1:])

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.number,
            "kind": self.kind,
            "keeper": self.keeper.id,
            "reclaimable_bytes": self.reclaimable_bytes,
            "files": [f.to_dict() for f in self.files],
        }


@dataclass
class DuplicateReport:
    """What :func:`find_duplicates` found. ``to_dict()`` is the JSON ``cocatk duplicates --json`` prints."""

    index_dir: str
    model: str
    threshold: float
    threshold_source: str
    under: str | None
    files: int
    pairs: int
    groups: list[DuplicateGroup]
    seconds: float
    timings: dict[str, float]

    @property
    def files_in_groups(self) -> int:
        return sum(len(g.files) for g in self.groups)

    @property
    def reclaimable_bytes(self) -> int:
        return sum(g.reclaimable_bytes for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index_dir": text_path(self.index_dir),
            "model": self.model,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "under": text_path(self.under) if self.under else None,
            "files": self.files,
            "pairs": self.pairs,
            "files_in_groups": self.files_in_groups,
            "reclaimable_bytes": self.reclaimable_bytes,
            "seconds": round(self.seconds, 3),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "groups": [g.to_dict() for g in self.groups],
        }


# ---- threshold ---------------------------------------------------------------------------------------------------
def check_threshold(threshold: float) -> float:
    """``threshold`` as a float in (0, 1]; UsageError otherwise."""
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        t = math.nan
    if not (0.0 < t <= 1.0):  # also refuses NaN
        raise UsageError(
            f"--threshold must be in (0, 1], got {threshold}",
            hint="pass a cosine similarity such as 0.95 (1 = identical embeddings; lower groups more files)",
        )
    return t


def default_threshold(manifest: dict[str, Any]) -> tuple[float, str]:
    """The default threshold for the model of an index manifest, and where it comes from (one phrase)."""
    identity = manifest.get("identity") or {}
    weights = str(identity.get("weights", ""))
    if weights.startswith("random:"):
        return DEFAULT_THRESHOLDS["random"], "default for random weights (measured)"
    if identity.get("model") == "demo":
        return DEFAULT_THRESHOLDS["demo"], "default for the demo model (measured)"
    return FALLBACK_THRESHOLD, "default (strict; not measured for this model)"


# ---- pairs and groups (pure numpy / faiss) -------------------------------------------------------------------------
def similar_pairs(vectors: np.ndarray, threshold: float, block: int = _BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs ``(i, j)``, ``i < j``, whose inner product is at least ``threshold``: an exact range search.

    Blocks of ``block`` query rows are multiplied with the rows at and after them (one BLAS call per block: the upper
    triangle of the similarity matrix, never the whole matrix). Measured on 2 cores at 20k x 512-d this is 4x faster
    than ``faiss.IndexFlatIP.range_search`` over the same vectors (6.5 s against 28 s), with the same pairs.

    Args:
        vectors: (N, D) float32, L2-normalised (inner product == cosine).
        threshold: the similarity at or above which two rows pair.
        block: query rows per block (memory: ``block * N * 4`` bytes).

    Returns:
        Two int64 arrays of equal length.
    """
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(x)
    t = np.float32(threshold)
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n, block):
        sims = x[start : start + block] @ x[start:].T
        a, b = np.nonzero(sims >= t)
        keep = b > a  # column b is row start + b; row a is start + a: strictly above the diagonal
        out_i.append(a[keep].astype(np.int64) + start)
        out_j.append(b[keep].astype(np.int64) + start)
    return np.concatenate(out_i), np.concatenate(out_j)


def connected_components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label (the smallest member) of each of ``n`` nodes, given undirected edges ``i[k]--j[k]``."""
    labels = np.arange(n, dtype=np.int64)
    if len(i) == 0:
        return labels
    while True:
        # Hook every edge's larger label onto its smaller one, then jump pointers until every node names its root.
        li, lj = labels[i], labels[j]
        lo, hi = np.minimum(li, lj), np.maximum(li, lj)
        before = labels.copy()
        np.minimum.at(labels, hi, lo)
        while True:
            nxt = labels[labels]
            if np.array_equal(nxt, labels):
                break
            labels = nxt
        if np.array_equal(labels, before):
            return labels


def group_rows(hashes: list[str], vectors: np.ndarray, threshold: float) -> tuple[list[np.ndarray], int]:
    """Groups of row indices (each of two or more rows) and the number of near pairs between distinct contents.

    Rows with the same hash are one node (their embeddings are equal); nodes pair when their similarity is at least
    ``threshold``. Groups are sorted by their smallest row.
    """
    n = len(hashes)
    uniq: dict[str, int] = {}
    node_of = np.fromiter((uniq.setdefault(h, len(uniq)) for h in hashes), dtype=np.int64, count=n)
    first = np.full(len(uniq), -1, dtype=np.int64)
    first[node_of[::-1]] = np.arange(n - 1, -1, -1)  # the first row of each content
    pi, pj = similar_pairs(vectors[first], threshold)
    comp = connected_components(len(uniq), pi, pj)[node_of]  # a component label per row
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    groups = [g for g in np.split(order, bounds) if len(g) > 1]
    groups.sort(key=lambda g: int(g[0]))
    return groups, int(len(pi))


# ---- file facts -----------------------------------------------------------------------------------------------------
def image_facts(path: str) -> tuple[int | None, int | None, str | None, str, float]:
    """(width, height, date, date source, timestamp) of an image file: the EXIF DateTimeOriginal when present, else
    the file's mtime; the size as stored (before EXIF rotation: the pixel count is the same)."""
    from PIL import Image

    width = height = None
    date = None
    source = "none"
    ts = math.inf
    try:
        with Image.open(path) as im:
            width, height = im.size
            exif = im.getexif()
            raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
        if raw:
            dt = datetime.strptime(str(raw).strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
            date, source, ts = dt.isoformat(sep=" "), "exif", dt.timestamp()
    except Exception:  # unreadable, gone, or a malformed EXIF date: fall back to what the filesystem says
        pass
    if source == "none":
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return width, height, None, "none", math.inf
        date = datetime.fromtimestamp(mtime).isoformat(sep=" ", timespec="seconds")
        source, ts = "mtime", mtime
    return width, height, date, source, ts


def _keeper_key(f: DuplicateFile) -> tuple[int, float, int]:
    # Largest resolution first, then the oldest date, then the lowest id (the first indexed).
    return (-f.pixels, f._timestamp, f.id)


# ---- the whole search -----------------------------------------------------------------------------------------------
def find_duplicates(
    index: IndexFolder, threshold: float | None = None, under: str | os.PathLike[str] | None = None
) -> DuplicateReport:
    """Groups of exact and near-duplicate images in ``index``, each with a suggested keeper. Nothing is deleted.

    Args:
        index: an open :class:`~cocatk.retrieval.index.Index`.
        threshold: cosine similarity in (0, 1] at or above which two images are near-duplicates; None: the default
            for the index's model (:func:`default_threshold`).
        under: only files below this folder (both files of a pair).

    Raises:
        UsageError: threshold outside (0, 1]; ``under`` is not a folder or holds no indexed image.
        EmptyIndexError: the index holds no images.
    """
    t0 = time.monotonic()
    if threshold is not None:
        threshold = check_threshold(threshold)
    if index.is_empty:
        raise EmptyIndexError(
            f"the index at {display_path(str(index.dir))} holds no images",
            hint=f"add some first: `cocatk index PATH --index {display_path(str(index.dir))}`",
        )
    manifest = index.manifest
    if threshold is None:
        threshold, source = default_threshold(manifest)
    else:
        source = "given"
    under_str = None
    timings: dict[str, float] = {}
    t = time.monotonic()
    ids, vecs = index.store.all_embeddings(int(manifest["embed_dim"]))
    if under is not None:
        root = Path(under).expanduser().resolve()
        if not root.is_dir():
            raise UsageError(f"--under {display_path(os.fspath(under))}: no such folder", hint="pass a folder")
        under_str = str(root)
        keep = np.isin(ids, index.store.ids_under(under_str))
        if not keep.any():
            raise UsageError(
                f"no indexed images under {display_path(under_str)}",
                hint=f"check the folder (`cocatk info` lists the roots), or index it: `cocatk index {under_str}`",
            )
        ids, vecs = ids[keep], vecs[keep]
    hashes = index.store.hashes_for_ids(ids.tolist())
    timings["load"] = time.monotonic() - t
    t = time.monotonic()
    groups_rows, pairs = group_rows([h or f"?{i}" for i, h in zip(ids.tolist(), hashes, strict=True)], vecs, threshold)
    timings["range_search_and_grouping"] = time.monotonic() - t

    t = time.monotonic()
    groups: list[DuplicateGroup] = []
    member_ids = [int(ids[r]) for rows in groups_rows for r in rows]
    paths = dict(zip(member_ids, index.store.paths_for_ids(member_ids), strict=True))
    sizes = index.store.sizes_for_ids(member_ids)
    for number, rows in enumerate(groups_rows, start=1):
        files = []
        for r in rows:
            fid = int(ids[r])
            path = paths[fid] or ""
            width, height, date, dsource, ts = image_facts(path)
            files.append(
                DuplicateFile(
                    fid, path, sizes.get(fid, 0), width, height, date, dsource, hashes[r] or "", _timestamp=ts
                )
            )
        keeper_row = rows[min(range(len(rows)), key=lambda k: _keeper_key(files[k]))]
        sims = vecs[rows] @ vecs[keeper_row]
        for f, s in zip(files, sims.tolist(), strict=True):
            f.similarity = 1.0 if f.hash == hashes[keeper_row] else min(1.0, float(s))
        files.sort(key=lambda f: (f.id != int(ids[keeper_row]), -f.similarity, f.id))
        files[0].keeper = True
        for rank, f in enumerate(files, start=1):
            f.rank = rank
        kind = "exact" if len({f.hash for f in files}) == 1 else "near"
        groups.append(DuplicateGroup(number, kind, files))
    timings["file_facts"] = time.monotonic() - t
    return DuplicateReport(
        index_dir=str(index.dir),
        model=str(manifest.get("model")),
        threshold=float(threshold),
        threshold_source=source,
        under=under_str,
        files=len(ids),
        pairs=pairs,
        groups=groups,
        seconds=time.monotonic() - t0,
        timings=timings,
    )


def gallery_sections(report: DuplicateReport) -> list[Any]:
    """One :class:`~cocatk.retrieval.gallery.GallerySection` per group, the keeper first and marked."""
    from .gallery import GallerySection

    sections = []
    for g in report.groups:
        k = g.keeper
        res = f"{k.width}x{k.height}" if k.width else "unknown size"
        sections.append(
            GallerySection(
                title=f"group {g.number}: {len(g.files)} {g.kind} duplicates",
                hits=g.files,
                subtitle=f"keep #1 {display_path(os.path.basename(k.path))} ({res}, {k.date or 'no date'}); "
                f"the others take {g.reclaimable_bytes / 1e6:.2f} MB. Nothing was deleted.",
                marked={k.id},
            )
        )
    return sections


__all__ = [
    "DEFAULT_THRESHOLDS",
    "FALLBACK_THRESHOLD",
    "DuplicateFile",
    "DuplicateGroup",
    "DuplicateReport",
    "check_threshold",
    "connected_components",
    "default_threshold",
    "find_duplicates",
    "gallery_sections",
    "group_rows",
    "image_facts",
    "similar_pairs",
]
