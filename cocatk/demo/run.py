"""`cocatk demo`: the whole product on a generated photo folder, with the shipped ``demo`` model, fully offline.

Steps: generate a folder of synthetic scene photos (JPEG and PNG, some stored rotated with an EXIF orientation tag,
three broken files), index it, search it with captions of scenes that are in the folder (so each query has one
true image) with and without the caption-likelihood rerank, evaluate zero-shot colour-shape classification on
held-out single-object scenes, and write an HTML report with the hits of every query.

Example:
    >>> report = run_demo("cocatk-demo")                       # doctest: +SKIP
    >>> report.queries[0].rank_rerank                          # doctest: +SKIP
    1
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Seeds of the demo folder and of the zero-shot set; both differ from the training stream of the demo model.
PHOTO_SEED = 2026
ZEROSHOT_SEED = 4242

ProgressFn = Callable[[str, int, int], None]


@dataclass
class DemoQuery:
    """One demo query: its hits without and with the rerank, and where the true image landed in each."""

    text: str
    truth: str | None
    contrastive: list[dict[str, Any]]
    reranked: list[dict[str, Any]]
    #: 1-based rank of the true image among the ``pool`` first-stage candidates (None: not among them).
    rank_contrastive: int | None
    rank_rerank: int | None
    pool: int
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoReport:
    """Everything `cocatk demo` shows; ``to_dict()`` is its JSON output."""

    directory: str
    model: dict[str, Any]
    index: dict[str, Any]
    queries: list[DemoQuery]
    zeroshot: dict[str, Any]
    html: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick_queries(records: list[dict[str, Any]], count: int) -> list[tuple[str, str]]:
    """Captions of two-object scenes in the folder (deterministic), plus one single-object scene."""
    pairs = [r for r in records if r.get("swapped_caption") and not r.get("broken")]
    singles = [r for r in records if not r.get("swapped_caption") and not r.get("broken")]
    step = max(1, len(pairs) // max(1, count - 1))
    chosen = [(r["caption"], r["file"]) for r in pairs[::step][: max(0, count - 1)]]
    if singles:
        chosen.append((singles[0]["caption"], singles[0]["file"]))
    return chosen[:count]


def _rank_of(hits: list[Any], truth: Path) -> int | None:
    target = str(truth.resolve())
    return next((h.rank for h in hits if h.path == target), None)


def _truth_ids(hits: list[Any], truth: Path) -> set[int]:
    """The id of the true image (empty when it is not among ``hits``), for the report's "true image" badge."""
    target = str(truth.resolve())
    return {h.id for h in hits if h.path == target}


def make_zeroshot_folder(directory: str | Path, per_class: int = 6, seed: int = ZEROSHOT_SEED) -> Path:
    """An ImageFolder of single-object scenes, one sub-folder per "colour shape" class (``red_circle``)."""
    from .scenes import COLOURS, SHAPES, random_scene, render_scene, scene_rng

    root = Path(directory)
    counts: dict[str, int] = {}
    want = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    i = 0
    while any(counts.get(name, 0) < per_class for name in want):
        spec = random_scene(scene_rng(seed, i, "demo-zeroshot"), n_objects=1)
        i += 1
        name = spec.objects[0].name
        if counts.get(name, 0) >= per_class:
            continue
        folder = root / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        render_scene(spec, 96).save(folder / f"{counts.get(name, 0):02d}.png")
        counts[name] = counts.get(name, 0) + 1
    return root


