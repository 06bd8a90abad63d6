"""`cocatk duplicates`: groups of exact and near-duplicate images with a suggested keeper (nothing is deleted)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..paths import display_path
from . import options
from .render import note, print_json, print_table, show_path


def register(app: typer.Typer) -> None:
    app.command("duplicates")(duplicates)


def duplicates(
    index_dir: options.IndexDir = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            "-t",
            help="Cosine similarity in (0, 1] at or above which two images are near-duplicates (lower groups more).",
            show_default="per model: 0.99 demo, 0.999 random weights, 0.95 others",
        ),
    ] = None,
    under: Annotated[Path | None, typer.Option("--under", help="Only images below this folder.")] = None,
    json_: options.Json = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write an HTML page with each group side by side, keeper marked.")
    ] = None,
) -> None:
    """Find exact copies (same content) and near-duplicates (similar embeddings); suggest a keeper per group.

    The keeper is the largest resolution, then the oldest date (EXIF DateTimeOriginal, else mtime). Nothing is ever
    deleted or moved.
    """
    from ..errors import UsageError
    from ..retrieval.duplicates import check_threshold
    from ..retrieval.index import Index

    if json_ and html is not None:
        raise UsageError("--json and --html cannot be combined", hint="pass one of them")
    if threshold is not None:
        check_threshold(threshold)  # before the index is opened
    target = None
    if html is not None:
        from ..retrieval.gallery import check_target

        target = check_target(html)
    with Index.open(index_dir) as ix:
        report = ix.duplicates(threshold=threshold, under=under)
    if json_:
        print_json(report.to_dict())
        return
    summary = (
        f"{len(report.groups)} groups, {report.files_in_groups} of {report.files} images, "
        f"{report.reclaimable_bytes / 1e6:.1f} MB beside the keepers (threshold {report.threshold:g}, "
        f"{report.threshold_source}; {report.seconds:.2f} s). Nothing was deleted."
    )
    if target is not None:
        from ..retrieval.duplicates import gallery_sections
        from ..retrieval.gallery import write_gallery

        written = write_gallery(
            target,
            "cocatk duplicates",
            gallery_sections(report),
            footer=summary,
            meta={
                "index": report.index_dir,
                "model": report.model,
                "threshold": f"{report.threshold:g} ({report.threshold_source})",
                "under": report.under or "-",
            },
        )
        note(f"wrote {display_path(str(written))}: {summary}")
        return
    if not report.groups:
        note(f"no duplicates among {report.files} images at threshold {report.threshold:g}")
        return
    from rich.table import Table

    table = Table("group", "kind", "keep", "path", "size", "resolution", "date", "similarity", show_lines=False)
    for g in report.groups:
        for f in g.files:
            table.add_row(
                str(g.number),
                g.kind,
                "keep" if f.keeper else "",
                show_path(f.path),
                f"{f.size / 1e3:.1f} kB",
                f"{f.width}x{f.height}" if f.width else "?",
                f.date or "?",
                f"{f.similarity:.3f}",
            )
    print_table(table)
    note(summary)
