"""One ``cocatk index`` run on an open index: the update (:mod:`.updater`), the captions it asks for
(:mod:`.captions`), then the exports that let later cold queries run without torch (:mod:`cocatk.models.onnx`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import config
from .layout import ProgressCallback
from .updater import IndexReport, UpdateOptions, update_index

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder


def run_update(index: IndexFolder, options: UpdateOptions) -> IndexReport:
    """:meth:`Index.update <cocatk.retrieval.index.Index.update>`: one update under the writer lock, then the
    captions of unchanged files when ``options.caption`` asks, then the exports for cold queries."""
    with index.writer_lock():
        report = update_index(index, options)
        if options.caption is not None and not index.is_empty:
            from .captions import caption_index

            rest = caption_index(index, options.caption, progress=options.progress)  # unchanged, moved or copied
            report.captioned += rest.captioned
    if options.encoder is None:  # a Ray run's driver holds no model: its next local run exports
        export_for_queries(index, report, options.progress)
    return report


def export_for_queries(index: IndexFolder, report: IndexReport, progress: ProgressCallback | None) -> None:
    """Export the model's text tower for torch-free text queries (:mod:`cocatk.models.onnx`) unless that was done
    (or found impossible) before for this model; loads the model when this run did not need it. A failure is a
    warning on the report: the index is complete, text queries keep the torch path."""
    from ..errors import CocatkError
    from ..models import onnx

    if not config.text_onnx_enabled() or index.is_empty or not onnx.available():
        return
    identity = index.manifest["identity"]
    if not onnx.needs_export(identity):
        return
    t0 = time.perf_counter()
    if progress is not None:
        progress("text-onnx", 0, None)
    try:
        done = onnx.export_text_onnx(index.model, identity)
        report.text_export = "exported" if done is not None else None  # None: a model it cannot export
    except CocatkError as e:  # the export's, or the model's when this run had to load it
        report.warnings.append(f"{e.message}; text queries load torch")
        report.text_export = "failed"
    report.timings["text_onnx"] = round(time.perf_counter() - t0, 3)  # after the run: not part of `seconds`


__all__ = ["export_for_queries", "run_update"]
