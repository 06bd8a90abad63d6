"""`cocatk models`: the model presets and whether their weights are in the local cache."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from . import options
from .render import note, out, print_json, print_table


def register(app: typer.Typer) -> None:
    app.command("models")(models)


def models(
    download: Annotated[
        str | None, typer.Option("--download", help="Fetch this preset's weights into the Hugging Face cache.")
    ] = None,
    json_: options.Json = False,
) -> None:
    """List model presets: open_clip name, tag, embedding dim, and whether the weights are cached locally."""
    from ..models import download_weights, list_presets

    if download:
        path = download_weights(download)
        if json_:
            print_json({"model": download, "path": path})
        else:
            out.print(f"{download}: {path}")
        return
    rows = list_presets()
    if json_:
        print_json(rows)
        return
    table = Table(title="cocatk model presets")
    for col in ("preset", "open_clip model", "pretrained", "dim", "weights", "about"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"],
            r["arch"],
            r["pretrained"],
            str(r["embed_dim"]),
            "[green]cached[/]" if r["cached"] else "[dim]not cached[/]",
            r["description"],
        )
    print_table(table)
    note(
        "Any open_clip CoCa architecture name or config JSON also works with --model; "
        "--pretrained takes a tag, a checkpoint path, or 'none'."
    )
