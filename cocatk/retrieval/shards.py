"""Dataset sources as roots of an index: which items to read, and what to record once they are committed.

The updater hands its shard roots (``cocatk index shards/{00000..00127}.tar``, ``data/*.parquet``, the Arrow files
of ``hf:PATH``) to :func:`plan` before it decides what to encode. A shard recorded done with the size and mtime it
has now is not opened at all: its items are kept as they are. Every other shard is scanned
(:func:`cocatk.sources.scan_source`: a tar's headers and small text and JSON fields, a table's rows); its items join
the files found by the folder scan with identity ``shard#key`` (``file.parquet#ROW``), size the image's, and mtime
the shard's, so the updater's own rules (new, changed, unchanged, moved, copied, failed, resume) apply to
them unchanged. :func:`record` writes an item's location, JSON field and caption beside its row, in the same
transaction; :func:`finish` marks the shards read whole as done, in the final checkpoint, and records a damaged shard
as one failure. A run killed before that checkpoint scans its shards again and finds the items it committed
unchanged: each item is encoded exactly once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..sources import Columns, Member, ShardScan, is_shard, item_identity, scan_source
from . import sourcestore
from .layout import ProgressCallback

if TYPE_CHECKING:  # pragma: no cover
    from .report import IndexReport
    from .store import Store

#: Seconds between progress reports while shards are scanned.
_PROGRESS_INTERVAL_S = 0.2


@dataclass
class ShardPlan:
    """What the shard roots of one update hold; see the module docstring."""

    #: (identity, size, mtime_ns) of the items of the shards scanned in this run.
    found: list[tuple[str, int, int]] = field(default_factory=list)
    #: identity -> (shard, member) for those items.
    members: dict[str, tuple[str, Member]] = field(default_factory=dict)
    #: Identities of the items of shards already done (not opened): present, unchanged.
    kept: set[str] = field(default_factory=set)
    #: Every stored item identity (of any shard), and those of this run's shard roots.
    all_members: set[str] = field(default_factory=set)
    owned: set[str] = field(default_factory=set)
    #: Shards read whole in this run (recorded done by :func:`finish`) and shards that stopped early.
    complete: list[ShardScan] = field(default_factory=list)
    damaged: list[ShardScan] = field(default_factory=list)
    skipped_shards: int = 0


def shard_roots(roots: Sequence[str]) -> list[str]:
    return [r for r in roots if is_shard(r)]


def plan(
    store: Store,
    roots: Sequence[str],
    image_fields: Sequence[str],
    progress: ProgressCallback | None = None,
    columns: Columns | None = None,
) -> ShardPlan:
    """Scan the shards among ``roots`` that are not recorded done as they are now (see the module docstring):
    tar shards by ``image_fields``, tables by ``columns``.

    Raises:
        OSError: a shard cannot be opened (the caller checked that it exists). UsageError, DatasetError: a table
            has not the columns named (before anything is written).
    """
    out = ShardPlan()
    shards = shard_roots(roots)
    if not shards:
        return out
    by_shard: dict[str, set[str]] = {}  # one query for every stored item, not one per shard
    for path, shard in sourcestore.member_sources(store).items():
        by_shard.setdefault(shard, set()).add(path)
    out.all_members = set().union(*by_shard.values())
    done = sourcestore.done_sources(store)
    last = time.monotonic()
    for n, shard in enumerate(shards, 1):
        st = os.stat(shard)
        record = done.get(shard)
        if record is not None and record[:2] == (st.st_size, st.st_mtime_ns):
            out.skipped_shards += 1
            out.kept |= by_shard.get(shard, set())
        else:
            scan = scan_source(shard, image_fields, columns)
            for m in scan.members:
                identity = item_identity(shard, m.key)
                out.found.append((identity, m.size, scan.mtime_ns))
                out.members[identity] = (shard, m)
            (out.damaged if scan.error else out.complete).append(scan)
        if progress is not None and (time.monotonic() - last >= _PROGRESS_INTERVAL_S or n == len(shards)):
            last = time.monotonic()
            progress("shards", n, len(shards))
    out.owned = set().union(*(by_shard.get(shard, set()) for shard in shards))
    return out


def record(store: Store, file_id: int, item: tuple[str, Member], content_hash: str) -> None:
    """Write where row ``file_id`` lies in its shard, its JSON field and its caption (in the open transaction)."""
    shard, member = item
    sourcestore.put_member(store, file_id, shard, member)
    if member.text:
        store.ensure_caption_config(sourcestore.DATASET_CAPTIONS, sourcestore.DATASET_CAPTION_SETTINGS)
        store.put_caption(file_id, sourcestore.DATASET_CAPTIONS, content_hash, member.text, None)


def finish(store: Store, shard_plan: ShardPlan, report: IndexReport) -> None:
    """Mark the shards read whole as done and record each damaged shard (and each sample without an image) as a
    failure (in the final transaction)."""
    for scan in shard_plan.complete + shard_plan.damaged:
        for key, why in scan.skipped:
            _fail(store, report, item_identity(scan.path, key), "no image" if "no image" in why else "duplicate",
                  why, scan)  # fmt: skip
    for scan in shard_plan.complete:
        sourcestore.mark_done(store, scan.path, scan.kind, scan.size, scan.mtime_ns, len(scan.members))
    for scan in shard_plan.damaged:
        sourcestore.forget_done(store, [scan.path])
        _fail(store, report, scan.path, "truncated", f"{scan.error}; {len(scan.members)} items before it", scan)


def _fail(store: Store, report: IndexReport, path: str, reason: str, detail: str, scan: ShardScan) -> None:
    store.record_failure(path, reason, detail, scan.size, scan.mtime_ns)
    report.failed[reason] = report.failed.get(reason, 0) + 1
    report.failures.append({"path": path, "reason": reason, "detail": detail})


__all__ = ["ShardPlan", "finish", "plan", "record", "shard_roots"]
