"""`cocatk index` (build or update an image index) and `cocatk info` (describe one)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from ..paths import display_path
from . import options
from .progress import progress_bar
from .render import err, note, out, print_json, show_path, stdout_to_stderr, warn


def register(app: typer.Typer) -> None:
    app.command("index")(index)
    app.command("info")(info)
    app.command("forget")(forget)
    app.command("compact")(compact)
    app.command("check")(check)


def index(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Image files or folders (recursive); dataset sources: WebDataset shards "
            "('shards/{00000..00127}.tar'), "
            "Parquet or Arrow files ('data/*.parquet'), hf:PATH (save_to_disk) or hf:NAME (the local Hugging Face "
            "cache). Default: every root already in the index."
        ),
    ] = None,
    index_dir: options.IndexDir = None,
    model: options.Model = None,
    pretrained: options.Pretrained = None,
    batch_size: options.BatchSize = None,
    workers: options.Workers = None,
    device: options.Device = None,
    precision: options.Precision = None,
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
    max_index_memory: Annotated[
        str | None,
        typer.Option(
            "--max-index-memory",
            metavar="SIZE",
            help="Instead of --faiss: choose the FAISS index for this much memory (4G, 512M; binary units), tuned "
            "to recall@10 0.95 on held-out queries and recorded (`cocatk info` shows it); kept by later runs.",
        ),
    ] = None,
    max_query_ms: Annotated[
        float | None,
        typer.Option("--max-query-ms", help="With --max-index-memory: the latency limit of one query while tuning."),
    ] = None,
    cache_tokens: Annotated[
        bool | None,
        typer.Option(
            "--cache-tokens/--no-cache-tokens",
            help="Store each image's decoder tokens (fp16; of --rerank-model if set), so that search reranks without "
            "reading files or loading torch; --cache-tokens on an index without them reads every image again, "
            "--no-cache-tokens stops and drops them.",
            show_default="on for a new CoCa index",
        ),
    ] = None,
    token_cache_limit: Annotated[
        float,
        typer.Option("--token-cache-limit", min=0.001, help="Largest token cache, in GiB."),
    ] = 8.0,
    caption: Annotated[
        bool,
        typer.Option(
            "--caption",
            help="Also caption every image with CoCa's decoder (default settings; `cocatk caption` for others), "
            "new ones in the same pass as their embedding.",
        ),
    ] = False,
    rerank_model: options.RerankModel = None,
    rerank_pretrained: options.RerankPretrained = None,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild",
            help="Drop everything indexed with another model and re-encode with --model (or switch --rerank-model).",
        ),
    ] = False,
    checkpoint_every: Annotated[
        int, typer.Option("--checkpoint-every", min=1, help="Files per durable checkpoint.")
    ] = 256,
    image_column: Annotated[
        str | None,
        typer.Option(
            "--image-column",
            help="Parquet / Arrow / hf: column of the encoded images (kept for reruns).",
            show_default="the Image column, else image, img, jpg, ...",
        ),
    ] = None,
    caption_column: Annotated[
        str | None,
        typer.Option(
            "--caption-column",
            help="Parquet / Arrow / hf: column of the captions (kept for reruns).",
            show_default="caption, captions, txt or text",
        ),
    ] = None,
    json_: options.Json = False,
    ray: options.Ray = None,
    ray_actors: options.RayActors = None,
    ray_gpus_per_actor: options.RayGpusPerActor = None,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="Then keep watching: new, changed, moved and deleted files are indexed in batches (one line each) "
            "until Ctrl-C or SIGTERM.",
        ),
    ] = False,
    from_embeddings: Annotated[
        Path | None,
        typer.Option(
            "--from-embeddings",
            metavar="OUT",
            help="Import clip-retrieval's embeddings folder OUT (img_emb/, metadata/; `cocatk export` writes one) "
            "instead of encoding: the vectors of the same --model, keyed by image_path; PATHs, if given, are the "
            "roots the rows must lie below.",
        ),
    ] = None,
) -> None:
    """Index images: new and changed files are encoded, moved files keep their vectors, deleted files are removed.

    Safe to interrupt: the next run resumes from the last checkpoint.
    """
    from ..retrieval.index import Index, resolve_roots

    if max_index_memory is not None or max_query_ms is not None:  # refused before an index folder is created
        from ..retrieval.budget import check_budget_options

        check_budget_options(max_index_memory, max_query_ms, faiss_factory)
    if from_embeddings is not None:
        from ..errors import UsageError
        from .export import run_import

        given = [o for o, v in (("--ray", ray), ("--watch", watch), ("--caption", caption), ("--faiss", faiss_factory),
                                ("--cache-tokens", cache_tokens), ("--max-index-memory", max_index_memory))
                 if v]  # fmt: skip
        if given:
            raise UsageError(
                f"--from-embeddings imports vectors; it does not combine with {', '.join(given)}",
                hint="import first, then run `cocatk index` with those options",
            )
        run_import(from_embeddings, paths, index_dir=index_dir, model=model, pretrained=pretrained, device=device,
                   precision=precision, rebuild=rebuild, checkpoint_every=checkpoint_every, workers=workers,
                   json_=json_)  # fmt: skip
        return

    resolve_roots(paths or [])  # a bad PATH fails before an index folder is created
    if ray is not None:
        from ..retrieval.ray_encoder import require_ray

        require_ray()  # without the extra: one line naming it, before any index folder is touched
    with stdout_to_stderr(ray is not None), progress_bar(disable=json_) as progress:
        if progress is not None:
            progress("start", 0, None)
        # lock=True: a second writer is refused before any model is loaded.
        ix = Index.open(
            index_dir,
            model=model,
            pretrained=pretrained,
            device=options.driver_device(ray, device),
            precision=precision,
            create=True,
            rebuild=rebuild,
            lock=True,
            progress=progress,
            rerank_model=rerank_model,
            rerank_pretrained=rerank_pretrained,
            # --ray: the driver's copy is on the CPU, the actors' device picks the default model
            model_device=(device or "auto") if ray is not None else None,
            on_model_choice=lambda choice: note(f"note: {choice.describe()}"),
        )
        encoder = None
        if ray is not None:
            from ..retrieval.ray_encoder import RayEncoder

            encoder = RayEncoder(
                ix.manifest["model"],
                ix.manifest["pretrained"],
                **options.ray_kwargs(ray, ray_actors, ray_gpus_per_actor, device),
                precision=precision,
                batch_size=batch_size,
                max_megapixels=max_megapixels,
            )
        with ix, encoder or contextlib.nullcontext():
            report = ix.update(
                [str(p) for p in paths or []],
                batch_size=batch_size,
                workers=workers,
                follow_symlinks=follow_symlinks,
                max_megapixels=max_megapixels,
                faiss_factory=faiss_factory,
                cache_tokens=cache_tokens,
                token_cache_limit_gb=token_cache_limit,
                notify=warn,
                caption={} if caption else None,
                checkpoint_every=checkpoint_every,
                progress=progress,
                encoder=encoder,
                image_column=image_column,
                caption_column=caption_column,
                max_index_memory=max_index_memory,
                max_query_ms=max_query_ms,
            )
            chosen = ix.manifest.get("budget") if max_index_memory is not None else None
    data = report.to_dict()
    if chosen:
        data["budget"] = chosen
    for root in report.missing_roots:
        warn(f"root {display_path(root)} is missing (unmounted?): its files are kept")
    for message in report.warnings:
        warn(message)
    _print_failures(report.failures, "skipped")
    if len(report.failures) > 20:
        err.print(f"[dim]... and {len(report.failures) - 20} more (`cocatk info` lists them)[/]")
    if json_:
        print_json(data)
    else:
        _print_summary(data)
        if chosen:
            out.print(f"  faiss {_budget_line(chosen)}", highlight=False, markup=False)
    if watch:
        _watch(
            report.index_dir,
            paths,
            device,
            json_,
            workers=workers,
            batch_size=batch_size,
            follow_symlinks=follow_symlinks,
            max_megapixels=max_megapixels,
            checkpoint_every=checkpoint_every,
        )


def _watch(index_dir: str, paths: list[Path] | None, device: str | None, json_: bool, **update: Any) -> None:
    """Watch the roots until Ctrl-C or SIGTERM, one line per batch (a JSON line with --json)."""
    import json
    import signal
    import threading
    import time

    from ..retrieval.index import Index
    from ..retrieval.watch import WatchBatch, watch_index

    stop = threading.Event()

    def line(b: WatchBatch) -> None:
        if json_:
            out.print(json.dumps(_json_safe_batch(b)), markup=False, highlight=False, soft_wrap=True)
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(b.time))
        roots = ", ".join(display_path(r) for r in b.roots)
        if b.kind == "missing":
            warn(f"{stamp} root {roots} is missing (deleted or unmounted?): its files are kept; waiting for it")
        elif b.kind == "back":
            note(f"{stamp} root {roots} is back: watching it again")
        elif b.kind == "error":
            warn(f"{stamp} batch {b.number} failed: {b.error}")
        elif b.kind == "batch" or b.added + b.changed + b.moved + b.removed + b.failed:
            out.print(
                f"{stamp} {b.kind} {b.number}: {b.added} added, {b.changed} changed, {b.moved} moved, "
                f"{b.removed} removed, {b.failed} failed in {b.seconds:.2f} s ({b.events} events; "
                f"{b.total} images indexed)",
                markup=False,
                highlight=False,
            )

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    note(f"watching {', '.join(display_path(str(p)) for p in paths or []) or 'the index roots'} (Ctrl-C to stop)")
    try:
        with Index.open(index_dir, device=device, lock=True) as ix:
            batches = watch_index(ix, [str(p) for p in paths or []], on_batch=line, stop=stop, **update)
    finally:
        signal.signal(signal.SIGTERM, previous)
    note(f"stopped watching after {batches} batches; everything committed is kept")


def _json_safe_batch(b: Any) -> dict[str, Any]:
    d = b.to_dict()
    d.pop("report", None)
    return d


def _print_failures(failures: list[dict[str, str]], verb: str, console: Any = None) -> None:
    """One line per failed file (the first 20): ``<verb> <path>: <reason> (<detail>)``; names are shown, not parsed."""
    for f in failures[:20]:
        detail = f" ({f['detail']})" if f.get("detail") else ""
        line = Text.assemble((f"{verb} ", "dim"), display_path(f["path"]), f": {f['reason']}{detail}")
        (console or err).print(line, highlight=False, soft_wrap=True)


def _print_summary(d: dict[str, Any]) -> None:
    failed = ", ".join(f"{n} {reason}" for reason, n in sorted(d["failed"].items())) or "0"
    out.print(
        f"[bold]{escape(display_path(d['index_dir']))}[/]: {d['total']} images indexed\n"
        f"  scanned {d['scanned']}  new {d['new']}  changed {d['changed']}  unchanged {d['unchanged']}  "
        f"moved {d['moved']}  removed {d['removed']}  duplicates {d['duplicates']}\n"
        f"  failed {failed}\n"
        f"  encoded {d['encoded']} images in {d['seconds']:.1f} s ({d['images_per_s']:.1f} images/s)"
        + (f" at {', '.join(d['precisions'])}" if d.get("precisions") else "")
        + (f"; captioned {d['captioned']}" if d.get("captioned") else "")
        + (
            f"\n  token cache {d['token_cache_bytes'] / 1e6:.1f} MB (the rerank reads them, not the files)"
            if d.get("token_cache_bytes")
            else ""
        )
        + (
            f"\n  exported the model to ONNX for searches without torch in {t:.1f} s (once per model)"
            if d.get("text_export") == "exported" and (t := d["timings"].get("text_onnx")) is not None
            else ""
        ),
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
    out.print(show_path(data["index_dir"], style="bold"), highlight=False)
    m = data["manifest"]
    if m is None:
        out.print(
            "empty: no image indexed yet (the first `cocatk index` run did not finish); "
            f"run `cocatk index PATH --index {display_path(data['index_dir'])}`",
            highlight=False,
            markup=False,
        )
        return
    ident = m.get("identity", {})
    rows = [
        ("model", f"{ident.get('model')} ({ident.get('arch')})"),
        ("weights", str(ident.get("weights"))),
        *(
            [
                (
                    "rerank model",
                    f"{rr['identity'].get('model')} ({rr['identity'].get('arch')}, {rr['identity'].get('weights')})",
                )
            ]
            if (rr := m.get("rerank_model"))
            else []
        ),
        ("embedding", f"{m.get('embed_dim')}-d, {m.get('metric')}, image size {m.get('image_size')}"),
        ("precision", ", ".join(m.get("precisions") or []) or "not recorded (fp32: built before indexes recorded it)"),
        ("text queries", _text_queries_line(data.get("text_queries") or {})),
        ("faiss", _faiss_line(m, data["faiss_file"])),
        ("images", f"{data['files']} files, {data['unique_contents']} distinct contents" if data["files"] else "none"),
        ("tokens", f"{'cached' if m.get('cache_tokens') else 'not cached'} ({data['token_cache_bytes'] / 1e6:.1f} MB)"),
        ("captions", _captions_line(data.get("captions") or {})),
        ("tags", _tags_line(data.get("tags") or {}, data.get("sidecars") or 0)),
        ("size on disk", f"{data['size_bytes'] / 1e6:.1f} MB"),
        ("schema", f"v{m.get('schema_version')}, built by cocatk {m.get('cocatk_version')}"),
        ("roots", "\n".join(display_path(r) for r in data["roots"]) or "-"),
        ("failed", ", ".join(f"{n} {r}" for r, n in sorted(data["failed"].items())) or "0"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        v = v.replace("\n", "\n" + " " * (width + 2))
        out.print(f"{k:<{width}}  {v}", highlight=False, markup=False)
    _print_failures(data["failures"], " ", console=out)
    if len(data["failures"]) > 20:
        out.print(f"  ... and {len(data['failures']) - 20} more (`cocatk info --json` lists all)", markup=False)
    if data["files"] == 0:
        out.print("this index is empty: add images with `cocatk index PATH`", style="dim", highlight=False)


def _faiss_line(m: dict[str, Any], faiss_file: str | None) -> str:
    where = f"({faiss_file or 'rebuilt from SQLite on next open'})"
    b = m.get("budget")
    if b and b.get("factory") == m.get("factory"):
        return f"{_budget_line(b)}\n{where}"
    return f"{m.get('factory')} {where}"


def _budget_line(b: dict[str, Any]) -> str:
    from ..retrieval.budget import describe

    return describe(b)


def _text_queries_line(t: dict[str, Any]) -> str:
    if t.get("backend") == "onnxruntime":
        rerank = t.get("rerank") or {}
        if rerank.get("backend") == "onnxruntime":
            how = "; the rerank from cached tokens too"
        elif rerank:
            how = f"; the rerank through torch: {rerank.get('why')}"
        else:
            how = ""
        images = t.get("images") or {}
        if images.get("backend") == "onnxruntime":
            how += "; cold image queries too"
        elif images:
            how += f"; image queries through torch: {images.get('why')}"
        return f"ONNX Runtime, without torch ({display_path(t['export'])}){how}"
    return f"torch: {t.get('why', 'unknown')}"


def _tags_line(configs: dict[str, Any], sidecars: int) -> str:
    """The latest tag settings: how many tags on how many images, the vocabulary and the rule; the sidecars."""
    if not configs:
        return "none (`cocatk tag` adds them)"
    key, c = list(configs.items())[-1]
    vocab, rule = c.get("vocabulary", {}), c.get("rule", {})
    more = f"; {len(configs) - 1} older settings" if len(configs) > 1 else ""
    side = f"; {sidecars} XMP sidecars written" if sidecars else ""
    source = display_path(str(vocab.get("name")))
    return (f"{c['count']} on {c['images']} images ({vocab.get('labels')} labels of {source}, "
            f"p >= {rule.get('threshold')}; key {key}{more}{side})")  # fmt: skip


def _captions_line(configs: dict[str, Any]) -> str:
    """One line per caption settings key: how many captions, and how they were made."""
    if not configs:
        return "none (`cocatk caption` adds them)"
    lines = []
    for key, c in configs.items():
        if "generation" not in c and c.get("source"):  # captions that came with a dataset, not generated
            lines.append(f"{c['count']} (the dataset's own; key {key})")
            continue
        g = c.get("generation", {})
        how = g.get("strategy", "?") + (f" {g['num_beams']} beams" if g.get("strategy") == "beam" else "")
        lines.append(f"{c['count']} ({how}, {c.get('model', {}).get('model', '?')}; key {key})")
    return "\n".join(lines)


def forget(
    roots: Annotated[list[Path], typer.Argument(help="Roots to drop (as `cocatk info` lists them); may be gone.")],
    index_dir: options.IndexDir = None,
    json_: options.Json = False,
) -> None:
    """Drop roots from the index with every image below them (an old drive). Files on disk are not touched."""
    from ..retrieval.index import Index

    with Index.open(index_dir, lock=True) as ix:
        result = ix.forget(roots)
    if json_:
        print_json(result)
        return
    for r in result["roots"]:
        out.print(Text.assemble("forgot ", display_path(r)), highlight=False)
    out.print(f"{result['files']} images removed from {display_path(result['index_dir'])}", highlight=False)
    note("run `cocatk compact` to give the space back to the disk")


def compact(index_dir: options.IndexDir = None, json_: options.Json = False) -> None:
    """Reclaim disk space: VACUUM the SQLite store, fold its log back, delete stale vector and temporary files."""
    from ..retrieval.index import Index

    with Index.open(index_dir, lock=True) as ix:
        result = ix.compact()
    if json_:
        print_json(result)
        return
    out.print(
        f"{display_path(result['index_dir'])}: {result['before_bytes'] / 1e6:.1f} MB -> "
        f"{result['after_bytes'] / 1e6:.1f} MB ({result['reclaimed_bytes'] / 1e6:.1f} MB reclaimed)",
        highlight=False,
        markup=False,
    )


def check(index_dir: options.IndexDir = None, json_: options.Json = False) -> None:
    """Verify an index: SQLite and FAISS agree, tokens and captions only for indexed files. Exit 1 on a problem."""
    from ..retrieval.index import Index

    with Index.open(index_dir) as ix:
        report = ix.check()
        where = str(ix.dir)
    if json_:
        print_json({"index_dir": where, **report.to_dict()})
    elif report.ok:
        out.print(
            f"{display_path(where)}: consistent ({report.files} files, {report.vectors} vectors, "
            f"{report.tokens} token sets)",
            highlight=False,
            markup=False,
        )
    else:
        for problem in report.problems:
            err.print(Text.assemble(("problem: ", "red"), problem), highlight=False)
        note(f"{len(report.problems)} problems in {display_path(where)}: rerun the command that was interrupted; "
             "if they stay, `cocatk index --rebuild` rebuilds the index from the images")  # fmt: skip
    if not report.ok:
        raise typer.Exit(1)
