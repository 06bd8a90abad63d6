"""``cocatk tag``: zero-shot tags for every indexed image from its stored embedding, and XMP sidecars with them.

:func:`tag_index` scores every stored embedding against a vocabulary (:mod:`cocatk.zeroshot.tagging`: each label on
its own against a neutral prompt; the label embeddings cached as ``zeroshot``'s classifiers are) and stores the tags
under a settings key, in one transaction: no image is decoded again. :func:`write_sidecars` merges them, and the
image's caption, into XMP sidecars through ExifTool (:mod:`cocatk.sidecars`): the user's keywords stay, cocatk's
tags go under one hierarchical root (``cocatk|...``), and every sidecar written is recorded (what was added, the bytes
found there), so :func:`remove_sidecars` undoes it: the sidecar as it was, byte for byte, or gone when cocatk made it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import EmptyIndexError, UsageError
from . import tagstore
from .layout import ProgressCallback

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder

#: The root of cocatk's hierarchical tags in a sidecar (``lr:hierarchicalSubject``): removable as one set.
XMP_ROOT = "cocatk"


@dataclass
class TagReport:
    """What one ``cocatk tag`` run did."""

    index_dir: str
    key: str
    settings: dict[str, Any]
    images: int = 0
    tagged: int = 0  # images with at least one tag
    tags: int = 0
    classifier_from_cache: bool = False
    top: list[dict[str, Any]] = field(default_factory=list)  # the most common labels: {label, path, images}
    seconds: dict[str, float] = field(default_factory=dict)  # text, score, store, total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tag_index(
    index: IndexFolder,
    vocabulary: str | None = None,
    *,
    threshold: float | None = None,
    max_tags: int | None = None,
    templates: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
) -> TagReport:
    """Tag every image of ``index`` from its stored embedding, and store the tags (replacing those of the same
    settings).

    Args:
        vocabulary: a built-in vocabulary name (``openimages``; None or ``builtin``: the default) or a file.
        threshold, max_tags: the rule (:class:`cocatk.zeroshot.tagging.TagRule`; defaults 0.5 and 10).
        templates: prompts per label (default :data:`cocatk.zeroshot.tagging.TAG_TEMPLATES`).
        progress: ``progress(stage, done, total)``: ``"text"`` (labels embedded), ``"tag"``.

    Raises:
        EmptyIndexError: nothing is indexed. UsageError: a bad vocabulary or rule. IndexBusyError: another writer.
    """
    from ..zeroshot.tagging import (
        DEFAULT_MAX_TAGS,
        DEFAULT_THRESHOLD,
        TAG_TEMPLATES,
        Tagger,
        TagRule,
        load_vocabulary,
        settings_key,
    )

    t0 = time.monotonic()
    report_progress = progress or (lambda stage, done, total: None)
    rule = TagRule(DEFAULT_THRESHOLD if threshold is None else threshold,
                   DEFAULT_MAX_TAGS if max_tags is None else max_tags)  # fmt: skip
    vocab = load_vocabulary(vocabulary)
    with index.writer_lock():
        if index.is_empty:
            raise EmptyIndexError(f"the index at {index.dir} holds no images", hint="run `cocatk index PATH` first")
        prompts = list(templates or TAG_TEMPLATES)
        tagger = Tagger.cached(index.manifest["identity"], index.dim, vocab, prompts)  # no model load when cached
        if tagger is None:
            tagger = Tagger.build(index.model, vocab, prompts, progress=lambda s, d, t: report_progress("text", d, t))
        t_text = time.monotonic()
        settings = tagger.settings(rule)
        key = settings_key(settings)
        rows = sorted(index.store.file_rows().values(), key=lambda r: r.id)
        report = TagReport(index_dir=str(index.dir), key=key, settings=settings, images=len(rows),
                           classifier_from_cache=tagger.from_cache)  # fmt: skip
        report_progress("tag", 0, len(rows))
        emb = index.embeddings([r.id for r in rows])
        found = tagger.tags(emb, rule)
        t_score = time.monotonic()
        labels = vocab.labels
        out = [(r.id, labels[j].name, labels[j].hierarchical, p, r.hash) for r, tags in zip(rows, found, strict=True)
               for j, p in tags]  # fmt: skip
        store = index.store
        store.begin()
        try:
            tagstore.ensure_config(store, key, settings)
            report.tags = tagstore.replace_tags(store, key, out)
            store.commit()
        except BaseException:
            store.rollback()
            raise
        report_progress("tag", len(rows), len(rows))
        report.tagged = sum(1 for tags in found if tags)
        counts = tagstore.label_counts(store, key)[:20]
        report.top = [{"label": lab, "path": path, "images": n} for lab, path, n in counts]
    t_end = time.monotonic()
    report.seconds = {"text": round(t_text - t0, 3), "score": round(t_score - t_text, 3),
                      "store": round(t_end - t_score, 3), "total": round(t_end - t0, 3)}  # fmt: skip
    return report


# ---- sidecars -----------------------------------------------------------------------------------------------
@dataclass
class SidecarReport:
    """What writing (or removing) sidecars did: counts per outcome, and the files skipped with why."""

    index_dir: str
    key: str | None
    style: str = "digikam"
    outcomes: dict[str, int] = field(default_factory=dict)  # created, merged, unchanged / restored, deleted, ...
    descriptions: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {path, reason}
    seconds: float = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_sidecars(
    index: IndexFolder,
    *,
    key: str | None = None,
    style: str = "digikam",
    captions: bool = True,
    overwrite_description: bool = False,
    progress: ProgressCallback | None = None,
) -> SidecarReport:
    """Merge each image's current tags (settings ``key``, default the latest) and caption into its XMP sidecar.

    A sidecar cocatk wrote before is first put back as it was (see :func:`remove_sidecars`), so the ``cocatk|`` set
    is exactly the current tags; one that holds them already, untouched since, is left alone. Each sidecar's record
    commits before its bytes land. Dataset items (no file of their own) and files whose sidecar cannot be written
    are reported in ``skipped``; nothing else is touched.

    Raises:
        UsageError: no tags yet, a bad style. SidecarError: ExifTool is missing (the hint says how to install it).
    """
    from ..sidecars import SidecarRecord, SidecarWriteError, SidecarWriter, sidecar_path

    t0 = time.monotonic()
    report_progress = progress or (lambda stage, done, total: None)
    with index.writer_lock():
        store = index.store
        key = key or tagstore.latest_config(store)
        if key is None:
            raise UsageError("this index has no tags yet", hint="run `cocatk tag` first (without --write-xmp)")
        sidecar_path("x.jpg", style)  # a bad style fails before any sidecar is read
        report = SidecarReport(index_dir=str(index.dir), key=key, style=style)
        rows = sorted(store.file_rows().values(), key=lambda r: r.id)
        ids = [r.id for r in rows]
        tags = tagstore.tags_for_ids(store, ids, key)
        caps = _captions(index, ids) if captions else {}
        items = {int(i) for i, s in zip(ids, index.item_sources(ids, [r.path for r in rows]), strict=True)
                 if not isinstance(s, str)}  # fmt: skip
        known = tagstore.sidecars(store)
        report_progress("sidecars", 0, len(rows))
        with SidecarWriter() as writer:
            for n, row in enumerate(rows, 1):
                report_progress("sidecars", n, len(rows))
                if row.id in items:
                    report.skipped.append({"path": row.path, "reason": "a dataset item: it has no file to sit beside"})
                    continue
                if not os.path.isfile(row.path):
                    report.skipped.append({"path": row.path, "reason": "the image is gone from disk"})
                    continue
                target = str(sidecar_path(row.path, style))
                mine = tags.get(row.id, [])
                subjects = [t["label"] for t in mine]
                hierarchical = [f"{XMP_ROOT}|{t['path']}" for t in mine]
                description = caps.get(row.id)
                before = known.get(target)
                touched = recorded = False  # the sidecar was put back; this write's record committed

                def record(result: Any, target: str = target, path: str = row.path) -> None:
                    nonlocal recorded
                    store.begin()
                    tagstore.put_sidecar(store, target, path, key, result.record().to_json())
                    store.commit()
                    recorded = True

                try:
                    if before is not None:
                        rec = SidecarRecord.from_json(before[2])
                        if writer.unchanged_since(target, rec) and _holds(
                            rec, subjects, hierarchical, description,
                            blocked=lambda image=row.path: not overwrite_description
                            and writer.existing_description(image) is not None,
                        ):  # fmt: skip
                            report.count("unchanged")
                            continue
                        writer.remove_tags(target, rec)  # back to as it was, then written again
                        touched = True
                    if not subjects and not description:
                        _forget_record(store, target, before is not None)
                        report.count("nothing to write")
                        continue
                    # The record commits before the bytes land (``before_write``): killed between the two, the
                    # next run finds a record whose undo changes nothing, never cocatk's tags unrecorded.
                    result = writer.write_tags(
                        row.path,
                        style=style,
                        subjects=subjects,
                        hierarchical=hierarchical,
                        description=description,
                        overwrite_description=overwrite_description,
                        before_write=record,
                    )
                except SidecarWriteError as e:
                    if touched or recorded:  # the sidecar is as it was before cocatk: no record of it stays
                        _forget_record(store, target, True)
                    report.skipped.append({"path": row.path, "reason": str(e)})
                    continue
                report.count("created" if result.created else "merged" if result.changed else "already there")
                report.descriptions += int(result.description_set)
                if not recorded:  # nothing needed writing (before_write not called): recorded all the same
                    record(result)
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _holds(rec: Any, subjects: list[str], hierarchical: list[str], description: str | None,
           blocked: Callable[[], bool]) -> bool:  # fmt: skip
    """Whether the recorded write put (or found) exactly these tags and this caption. A caption the write did not
    set still holds when ``blocked()``: the image has a description of its own (the user's), so writing again would
    not set it either."""
    had = {*rec.added_subjects, *rec.kept_subjects}
    had_h = {*rec.added_hierarchical, *rec.kept_hierarchical}
    ours = {h for h in had_h if h.startswith(XMP_ROOT + "|")}
    if not (had >= set(subjects) and ours == set(hierarchical)):
        return False
    if rec.description_set:
        return bool(rec.description == description)
    return description is None or blocked()


def _forget_record(store: Any, target: str, known: bool) -> None:
    if known:
        store.begin()
        tagstore.drop_sidecar(store, target)
        store.commit()


def remove_sidecars(index: IndexFolder, progress: ProgressCallback | None = None) -> SidecarReport:
    """Undo every sidecar cocatk wrote for this index: one it made is deleted, one it merged into gets its bytes
    back, one a user edited since loses only what cocatk added (see :func:`cocatk.sidecars.remove_tags`).

    Raises:
        SidecarError: ExifTool is missing.
    """
    from ..sidecars import SidecarRecord, SidecarWriteError, SidecarWriter

    t0 = time.monotonic()
    report_progress = progress or (lambda stage, done, total: None)
    with index.writer_lock():
        store = index.store
        known = tagstore.sidecars(store)
        report = SidecarReport(index_dir=str(index.dir), key=None)
        report_progress("sidecars", 0, len(known))
        with SidecarWriter() as writer:
            for n, (path, (image, _, record)) in enumerate(known.items(), 1):
                try:
                    outcome = writer.remove_tags(path, SidecarRecord.from_json(record))
                except SidecarWriteError as e:
                    report.skipped.append({"path": image, "reason": str(e)})
                    continue
                report.count(outcome)
                store.begin()
                tagstore.drop_sidecar(store, path)
                store.commit()
                report_progress("sidecars", n, len(known))
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _captions(index: IndexFolder, ids: Sequence[int]) -> dict[int, str]:
    """The generated caption of each id that has one (the dataset's own captions are not written)."""
    from .sourcestore import DATASET_CAPTIONS

    keys = [k for k in index.store.caption_configs() if k != DATASET_CAPTIONS]
    out: dict[int, str] = {}
    for k in keys:  # oldest first: the latest settings win
        out.update(index.store.captions_for_ids(ids, k))
    return out


__all__ = ["XMP_ROOT", "SidecarReport", "TagReport", "remove_sidecars", "tag_index", "write_sidecars"]
