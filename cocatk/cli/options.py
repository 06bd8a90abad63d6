"""Options shared by several commands, declared once (each also reads a ``COCATK_*`` environment variable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="COCATK_MODEL",
        help="Preset (coca-l14, coca-b32, coca-l14-coco, demo), open_clip CoCa architecture, or config JSON path.",
        show_default="coca-l14",
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        "--pretrained",
        envvar="COCATK_PRETRAINED",
        help="open_clip pretrained tag, local checkpoint path, or 'none' for seeded random weights.",
        show_default="the preset's tag",
    ),
]
Device = Annotated[
    str | None,
    typer.Option("--device", envvar="COCATK_DEVICE", help="cpu or cuda.", show_default="cuda when available"),
]
Precision = Annotated[
    str | None,
    typer.Option("--precision", help="fp32, bf16 or fp16 autocast.", show_default="bf16 on cuda, fp32 on cpu"),
]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
IndexDir = Annotated[
    Path | None,
    typer.Option(
        "--index",
        envvar="COCATK_INDEX",
        help="Index folder.",
        show_default="$COCATK_HOME/index, else $XDG_DATA_HOME/cocatk/index",
    ),
]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per forward pass.")]
Workers = Annotated[
    int | None, typer.Option("--workers", min=0, help="Image decode threads.", show_default="from the core count")
]