def run_demo(
    directory: str | Path = "cocatk-demo",
    *,
    n_photos: int = 120,
    n_queries: int = 4,
    top: int = 5,
    pool: int = 20,
    zeroshot_per_class: int = 6,
    model: str = "demo",
    pretrained: str | None = None,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> DemoReport:
    """Generate, index, search and evaluate; see the module docstring.

    Args:
        directory: where the photos, the index, the zero-shot set and ``report.html`` go (created).
        n_photos: scene photos to generate (plus three broken files).
        n_queries: captions to search for.
        top: hits shown per query.
        pool: first-stage candidates (the rerank reorders these).
        zeroshot_per_class: held-out single-object images per colour-shape class.
        model, pretrained, device: the model (default: the shipped ``demo`` preset).
        progress: ``progress(stage, done, total)``; stages ``photos``, ``index``, ``search``, ``zeroshot``.

    Returns:
        A :class:`DemoReport`.

    Raises:
        UsageError: ``n_photos`` is not between 1 and :func:`~cocatk.demo.scenes.distinct_meanings` (630).
    """
    from ..errors import UsageError
    from ..evaluation import evaluate_zeroshot
    from ..retrieval import Index
    from ..retrieval.gallery import GallerySection, write_gallery
    from ..retrieval.search import search_index
    from .scenes import distinct_meanings, generate_folder

    if not 1 <= n_photos <= distinct_meanings():
        raise UsageError(
            f"n_photos must be between 1 and {distinct_meanings()} (the scenes with distinct meanings), got {n_photos}",
            hint=f"ask for at most {distinct_meanings()} photos",
        )

    t_start = time.perf_counter()
    root = Path(directory).expanduser().resolve()
    photos = root / "photos"
    if progress:
        progress("photos", 0, n_photos)
    records = generate_folder(photos, n=n_photos, seed=PHOTO_SEED, broken=True)
    if progress:
        progress("photos", n_photos, n_photos)

    index = Index.open(root / "index", model=model, pretrained=pretrained, device=device, create=True, rebuild=True)
    try:
        report = index.update([photos], cache_tokens=True, progress=progress)
        queries: list[DemoQuery] = []
        sections: list[GallerySection] = []
        chosen = _pick_queries(records, n_queries)
        for i, (text, truth) in enumerate(chosen):
            if progress:
                progress("search", i, len(chosen))
            first = search_index(index, text=text, n=pool, rerank=False)
            second = search_index(index, text=text, n=pool, rerank=True, rerank_k=pool)
            truth_path = photos / truth
            q = DemoQuery(
                text=text,
                truth=truth,
                contrastive=[h.to_dict() for h in first.hits[:top]],
                reranked=[h.to_dict() for h in second.hits[:top]],
                rank_contrastive=_rank_of(first.hits, truth_path),
                rank_rerank=_rank_of(second.hits, truth_path),
                pool=pool,
                timings_ms={
                    "embed": first.timings["embed"] * 1000,
                    "search": first.timings["search"] * 1000,
                    "rerank": second.timings.get("rerank", 0.0) * 1000,
                },
            )
            queries.append(q)
            where = lambda r: f"rank {r}" if r else f"not in the top {pool}"  # noqa: E731
            sub = f"true image {truth}: {where(q.rank_contrastive)} by similarity, {where(q.rank_rerank)} after rerank"
            marked = _truth_ids(first.hits + second.hits, truth_path)
            sections.append(GallerySection(f"“{text}” — contrastive top {top}", first.hits[:top], sub, marked=marked))
            sections.append(
                GallerySection(f"“{text}” — reranked by caption likelihood", second.hits[:top], marked=marked)
            )
        if progress:
            progress("search", len(chosen), len(chosen))
        zs_dir = make_zeroshot_folder(root / "zeroshot", per_class=zeroshot_per_class)
        zs = evaluate_zeroshot(str(zs_dir), index.model, templates=["a {}"], workers=0, progress=progress)
        model_info = index.model.info()
    finally:
        index.close()

    html = write_gallery(
        root / "report.html",
        "cocatk demo",
        sections,
        footer=f"model {model_info['model']} ({model_info['arch']}); zero-shot top-1 "
        f"{zs.metrics['top1']:.1%} over {zs.data.get('num_classes', '?')} classes, n={zs.metrics['n']}",
        meta={
            "model": f"{model_info['model']} ({model_info['arch']})",
            "index": str(root / "index"),
            "photos": f"{photos} ({n_photos} generated scenes, 3 broken files)",
            "queries": f"{len(chosen)} captions of scenes in the folder; each one's true image is framed in green",
        },
        warnings=["random weights: the scores carry no meaning"] if model_info.get("random_weights") else (),
    )
    result = DemoReport(
        directory=str(root),
        model=model_info,
        index=report.to_dict(),
        queries=queries,
        zeroshot={"metrics": zs.metrics, "data": zs.data, "by_scorer": zs.by_scorer},
        html=str(html),
        seconds=time.perf_counter() - t_start,
    )
    (root / "demo.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    return result
