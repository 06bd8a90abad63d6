"""`cocatk caption` (captions for an index, or a folder/dataset into a file) and `cocatk eval-captions`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ..paths import display_path
from . import options
from .progress import progress_bar
from .render import err, note, out, print_json, print_table, stdout_to_stderr, warn

Strategy = Annotated[str | None, typer.Option("--strategy", help="greedy, beam or sample.", show_default="beam")]
Beams = Annotated[int | None, typer.Option("--beams", help="Beams per image (beam search).", show_default="3")]
LengthPenalty = Annotated[
    float | None,
    typer.Option("--length-penalty", help="Beam score = sum log p / length ** this (beam search).", show_default="1.0"),
]
MinLen = Annotated[
    int | None,
    typer.Option("--min-len", help="No end of text before this many tokens.", show_default="4 (demo model: 0)"),
]
MaxLen = Annotated[
    int | None,
    typer.Option("--max-len", help="At most this many tokens.", show_default="29, within the model's context"),
]
RepetitionPenalty = Annotated[
    float | None,
    typer.Option("--repetition-penalty", help="> 1 discourages repeating a token (HF's rule).", show_default="1.0"),
]
TopK = Annotated[
    int | None, typer.Option("--top-k", help="Sample among the k most likely tokens (0: all).", show_default="0")
]
TopP = Annotated[
    float | None,
    typer.Option("--top-p", help="Sample among the tokens holding this probability mass.", show_default="1.0"),
]
Temperature = Annotated[float | None, typer.Option("--temperature", help="Sampling temperature.", show_default="1.0")]
Seed = Annotated[int | None, typer.Option("--seed", help="Sampling seed (reproducible captions).")]


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)
    app.command("eval-captions")(eval_captions)


def _config(**kw: Any) -> dict[str, Any]:
    """The generation settings the user set (None: the model's default); validated here, before any model loads."""
    from ..captioning import GenerationConfig

    fields = {k: v for k, v in kw.items() if v is not None}
    GenerationConfig(**fields)  # one-line UsageError for a bad value (--beams 0, --top-p 2, ...)
    return fields


def caption(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="Without --output: nothing (caption the index). With --output: files, folders, hf:NAME."),
    ] = None,
    index_dir: options.IndexDir = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Caption PATHs into this .jsonl/.csv/.parquet file, without an index."),
    ] = None,
    strategy: Strategy = None,
    beams: Beams = None,
    length_penalty: LengthPenalty = None,
    min_len: MinLen = None,
    max_len: MaxLen = None,
    repetition_penalty: RepetitionPenalty = None,
    top_k: TopK = None,
    top_p: TopP = None,
    temperature: Temperature = None,
    seed: Seed = None,
    batch_size: options.BatchSize = None,
    workers: options.Workers = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Caption at most N images in this run.")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Hugging Face split (hf: sources).")] = None,
    image_column: Annotated[str | None, typer.Option("--image-column", help="Hugging Face image column.")] = None,
    cache_tokens: Annotated[
        bool,
        typer.Option("--cache-tokens/--no-cache-tokens", help="Use the index's cached decoder tokens when present."),
    ] = True,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    ray: options.Ray = None,
    ray_actors: options.RayActors = None,
    ray_gpus_per_actor: options.RayGpusPerActor = None,
    json_: options.Json = False,
) -> None:
    """Caption images with CoCa's decoder: every indexed image without a caption for these settings (resumable), or,
    with --output, files, folders or a Hugging Face dataset into a JSONL/CSV/Parquet file."""
    from ..errors import UsageError

    config = _config(
        strategy=strategy,
        num_beams=beams,
        length_penalty=length_penalty,
        min_len=min_len,
        max_len=max_len,
        repetition_penalty=repetition_penalty,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
    )
    if ray is not None:
        from ..retrieval.ray_encoder import require_ray

        require_ray()  # without the extra: one line naming it, before anything is loaded or written

    def captioner(name: str, weights: str, max_megapixels: float | None = None) -> Any:
        if ray is None:
            return None
        from ..images import DEFAULT_MAX_MEGAPIXELS
        from ..retrieval.ray_encoder import RayCaptioner

        kwargs = options.ray_kwargs(ray, ray_actors, ray_gpus_per_actor, device)
        limit = DEFAULT_MAX_MEGAPIXELS if max_megapixels is None else max_megapixels
        return RayCaptioner(name, weights, batch_size=batch_size, max_megapixels=limit, **kwargs)

    # With --ray the model runs in the actors: this process keeps its copy (settings, the decoder check) on the CPU,
    # not on a GPU an actor needs.
    here = options.driver_device(ray, device)

    if output is not None:
        if not paths:
            raise UsageError("--output needs images to caption", hint="pass files, folders or hf:NAME before it")
        from ..models import load_model
        from ..recaption import recaption

        with stdout_to_stderr(ray is not None), progress_bar(disable=json_) as progress:
            m = load_model(model, pretrained, here)
            rc = captioner(m.spec.name, m.spec.pretrained)
            with rc or contextlib.nullcontext():
                report = recaption(
                    paths,
                    output,
                    m,
                    config,
                    batch_size=batch_size or 16,
                    workers=workers,
                    limit=limit,
                    split=split,
                    image_column=image_column,
                    progress=progress,
                    captioner=rc,
                )
        for message in m.notices():
            warn(message)
        if json_:
            print_json(report.to_dict())
            return
        failed = ", ".join(f"{n} {r}" for r, n in sorted(report.failed.items())) or "0"
        out.print(
            f"{display_path(report.output)}: {report.captioned} captioned, {report.already} already there, "
            f"failed {failed}; {report.seconds:.1f} s ({report.captions_per_s:.1f} captions/s)",
            highlight=False,
            markup=False,
        )
        for ex in report.examples[:3]:
            note(Text.assemble(("  ", ""), (ex["caption"], "bold"), "  ", (display_path(ex["source"]), "dim")))
        return
    if paths:
        raise UsageError(
            "PATHs are captioned into a file, not into the index",
            hint="pass --output captions.jsonl, or index them first (`cocatk index PATH --caption`)",
        )
    from ..retrieval.captions import caption_index
    from ..retrieval.index import Index

    with (
        stdout_to_stderr(ray is not None),
        progress_bar(disable=json_) as progress,
        Index.open(index_dir, model=model, pretrained=pretrained, device=here, lock=True) as ix,
        captioner(ix.manifest["model"], ix.manifest["pretrained"], ix.manifest.get("max_megapixels"))
        or contextlib.nullcontext() as rc,
    ):
        report = caption_index(
            ix,
            config,
            batch_size=batch_size,
            use_token_cache=cache_tokens,
            limit=limit,
            progress=progress,
            captioner=rc,
        )
        notices = ix.model.notices()
    for f in report.failures[:20]:
        note(Text.assemble(("skipped ", "dim"), display_path(f["path"]), f": {f['reason']}"))
    for message in notices:
        warn(message)
    if json_:
        print_json(report.to_dict())
        return
    failed = ", ".join(f"{n} {r}" for r, n in sorted(report.failed.items())) or "0"
    out.print(
        f"{display_path(report.index_dir)}: {report.captioned} captioned now, {report.already} already had one, "
        f"{report.total} captions with these settings (key {report.key}); failed {failed}; "
        f"{report.seconds:.1f} s ({report.captions_per_s:.1f} captions/s)",
        highlight=False,
        markup=False,
    )
    for ex in report.examples[:3]:
        note(Text.assemble("  ", (ex["caption"], "bold"), "  ", (display_path(ex["path"]), "dim")))


