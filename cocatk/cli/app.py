"""The Typer application: a thin shell that parses, calls one library function and renders.

torch, open_clip and faiss are imported inside the commands, so `cocatk --help` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .._version import __version__
from . import caption, demo, duplicates, evaluate, export, index, models, search, serve, tag, zeroshot

app = typer.Typer(
    name="cocatk",
    help="Zero-shot image retrieval and classification with CoCa.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cocatk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Zero-shot image retrieval and classification with CoCa (Contrastive Captioners)."""


for _module in (demo, evaluate, index, search, caption, serve, zeroshot, tag, models, duplicates, export):
    _module.register(app)
