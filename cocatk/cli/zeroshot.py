"""`cocatk zeroshot` (accuracy on a labelled dataset) and `cocatk classify` (ad-hoc labels for a few images)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..paths import display_path
from . import options
from .progress import progress_bar
from .render import note, out, print_json, print_table, warn


def register(app: typer.Typer) -> None:
    app.command("zeroshot")(zeroshot)
    app.command("classify")(classify)


Templates = Annotated[
    str | None,
    typer.Option(
        "--templates",
        "-t",
        help="Prompt templates: openai (80), simple (7), cifar (18), or a file with one template per line "
        "({} marks the class name, # comments).",
        show_default="the dataset's own (openai for ImageNet and folders, cifar for CIFAR)",
    ),
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def zeroshot(
    dataset: Annotated[
        str,
        typer.Argument(
            help="imagenet, cifar10, cifar100, a folder with one sub-folder per class, hf:NAME (cached Hugging Face "
            "dataset) or hf:PATH (a save_to_disk folder)."
        ),
    ],
    data: Annotated[
        Path | None, typer.Option("--data", help="Where the dataset lives (ImageNet val folder, CIFAR save_to_disk).")
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="Dataset split.", show_default="validation, else test, else first")
    ] = None,
    templates: Templates = None,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    precision: options.Precision = None,
    batch_size: options.BatchSize = None,
    workers: options.Workers = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Evaluate N images, evenly spaced over the dataset.")
    ] = None,
    scorer: Annotated[
        str,
        typer.Option(
            "--scorer",
            help="contrastive (100 * image @ W), likelihood (debiased caption log-likelihood, <= 100 classes) or "
            "rerank (contrastive top-5 reordered by likelihood).",
        ),
    ] = "contrastive",
    alpha: Annotated[
        float, typer.Option("--alpha", help="Prior weight of the generative score: log P(t|i) - alpha log P(t).")
    ] = 1.0,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Hugging Face image column.")] = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="Hugging Face label (ClassLabel) column.")
    ] = None,
    json_: options.Json = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also write the JSON result here.")] = None,
) -> None:
    """Zero-shot classification accuracy (top-1, top-5, mean per-class recall) against published numbers."""
    from ..evaluation import evaluate_zeroshot

    with progress_bar() as progress:
        result = evaluate_zeroshot(
            dataset,
            model,
            pretrained=pretrained,
            device=device,
            precision=precision,
            data_dir=data,
            split=split,
            templates=templates,
            batch_size=batch_size,
            workers=workers,
            limit=limit,
            scorer=scorer,
            alpha=alpha,
            image_column=image_column,
            label_column=label_column,
            progress=progress,
        )
    record = result.to_dict()
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(record, indent=2, default=str, ensure_ascii=False) + "\n")
    if result.skipped["count"]:
        for example in result.skipped["examples"]:
            note(f"skipped {example}")
        warn(f"{result.skipped['count']} images could not be decoded and were skipped")
    if result.model["random_weights"]:
        warn("random weights (--pretrained none): accuracy is chance level, useful only for tests and timing")
    if json_:
        print_json(record)
        return
    _render_result(record)
    if output is not None:
        note(f"result written to {output}")


def _render_result(r: dict[str, Any]) -> None:
    data, model, t = r["data"], r["model"], r["timings"]
    title = escape(f"zero-shot {data['name']}: {data['source']}")
    table = Table(title=title, title_justify="left")
    for col in ("scorer", "top-1 %", "top-5 %", "mean per-class recall %", "N"):
        table.add_column(col, justify="left" if col == "scorer" else "right")
    for name, m in r["by_scorer"].items():
        table.add_row(name, _pct(m["top1"]), _pct(m.get("top5")), _pct(m["mean_per_class_recall"]), str(m["n"]))
    ref = r["reference"]
    if ref is not None:
        table.add_row("[dim]published[/]", f"[dim]{_pct(ref['top1'])}[/]", "", "", "")
    print_table(table)
    if ref is not None:
        delta = 100 * ref["delta_top1"]
        colour = "green" if abs(delta) <= 0.3 else "yellow"
        out.print(
            f"reference: {_pct(ref['top1'])} % top-1 ({ref['source']}); "
            f"this run [{colour}]{delta:+.2f} pt[/]"
            + ("" if ref["comparable"] else " [dim](not comparable: subset, skipped images or other templates)[/]"),
            highlight=False,
        )
    lik = r["likelihood"]
    extra = f"; likelihood prompt '{lik['prompt']}', alpha {lik['alpha']:g}" if lik else ""
    out.print(
        f"model {escape(str(model['model']))} ({model['arch']}/{model['pretrained']}, {model['device']}, "
        f"{model['precision']}); "
        f"templates {r['templates']['name']} ({r['templates']['count']}){extra}; "
        f"{data['num_classes']} classes; classifier {'from cache' if t['classifier_cached'] else 'built'} "
        f"in {t['classifier_s']:.2f} s; {t['images_per_s']} images/s",
        style="dim",
        highlight=False,
    )


def classify(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    labels: Annotated[str, typer.Option("--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car".')],
    templates: Annotated[
        str | None,
        typer.Option(
            "--templates",
            "-t",
            help="openai, simple, cifar, or a file with one template per line ({} marks the label).",
            show_default="simple",
        ),
    ] = None,
    top_n: Annotated[int, typer.Option("-n", "--top", min=1, help="Labels to show per image.")] = 5,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    precision: options.Precision = None,
    json_: options.Json = False,
) -> int:
    """Zero-shot labels for images: the top-n labels with probabilities (softmax of logit_scale x cosine)."""
    from ..evaluation import classify_images

    result = classify_images(
        images,
        labels.split(","),
        model,
        pretrained=pretrained,
        device=device,
        precision=precision,
        templates=templates,
        top_n=top_n,
    )
    for s in result["skipped"]:
        note(Text.assemble("skipped ", display_path(s["image"]), f": {s['error']}"))
    if json_:
        print_json(result)
        for message in result["warnings"]:
            warn(message)
        return 0
    table = Table(title=f"zero-shot labels ({len(result['labels'])} labels)", title_justify="left")
    if result["warnings"]:
        table.caption = Text("\n".join(f"warning: {w}" for w in result["warnings"]), style="yellow")
        table.caption_justify = "left"
    for col in ("image", "rank", "label", "probability"):
        table.add_column(col, justify="right" if col in ("rank", "probability") else "left", overflow="fold")
    tsv = []
    for item in result["results"]:
        for rank, p in enumerate(item["predictions"], start=1):
            tsv.append([Text(display_path(item["image"])), str(rank), Text(p["label"]), f"{p['probability']:.3f}"])
            table.add_row(
                Text(display_path(item["image"])) if rank == 1 else "",
                str(rank),
                Text(p["label"]),
                f"{p['probability']:.3f}",
            )
        table.add_section()
    print_table(table, rows=tsv)  # piped: the image on every row
    return 0
