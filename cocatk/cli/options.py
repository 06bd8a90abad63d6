"""Options shared by several commands, declared once (each also reads a ``COCATK_*`` environment variable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        envvar="COCATK_MODEL",
        help="Preset (coca-l14, coca-b32, coca-l14-coco, demo), any open_clip architecture (CoCa, CLIP ViT-B-32, "
        "SigLIP ViT-B-16-SigLIP, EVA EVA02-B-16), or config JSON path.",
        show_default="coca-l14 with a CUDA GPU, else coca-b32; an existing index keeps its own",
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
    typer.Option(
        "--precision",
        envvar="COCATK_PRECISION",
        help="auto, fp32 or bf16 (fp16 on a GPU). auto: bf16 autocast on a GPU; on a CPU bf16 weights where measured "
        "faster (AMX), else fp32.",
        show_default="auto",
    ),
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
RerankModel = Annotated[
    str | None,
    typer.Option(
        "--rerank-model",
        envvar="COCATK_RERANK_MODEL",
        help="The reranker's model: any CoCa (preset, architecture, config JSON) for --reranker coca, whatever model "
        "built the index; a hub repo or local folder for --reranker blip-itm.",
        show_default="the one the index records, else the index's CoCa; Salesforce/blip-itm-base-coco for BLIP",
    ),
]
RerankPretrained = Annotated[
    str | None,
    typer.Option(
        "--rerank-pretrained",
        envvar="COCATK_RERANK_PRETRAINED",
        help="Weights of --rerank-model: open_clip tag, checkpoint path, or 'none' for seeded random weights.",
        show_default="the rerank model's default",
    ),
]
Reranker = Annotated[
    str,
    typer.Option(
        "--reranker",
        envvar="COCATK_RERANKER",
        help="coca (caption log-likelihood) or blip-itm (BLIP's image-text matching, needs cocatk[blip]).",
    ),
]
Backend = Annotated[
    str,
    typer.Option(
        "--backend",
        envvar="COCATK_BACKEND",
        help="What embeds a text query: auto (the text tower exported to ONNX by `cocatk index`, without torch, when "
        "the query is text alone and not reranked; else torch), onnx or torch.",
    ),
]
Ray = Annotated[
    str | None,
    typer.Option(
        "--ray",
        metavar="ADDRESS",
        envvar="COCATK_RAY",
        help="Run the model on Ray (pip install 'cocatk\\[ray]'): `local` starts Ray here, `auto` or "
        "ray://HOST:PORT joins a cluster. Every node must see the files at the same path (a shared filesystem).",
    ),
]
RayActors = Annotated[
    int | None,
    typer.Option("--ray-actors", min=1, help="Model actors (default: one per GPU, or one per 4 CPUs)."),
]
RayGpusPerActor = Annotated[
    float | None,
    typer.Option("--ray-gpus-per-actor", min=0, help="GPUs per model actor (default 1 with GPUs, 0 without)."),
]


def ray_kwargs(ray: str, actors: int | None, gpus_per_actor: float | None, device: str | None) -> dict[str, Any]:
    """The Ray options as the keyword arguments of RayEncoder / RayCaptioner (`--device cpu`: CPU actors)."""
    return {
        "address": None if ray == "local" else ray,
        "actors": actors,
        "gpus_per_actor": 0.0 if device == "cpu" and gpus_per_actor is None else gpus_per_actor,
    }


def driver_device(ray: str | None, device: str | None) -> str | None:
    """Where this process loads its own model: with `--ray` the actors encode, so the driver's copy (checked and
    recorded in a new index's manifest, caption settings) stays on the CPU instead of taking GPU memory an actor
    needs."""
    return "cpu" if ray is not None else device