def eval_captions(
    data: Annotated[
        str, typer.Argument(help="Karpathy dataset_coco.json, a {image: [captions]} JSON, a folder, or hf:PATH.")
    ],
    images: Annotated[Path | None, typer.Option("--images", help="Folder of the image files.")] = None,
    split: Annotated[str, typer.Option("--split", help="Split to evaluate ('all': every image).")] = "test",
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N images.")] = None,
    strategy: Strategy = None,
    beams: Beams = None,
    length_penalty: LengthPenalty = None,
    min_len: MinLen = None,
    max_len: MaxLen = None,
    repetition_penalty: RepetitionPenalty = None,
    batch_size: options.BatchSize = None,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    json_: options.Json = False,
) -> None:
    """Caption quality on a captioned set (COCO Karpathy test: BLEU-4, CIDEr; METEOR with Java)."""
    from ..evaluation.captioned import open_captioned_dataset
    from ..evaluation.captioning import evaluate_captions
    from ..models import load_model

    config = _config(
        strategy=strategy,
        num_beams=beams,
        length_penalty=length_penalty,
        min_len=min_len,
        max_len=max_len,
        repetition_penalty=repetition_penalty,
    )
    dataset = open_captioned_dataset(data, split=None if split == "all" else split, images_dir=images)
    with progress_bar(disable=json_) as progress:
        m = load_model(model, pretrained, device)
        result = evaluate_captions(m, dataset, config, limit=limit, batch_size=batch_size or 16, progress=progress)
    for message in m.notices():
        warn(message)
    if json_:
        print_json(result.to_dict())
        return
    table = Table(title=f"{result.model['model']} captions on {Path(result.dataset).name}: {result.n_images} images")
    for col in ("metric", "score"):
        table.add_column(col, justify="right" if col == "score" else "left")
    for name, value in result.metrics.items():
        shown = f"{100 * value:.1f}" if name == "CIDEr" else f"{100 * value:.2f}"
        table.add_row(name, shown)
    print_table(table)
    lines = [f"tokenizer {result.tokenizer}; scores x100; published reference: {result.reference}"]
    lines += [f"{k}: {v}" for k, v in result.unavailable.items()]
    for line in lines:
        err.print(line, style="dim", highlight=False, markup=False)
