"""`cocatk tag`: zero-shot tags for every indexed image, and XMP sidecars that photo managers read."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from . import options
from .progress import progress_bar
from .render import err, note, print_json, print_table, show_path, warn


def register(app: typer.Typer) -> None:
    app.command("tag")(tag)


def tag(
    index_dir: options.IndexDir = None,
    vocabulary: Annotated[
        str | None,
        typer.Option(
            "--vocabulary",
            help="Labels to tag with: 'builtin' (Open Images' 601 classes, with their hierarchy) or a text file, one "
            "label per line as Group|Subgroup|Label.",
            show_default="builtin",
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            "-t",
            min=0.0,
            max=1.0,
            help="Tag when p = sigmoid(scale x (cos(image, label) - cos(image, a neutral prompt))) reaches this; each "
            "label on its own (a SigLIP model: its own sigmoid).",
            show_default="0.5",
        ),
    ] = None,
    max_tags: Annotated[
        int | None, typer.Option("--max-tags", min=1, help="At most this many tags per image.", show_default="10")
    ] = None,  # fmt: skip
    write_xmp: Annotated[
        bool,
        typer.Option(
            "--write-xmp",
            help="Then merge the tags (under cocatk|...) and the caption into XMP sidecars "
            "(ExifTool); the user's own keywords stay.",
        ),
    ] = False,
    remove_xmp: Annotated[
        bool,
        typer.Option(
            "--remove-xmp",
            help="Undo every sidecar cocatk wrote: restore it byte for byte, delete one it "
            "made, or remove only cocatk's entries from one edited since. Tags nothing.",
        ),
    ] = False,
    sidecar_name: Annotated[
        str,
        typer.Option("--sidecar-name", help="Sidecar naming: digikam or darktable (IMG_1.jpg.xmp), adobe (IMG_1.xmp)."),
    ] = "digikam",
    overwrite_description: Annotated[
        bool,
        typer.Option("--overwrite-description", help="Write the caption into dc:description even where one exists."),
    ] = False,
    json_: options.Json = False,
) -> None:
    """Tag every indexed image with zero-shot labels from its stored embedding (no image is read again).

    The tags are stored in the index (`cocatk search --tag beach`, the page) and, with --write-xmp, in XMP sidecars
    that digiKam, darktable, Lightroom, immich and PhotoPrism import.
    """
    from ..errors import UsageError
    from ..retrieval.index import Index
    from ..retrieval.tags import remove_sidecars, tag_index, write_sidecars

    if write_xmp and remove_xmp:
        raise UsageError("--write-xmp and --remove-xmp cannot be combined", hint="pass one of them")
    if write_xmp:
        from ..sidecars import SIDECAR_STYLES, require_exiftool

        if sidecar_name not in SIDECAR_STYLES:
            raise UsageError(f"unknown --sidecar-name {sidecar_name!r}",
                             hint=f"use one of: {', '.join(SIDECAR_STYLES)}")  # fmt: skip
        require_exiftool()  # before any tag is computed
    out: dict[str, Any] = {}
    with progress_bar(disable=json_) as progress, Index.open(index_dir) as ix:
        if remove_xmp:
            out["sidecars"] = remove_sidecars(ix, progress=progress).to_dict()
        else:
            out = tag_index(ix, vocabulary, threshold=threshold, max_tags=max_tags, progress=progress).to_dict()
            if write_xmp:
                out["sidecars"] = write_sidecars(ix, style=sidecar_name, overwrite_description=overwrite_description,
                                                 progress=progress).to_dict()  # fmt: skip
    if json_:
        print_json(out)
        return
    if "key" in out:
        _print_tags(out)
    if "sidecars" in out:
        _print_sidecars(out["sidecars"])


def _print_tags(d: dict[str, Any]) -> None:
    rule = d["settings"]["rule"]
    vocab = d["settings"]["vocabulary"]
    from rich.table import Table

    table = Table(title=f"most common tags (of {vocab['labels']} labels)")
    for name, justify in (("label", "left"), ("hierarchy", "left"), ("images", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for t in d["top"]:
        table.add_row(t["label"], t["path"], str(t["images"]))
    print_table(table)
    cached = "cached label embeddings" if d["classifier_from_cache"] else "label embeddings computed and cached"
    note(
        f"{d['index_dir']}: {d['tags']} tags on {d['tagged']} of {d['images']} images in "
        f"{d['seconds']['total']:.2f} s ({cached}; rule {rule['text']}; key {d['key']}). "
        "`cocatk search --tag LABEL` finds them."
    )


def _print_sidecars(s: dict[str, Any]) -> None:
    from rich.text import Text

    done = ", ".join(f"{n} {what}" for what, n in sorted(s["outcomes"].items())) or "nothing to do"
    extra = f", {s['descriptions']} descriptions" if s.get("descriptions") else ""
    note(f"sidecars ({s['style']}): {done}{extra} in {s['seconds']:.2f} s")
    for item in s["skipped"][:20]:
        warn(Text.assemble("skipped ", show_path(item["path"]), f": {item['reason']}"))
    if len(s["skipped"]) > 20:
        err.print(f"[dim]... and {len(s['skipped']) - 20} more (--json lists them)[/]")


__all__ = ["register", "tag"]
