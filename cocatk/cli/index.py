"""`cocatk index` (build or update an image index) and `cocatk info` (describe one)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from . import options
from .progress import progress_bar
from .render import err, out, print_json, warn


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("info")(info)


def index(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Image files or folders (recursive). Default: every folder already in the index."),
    ] = None,
    index_dir: options.IndexDir = None,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    batch_size: options.BatchSize = None,
    workers: options.Workers = None,
    device: options.Device = None,
    follow_symlinks: Annotated[
        bool, typer.Option("--follow-symlinks", help="Follow symlinked files and folders (cycles are detected).")
    ] = False,
    max_megapixels: Annotated[
        float, typer.Option("--max-megapixels", min=0.01, help="Skip images larger than this (decoded pixels / 1e6).")
    ] = 100.0,
    faiss_factory: Annotated[
        str | None,
        typer.Option(
            "--faiss",
            help="FAISS factory replacing the exact index, e.g. HNSW32 or IVF4096,PQ64 (trained on the vectors).",
            show_default="Flat (exact inner product)",
        ),
    ] = None,
    cache_tokens: Annotated[
        bool,
        typer.Option("--cache-tokens", help="Also store each image's decoder tokens (fp16) for rerank without decode."),
    ] = False,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Drop everything indexed with another model and re-encode with --model.")
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Files per durable checkpoint.")
    ] = 256,
    json_: options.Json = False,
) -> None:
    """Index images: new and changed files are encoded, moved files keep their vectors, deleted files are removed.

    Safe to interrupt: the next run resumes from the last checkpoint.
    """
    from ..retrieval.index import Index, resolve_roots

    resolve_roots(paths or [])  # a bad PATH fails before an index folder is created
    ix = Index.open(index_dir, model=model, pretrained=pretrained, device=device, create=True, rebuild=rebuild)
    with ix, progress_bar(disable=json_) as progress:
        report = ix.update(
            [str(p) for p in paths or []],
            batch_size=batch_size,
            workers=workers,
            follow_symlinks=follow_symlinks,
            max_megapixels=max_megapixels,
            faiss_factory=faiss_factory,
            cache_tokens=cache_tokens,
            checkpoint_every=checkpoint_every,
            progress=progress,
        )
    data = report.to_dict()
    for root in report.missing_roots:
        warn(f"root {root} is missing (unmounted?): its files are kept")
    for f in report.failures[:20]:
        err.print(f"[dim]skipped[/] {f['path']}: {f['reason']}" + (f" ({f['detail']})" if f["detail"] else ""))
    if len(report.failures) > 20:
        err.print(f"[dim]... and {len(report.failures) - 20} more (`cocatk info` lists them)[/]")
    if json_:
        print_json(data)
        return
    _print_summary(data)


def _print_summary(d: dict[str, Any]) -> None:
    failed = ", ".join(f"{n} {reason}" for reason, n in sorted(d["failed"].items())) or "0"
    out.print(
        f"[bold]{d['index_dir']}[/]: {d['total']} images indexed\n"
        f"  scanned {d['scanned']}  new {d['new']}  changed {d['changed']}  unchanged {d['unchanged']}  "
        f"moved {d['moved']}  removed {d['removed']}  duplicates {d['duplicates']}\n"
        f"  failed {failed}\n"
        f"  encoded {d['encoded']} images in {d['seconds']:.1f} s ({d['images_per_s']:.1f} images/s)",
        highlight=False,
    )


def info(index_dir: options.IndexDir = None, json_: options.Json = False) -> None:
    """Describe an index: model, counts, roots, size on disk, failures."""
    from ..retrieval.index import Index

    with Index.open(index_dir) as ix:
        data = ix.info()
    if json_:
        print_json(data)
        return
    m = data["manifest"]
    ident = m.get("identity", {})
    out.print(f"[bold]{data['index_dir']}[/]", highlight=False)
    rows = [
        ("model", f"{ident.get('model')} ({ident.get('arch')})"),
        ("weights", str(ident.get("weights"))),
        ("embedding", f"{m.get('embed_dim')}-d, {m.get('metric')}, image size {m.get('image_size')}"),
        ("faiss", f"{m.get('factory')} ({data['faiss_file'] or 'rebuilt from SQLite on next open'})"),
        ("images", f"{data['files']} files, {data['unique_contents']} distinct contents"),
        ("tokens", f"{'cached' if m.get('cache_tokens') else 'not cached'} ({data['token_cache_bytes'] / 1e6:.1f} MB)"),
        ("size on disk", f"{data['size_bytes'] / 1e6:.1f} MB"),
        ("schema", f"v{m.get('schema_version')}, built by cocatk {m.get('cocatk_version')}"),
        ("roots", "\n".join(data["roots"]) or "-"),
        ("failed", ", ".join(f"{n} {r}" for r, n in sorted(data["failed"].items())) or "0"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        v = v.replace("\n", "\n" + " " * (width + 2))
        out.print(f"{k:<{width}}  {v}", highlight=False)
    for f in data["failures"][:20]:
        out.print(f"  [dim]{f['path']}: {f['reason']}[/]", highlight=False)
