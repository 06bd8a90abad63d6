"""`cocatk demo`: generate a photo folder, index it, search it with and without rerank, zero-shot, HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import options
from .progress import progress_bar
from .render import err, out, print_json

#: cocatk.demo.scenes.distinct_meanings(): every generated photo shows a different scene (kept literal here so that
#: `cocatk --help` imports neither numpy nor PIL; a test checks that the two agree).
MAX_PHOTOS = 630


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def demo(
    directory: Annotated[
        Path | None,
        typer.Argument(help="Folder for the photos, index and report (created).", show_default="$COCATK_HOME/demo"),
    ] = None,
    photos: Annotated[int, typer.Option("--photos", min=8, max=MAX_PHOTOS, help="Scene photos to generate.")] = 120,
    queries: Annotated[int, typer.Option("--queries", min=1, max=20, help="Captions to search for.")] = 4,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    json_: options.Json = False,
) -> None:
    """Run the whole product offline on generated photos with the shipped `demo` model."""
    from ..config import home_dir
    from ..demo.run import run_demo

    directory = directory if directory is not None else home_dir() / "demo"

    with progress_bar(disable=json_) as progress:
        report = run_demo(
            directory,
            n_photos=photos,
            n_queries=queries,
            model=model or "demo",
            pretrained=pretrained,
            device=device,
            progress=progress,
        )
    if json_:
        print_json(report.to_dict())
        return
    _render(report)


def _mark(hit: dict, truth: str | None) -> str:
    name = Path(hit["path"]).name
    return f"[green]✓ {name}[/]" if truth and name == truth else name


def _where(rank: int | None, pool: int) -> str:
    return f"#{rank}" if rank else f"not in top {pool}"


def _render(report) -> None:  # noqa: ANN001 - DemoReport
    idx = report.index
    failed = ", ".join(f"{n} {reason}" for reason, n in sorted(idx["failed"].items())) or "none"
    out.print(
        f"[bold]Indexed[/] {idx['encoded']} of {idx['scanned']} files in {idx['seconds']:.1f} s "
        f"({idx['images_per_s']:.0f} images/s); skipped: {failed}",
        highlight=False,
    )
    for q in report.queries:
        table = Table(title=f"“{q.text}”  (true image: {q.truth})", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("by similarity", overflow="fold")
        table.add_column("sim", justify="right")
        table.add_column("reranked by caption likelihood", overflow="fold")
        table.add_column("log p", justify="right")
        for a, b in zip(q.contrastive, q.reranked, strict=False):
            table.add_row(
                str(a["rank"]), _mark(a, q.truth), f"{a['similarity']:.3f}", _mark(b, q.truth), f"{b['loglik']:.2f}"
            )
        out.print(table)
        out.print(
            f"  true image: {_where(q.rank_contrastive, q.pool)} by similarity → {_where(q.rank_rerank, q.pool)} "
            "after rerank "
            f"· rerank of {q.pool} candidates {q.timings_ms['rerank']:.0f} ms",
            style="dim",
            highlight=False,
        )
    zs = report.zeroshot
    m = zs["metrics"]
    classes = zs["data"].get("num_classes", 0)
    out.print(
        f"[bold]Zero-shot[/] colour-shape classes: top-1 {m['top1']:.1%}, top-5 {m.get('top5', float('nan')):.1%} "
        f"over {classes} classes (chance {1 / max(classes, 1):.1%}), n={m['n']}",
        highlight=False,
    )
    out.print(f"[bold]Report[/] {report.html}", highlight=False)
    if report.model.get("random_weights"):
        err.print("note: random weights: the scores carry no meaning", style="yellow")
