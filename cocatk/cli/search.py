"""`cocatk search`: text and image queries, FAISS top-k, caption-likelihood rerank."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ..paths import display_path
from . import options
from .progress import progress_bar
from .render import err, note, print_json, print_paths, print_table, show_path, warn


def register(app: typer.Typer) -> None:
    app.command("search")(search)


def search(
    query: Annotated[str | None, typer.Argument(help='What to look for, e.g. "a red bicycle".')] = None,
    index: options.IndexDir = None,
    n: Annotated[int, typer.Option("-n", "--top", help="Results to show.")] = 10,
    rerank: Annotated[
        bool,
        typer.Option("--rerank/--no-rerank", help="Rerank the top --rerank-k (by caption log-likelihood: --reranker)."),
    ] = True,
    rerank_k: Annotated[int, typer.Option("--rerank-k", help="Candidates taken from FAISS for the rerank.")] = 50,
    image: Annotated[
        Path | None, typer.Option("--image", help="Search by this image (with a text: the mean of both).")
    ] = None,
    negative: Annotated[
        list[str] | None, typer.Option("--not", help="Subtract this text's embedding (repeatable).")
    ] = None,
    under: Annotated[Path | None, typer.Option("--under", help="Only hits below this folder.")] = None,
    match: Annotated[
        str | None,
        typer.Option(
            "--match",
            help='Only images whose generated caption matches these words (full text: words ANDed, "a phrase", '
            "OR, NOT, prefix*); `cocatk caption` makes the captions.",
        ),
    ] = None,
    tag: Annotated[
        str | None,
        typer.Option(
            "--tag",
            help="Only images tagged with this label or group (e.g. beach, Animal); `cocatk tag` makes the tags.",
        ),
    ] = None,
    json_: options.Json = False,
    paths: Annotated[
        bool, typer.Option("--paths", help="Print each hit's path, one per line, as the exact bytes (for xargs).")
    ] = False,
    paths0: Annotated[
        bool,
        typer.Option("--paths0", "-0", help="Like --paths, NUL-terminated (xargs -0), for names with newlines."),
    ] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML gallery.")] = None,
    cache_tokens: Annotated[
        bool,
        typer.Option(
            "--cache-tokens/--no-cache-tokens",
            help="Use decoder tokens stored by `cocatk index --cache-tokens` when present (else re-decode files).",
        ),
    ] = True,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    device: options.Device = None,
    precision: options.Precision = None,
    reranker: options.Reranker = "coca",
    rerank_model: options.RerankModel = None,
    rerank_pretrained: options.RerankPretrained = None,
    backend: options.Backend = "auto",
) -> None:
    """Search the index with text (and/or an image); rerank by CoCa caption likelihood (or BLIP-ITM)."""
    from ..errors import UsageError
    from ..paths import display_path
    from ..retrieval import Index
    from ..retrieval.gallery import GallerySection, check_target, write_gallery
    from ..retrieval.search import search_index

    if sum([json_, paths, paths0]) > 1:
        raise UsageError("--json, --paths and --paths0 exclude each other", hint="pick one output format")
    if html is not None:
        check_target(html)  # before the search, not after it
    idx = Index.open(index, model=model, pretrained=pretrained, device=device, precision=precision)
    with progress_bar() as progress:  # a bar only while candidates' tokens are computed from their files
        result = search_index(
            idx,
            reranker=reranker,
            rerank_model=rerank_model,
            rerank_pretrained=rerank_pretrained,
            backend=backend,
            text=query,
            image=image,
            negative=tuple(negative or ()),
            n=n,
            rerank=rerank,
            rerank_k=rerank_k,
            under=under,
            use_token_cache=cache_tokens,
            match=match,
            tag=tag,
            notify=warn,
            progress=progress,
        )
    if result.dropped:
        shown = ", ".join(f"{display_path(p)} ({r})" for p, r in result.dropped[:3])
        more = f" and {len(result.dropped) - 3} more" if len(result.dropped) > 3 else ""
        warn(f"{len(result.dropped)} candidate(s) skipped: {shown}{more}; run `cocatk index` to refresh the index")
    if html is not None:
        title = query or (f"images like {display_path(str(image))}" if image else "search")
        page = write_gallery(
            html,
            f"cocatk search: {title}",
            [GallerySection(title, result.hits)],
            meta=_page_meta(result, idx.dir),
            warnings=result.warnings,
        )
        note(f"wrote {display_path(str(page))}")
    if json_:
        print_json(result.to_dict())
    elif paths or paths0:
        print_paths([hit.path for hit in result.hits], nul=paths0)
    else:
        _table(result)
        return
    for message in result.warnings:
        warn(message)


def _page_meta(result, index_dir: Path) -> dict[str, str]:  # noqa: ANN001 - SearchResult
    """The gallery header: what was asked, of which index, with which model."""
    q = result.query
    meta = {"query": q["text"] or ""}
    if q["image"]:
        meta["image"] = display_path(q["image"])
    if q["not"]:
        meta["not"] = ", ".join(q["not"])
    if q["under"]:
        meta["under"] = q["under"]
    m = result.model
    meta["model"] = f"{m.get('model')} ({m.get('arch')}, {m.get('pretrained')})"
    meta["index"] = str(index_dir)
    by = "BLIP-ITM match probability" if result.reranker == "blip-itm" else "caption likelihood"
    rerank = f"top {result.candidates} by {by}" if result.reranked else "off"
    if result.rerank_model:
        rerank += f" ({result.rerank_model.get('model')})"
    meta["ranking"] = f"{len(result.hits)} hits by similarity; rerank {rerank}"
    return {k: v for k, v in meta.items() if v}


def _table(result) -> None:  # noqa: ANN001 - SearchResult
    title = result.query["text"] or result.query["image"]
    table = Table(title=Text(display_path(title)), title_justify="left")
    if result.warnings:  # in the table's footer, where the reader looks
        table.caption = Text("\n".join(f"warning: {w}" for w in result.warnings), style="yellow")
        table.caption_justify = "left"
    table.add_column("#", justify="right")
    table.add_column("path", overflow="fold")
    table.add_column("similarity", justify="right")
    blip = result.reranker == "blip-itm"
    table.add_column("P(match)" if blip else "log-likelihood", justify="right")
    captions = any(hit.caption for hit in result.hits)
    if captions:
        table.add_column("caption", overflow="fold")
    for hit in result.hits:
        score = hit.match if blip else hit.loglik
        ll = "–" if score is None else f"{score:.3f}" if blip else f"{score:.2f}"
        row = [str(hit.rank), show_path(hit.path), f"{hit.similarity:.4f}", ll]
        table.add_row(*row, *([Text(hit.caption or "")] if captions else []))
    print_table(table)
    t = result.timings
    parts = [f"embed {t['embed'] * 1000:.0f} ms", f"search {t['search'] * 1000:.1f} ms"]
    if "rerank" in t:
        parts.append(
            f"rerank {t['rerank'] * 1000:.0f} ms ({result.candidates} candidates, "
            + ("images from files)" if blip else f"tokens from {result.tokens_from})")
        )
    err.print(f"{len(result.hits)} hits · " + " · ".join(parts), style="dim", highlight=False)
