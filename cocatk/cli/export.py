"""`cocatk export` (an index as clip-retrieval's embeddings folder) and the import behind
`cocatk index --from-embeddings` (such a folder into an index)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..paths import display_path
from . import options
from .progress import progress_bar
from .render import out as console
from .render import print_json, warn


class ExportFormat(str, Enum):
    clip_retrieval = "clip-retrieval"


class Dtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    out: Annotated[Path, typer.Argument(help="The folder to write; it must not exist, or be empty.")],
    format_: Annotated[
        ExportFormat, typer.Option("--format", help="clip-retrieval: img_emb/*.npy + metadata/*.parquet.")
    ] = ExportFormat.clip_retrieval,
    index_dir: options.IndexDir = None,
    dtype: Annotated[
        Dtype, typer.Option("--dtype", help="float16 (what clip-retrieval writes) or float32 (the vectors exactly).")
    ] = Dtype.float16,
    shard_size: Annotated[
        int, typer.Option("--shard-size", min=1, help="Rows per img_emb_N.npy / metadata_N.parquet pair.")
    ] = 1_000_000,
    json_: options.Json = False,
) -> None:
    """Write the index as clip-retrieval's embeddings folder, for clip-retrieval's back end, autofaiss and
    embedding-reader.

    OUT gets img_emb/img_emb_N.npy (L2-normalised vectors) and metadata/metadata_N.parquet (image_path, id, caption,
    size, mtime_ns, hash) in the same row order (id order), and cocatk.json (the model), written whole beside OUT and
    then renamed into place. `cocatk index --from-embeddings OUT` reads it back.
    """
    from ..retrieval.exchange import check_export_target, export_embeddings
    from ..retrieval.index import Index

    check_export_target(out)  # before the index is opened
    with progress_bar(disable=json_) as progress, Index.open(index_dir) as ix:
        report = export_embeddings(ix, out, dtype=dtype.value, shard_size=shard_size, progress=progress)
    if json_:
        print_json(report.to_dict())
        return
    shards = f"{report.shards} shard{'s' if report.shards != 1 else ''}"
    console.print(
        f"{display_path(report.out)}: {report.rows} images in {shards} ({report.dim}-d {report.dtype}, "
        f"{report.captions} captions, {report.bytes / 1e6:.1f} MB) in {report.seconds:.1f} s",
        markup=False,
        highlight=False,
    )


def run_import(
    source: Path,
    paths: list[Path] | None,
    *,
    index_dir: Path | None,
    model: str | None,
    pretrained: str | None,
    device: str | None,
    precision: str | None,
    rebuild: bool,
    checkpoint_every: int,
    workers: int | None,
    json_: bool,
) -> None:
    """`cocatk index [PATH...] --from-embeddings OUT`: check OUT and its model, open (or create) the index, import,
    render."""
    from ..retrieval.exchange import open_embeddings
    from ..retrieval.from_embeddings import import_embeddings, import_model
    from ..retrieval.index import Index, resolve_roots

    roots = resolve_roots(paths or [])  # a bad PATH fails before an index folder is created
    src = open_embeddings(source)
    with progress_bar(disable=json_) as progress:
        name, tag = import_model(src, index_dir, model, pretrained, device=device, precision=precision)
        ix = Index.open(
            index_dir,
            model=name,
            pretrained=tag,
            device=device,
            precision=precision,
            create=True,
            rebuild=rebuild,
            lock=True,
            progress=progress,
        )
        with ix:
            report = import_embeddings(
                ix, src, roots=roots, checkpoint_every=checkpoint_every, workers=workers, progress=progress
            )
    for message in report.notices:
        warn(message)
    if json_:
        print_json(report.to_dict())
        return
    console.print(
        f"{display_path(report.index_dir)}: {report.total} images indexed\n"
        f"  imported {report.imported} of {report.rows} rows from {display_path(report.source)}  "
        f"already indexed {report.already}  without a file here {report.missing}  "
        f"left out {report.outside + report.unusable}\n"
        f"  read and hashed {report.hashed} files, {report.captions} captions, in {report.seconds:.1f} s "
        "(nothing encoded)",
        markup=False,
        highlight=False,
    )
