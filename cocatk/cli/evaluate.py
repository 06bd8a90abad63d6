"""`cocatk eval-retrieval`: text <-> image R@1/5/10 on a captioned set, contrastive and with the likelihood rerank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import UsageError
from . import options
from .render import err, out, print_json, print_table


def register(app: typer.Typer) -> None:
    app.command("eval-retrieval")(eval_retrieval)


def _parse_ks(text: str) -> list[int]:
    text = text.strip().lower()
    if text in ("", "0", "none", "off"):
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise UsageError(f"--rerank expects comma-separated depths, got '{text}'", hint="e.g. --rerank 10,50") from e


def eval_retrieval(
    data: Annotated[
        str,
        typer.Argument(
            help="Karpathy JSON (dataset_coco.json / dataset_flickr30k.json), {image: \\[captions]} JSON, a folder "
            "holding one, or hf:PATH (save_to_disk).",
            show_default=False,
        ),
    ],
    images: Annotated[
        Path | None, typer.Option("--images", help="Folder of the image files.", show_default="the JSON's folder")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate ('all': every image).")] = "test",
    image_column: Annotated[str | None, typer.Option("--image-column", help="Hugging Face image column.")] = None,
    caption_column: Annotated[
        str | None, typer.Option("--caption-column", help="Hugging Face caption column (string or list).")
    ] = None,
    rerank: Annotated[
        str, typer.Option("--rerank", help="Rerank depths, comma-separated; 'none' for contrastive only.")
    ] = "10,50",
    alpha: Annotated[
        float, typer.Option("--alpha", help="Caption-prior weight of the image->text rerank: log P(t|i) - a log P(t).")
    ] = 1.0,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N images.")] = None,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    precision: options.Precision = None,
    batch_size: options.BatchSize = None,
    workers: options.Workers = None,
    json_: options.Json = False,
) -> None:
    """Text->image and image->text R@1/5/10 on a captioned set (COCO 5k / Flickr30k 1k test, or your own), with the
    published open_clip numbers for the same model beside them."""
    from ..evaluation import evaluate_retrieval, open_captioned_dataset
    from ..models import load_model

    ks = _parse_ks(rerank)
    dataset = open_captioned_dataset(
        data,
        split=None if split == "all" else split,
        images_dir=images,
        image_column=image_column,
        caption_column=caption_column,
    )
    m = load_model(model, pretrained, device, precision)
    if m.is_random:
        err.print("[yellow]warning:[/] random weights: the figures only check the pipeline", highlight=False)

    last: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - last.get(stage, 0) >= step:
            last[stage] = done
            err.print(f"{stage}: {done}/{total}", highlight=False, style="dim")

    result = evaluate_retrieval(
        m, dataset, rerank_ks=ks, alpha=alpha, limit=limit, batch_size=batch_size, workers=workers, progress=progress
    )
    if json_:
        print_json(result.to_dict())
        return
    title = (
        f"{result.model['model']} ({result.model['pretrained']}) on {Path(result.dataset).name}"
        f"{f' [{result.split}]' if result.split else ''}: {result.n_images} images, {result.n_captions} captions"
    )
    table = Table(title=title)
    for col in ("direction", "method", "R@1", "R@5", "R@10"):
        table.add_column(col, justify="right" if col.startswith("R@") else "left")
    for direction, label in (("text_to_image", "text->image"), ("image_to_text", "image->text")):
        for method, rec in result.metrics[direction].items():
            table.add_row(label, method, *(f"{rec[k]:.2f}" for k in ("R@1", "R@5", "R@10")))
        if direction == "text_to_image" and result.reference:
            ref = result.reference["text_to_image"]
            table.add_row(
                label, f"[dim]published ({result.reference['benchmark']})[/]", *(f"[dim]{ref[k]:.2f}[/]" for k in ref)
            )
    print_table(table)
    notes = [
        f"rerank@k reorders the contrastive top-k by log P(caption|image); image->text subtracts "
        f"{result.alpha:g} x log P(caption) (prior on blank/noise images)."
    ]
    if result.reference:
        notes.append(f"published: {result.reference['source']}")
    elif result.benchmark is None:
        notes.append("no published reference: not the full COCO 5k / Flickr30k 1k test split, or another model.")
    out.print("\n".join(notes), style="dim")
