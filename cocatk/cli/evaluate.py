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


def _method_label(method: str) -> str:
    """Metric keys as a reader names them: rerank@10 is the CoCa likelihood rerank, blip-itm@10 BLIP's."""
    if method.startswith("rerank@"):
        return "coca likelihood @" + method[len("rerank@") :]
    if method.startswith("blip-itm@"):
        return "BLIP-ITM @" + method[len("blip-itm@") :]
    return method


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
    reranker: Annotated[
        str,
        typer.Option(
            "--reranker",
            help="Rerankers side by side, comma-separated: coca (caption likelihood), blip-itm (BLIP image-text "
            "matching, text->image, needs cocatk[blip]).",
        ),
    ] = "coca",
    rerank_model: options.RerankModel = None,
    rerank_pretrained: options.RerankPretrained = None,
    blip_model: Annotated[
        str | None,
        typer.Option(
            "--blip-model", help="BLIP-ITM hub repo or local folder.", show_default="Salesforce/blip-itm-base-coco"
        ),
    ] = None,
    blip_pretrained: Annotated[
        str | None, typer.Option("--blip-pretrained", help="'none' for a random-weight BLIP (plumbing and speed only).")
    ] = None,
    cost_queries: Annotated[
        int, typer.Option("--costs", min=0, help="Measure each reranker's cost per query at each k on N captions.")
    ] = 0,
) -> None:
    """Text->image and image->text R@1/5/10 on a captioned set (COCO 5k / Flickr30k 1k test, or your own), with the
    published open_clip numbers for the same model beside them."""
    from ..evaluation import evaluate_retrieval, open_captioned_dataset
    from ..models import load_model
    from ..models.blip import check_reranker, load_blip_itm

    ks = _parse_ks(rerank)
    chosen = [check_reranker(r) for r in reranker.split(",") if r.strip()]
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
    lik = None
    if ks and "coca" in chosen and (rerank_model is not None or rerank_pretrained is not None):
        lik = load_model(rerank_model, rerank_pretrained, device, precision)
        if not lik.has_decoder:
            lik.image_tokens([])  # DecoderRequiredError: --rerank-model must be a CoCa
    blip = load_blip_itm(blip_model, blip_pretrained, device) if ks and "blip-itm" in chosen else None
    for notice in blip.notices() if blip is not None else []:
        err.print(f"[yellow]warning:[/] {notice}", highlight=False)

    last: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - last.get(stage, 0) >= step:
            last[stage] = done
            err.print(f"{stage}: {done}/{total}", highlight=False, style="dim")

    result = evaluate_retrieval(
        m,
        dataset,
        rerank_ks=ks,
        alpha=alpha,
        limit=limit,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        rerank_model=lik,  # type: ignore[arg-type]
        blip=blip,
        likelihood="coca" in chosen,
        cost_queries=cost_queries,
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
            table.add_row(label, _method_label(method), *(f"{rec[k]:.2f}" for k in ("R@1", "R@5", "R@10")))
        if direction == "text_to_image" and result.reference:
            ref = result.reference["text_to_image"]
            table.add_row(
                label, f"[dim]published ({result.reference['benchmark']})[/]", *(f"[dim]{ref[k]:.2f}[/]" for k in ref)
            )
    print_table(table)
    if result.costs_ms:
        costs = Table(
            title=f"stage-2 cost per query (ms, median of {cost_queries}; {result.cpu_count} cores, load average "
            f"{' '.join(str(x) for x in result.load_average or [])})"
        )
        costs.add_column("scorer")
        for k in result.rerank_ks:
            costs.add_column(f"k={k}", justify="right")
        for scorer, row in result.costs_ms.items():
            costs.add_row(scorer, *(f"{row.get(f'k={k}', float('nan')):.1f}" for k in result.rerank_ks))
        print_table(costs)
    lik_model = (result.rerank_models or {}).get("coca", result.model)
    notes = [
        f"coca likelihood @k reorders the contrastive top-k by log P(caption|image) ({lik_model['model']}); "
        f"image->text subtracts {result.alpha:g} x log P(caption) (prior on blank/noise images)."
    ]
    if result.costs_ms:
        notes.append(
            f"cost: ms per query, median of {cost_queries}, on {result.cpu_count} cores at load average "
            f"{' '.join(str(x) for x in result.load_average or [])} (1/5/15 min)."
        )
    if "blip-itm" in (result.rerank_models or {}):
        notes.append(
            f"BLIP-ITM @k reorders the text->image top-k by P(match|image,text) "
            f"({result.rerank_models['blip-itm']['model']})."  # type: ignore[index]
        )
    if result.reference:
        notes.append(f"published: {result.reference['source']}")
    elif result.benchmark is None:
        notes.append("no published reference: not the full COCO 5k / Flickr30k 1k test split, or another model.")
    out.print("\n".join(notes), style="dim")
