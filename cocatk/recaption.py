"""Stand-alone recaptioning: caption folders of images or a Hugging Face dataset into a JSONL, CSV or Parquet file,
without an index (the DALL-E 3 style "recaption a training set" job).

The output is written as the work goes: every batch is appended and flushed to disk (JSONL and CSV directly; Parquet
through a journal ``OUTPUT.partial.jsonl`` that becomes the Parquet file, atomically, when the run completes), so
a run killed at any moment keeps what it wrote and the next run with the same output resumes: sources already in
the output (captioned or failed) are skipped. An unreadable image is a record with an ``error``, not a crash.

Record fields: ``source`` (the file path as text, or ``hf:NAME#ROW``; ``source_b64`` holds the exact bytes of a
file name that is not UTF-8), ``caption``, ``logprob`` (sum of log p over the caption's tokens, nats), ``error``
(null, or why the image could not be read), ``model`` and ``settings`` (the key of the model identity and the
generation settings, as in an index's ``caption_configs``).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .paths import json_path, text_path
from .retrieval.captions import CaptionRate

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .captioning import GenerationConfig
    from .models import CocaModel

FORMATS = (".jsonl", ".csv", ".parquet")
CSV_FIELDS = ["source", "source_b64", "caption", "logprob", "error", "model", "settings"]
_JOURNAL = ".partial.jsonl"


@dataclass
class RecaptionReport(CaptionRate):
    """What one :func:`recaption` run did."""

    output: str
    format: str
    settings: str
    sources: int = 0
    captioned: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    already: int = 0
    seconds: float = 0.0
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["captions_per_s"] = round(self.captions_per_s, 2)
        d["seconds"] = round(self.seconds, 3)
        return d


# ---- sources ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Item:
    key: str  # what the output records as `source`
    load: Any  # () -> PIL image
    path: str | None = None  # the file, for a file (a Ray worker reads it); None for a dataset row


def _items(sources: Sequence[str], split: str | None, image_column: str | None) -> list[_Item]:
    from .images import find_images, load_image

    items: list[_Item] = []
    for src in sources:
        if src.startswith("hf:"):
            items.extend(_hf_items(src, split, image_column))
            continue
        if not Path(src).expanduser().exists():
            raise UsageError(f"{src} does not exist", hint="pass image files, folders, or hf:NAME / hf:PATH")
        for p in find_images([src]):
            path = str(p)
            items.append(_Item(path, lambda path=path: load_image(path), path))
    return items


def _hf_items(spec: str, split: str | None, image_column: str | None) -> list[_Item]:
    """Rows of a cached (``hf:NAME``) or saved (``hf:PATH``) Hugging Face dataset, decoded lazily."""
    from .evaluation.data import decode_cell, load_cached, load_saved, undecoded
    from .images import load_image

    name = spec[3:]
    if Path(name).expanduser().is_dir():
        ds, _ = load_saved(Path(name).expanduser(), split, ("train", "test", "validation"))
    else:
        ds, _ = load_cached(name, split, ("train", "test", "validation"))
    import datasets

    columns = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    column = image_column or (columns[0] if columns else None)
    if column is None or column not in ds.features:
        raise UsageError(
            f"{spec} has no image column {image_column or ''}".strip(),
            hint=f"pass --image-column, one of: {', '.join(ds.features)}",
        )
    ds = undecoded(ds, column)

    def loader(row: int) -> Any:
        return lambda: decode_cell(ds[row][column], lambda f: load_image(f))

    return [_Item(f"{spec}#{i}", loader(i)) for i in range(len(ds))]


# ---- the output ---------------------------------------------------------------------------------------------------
def _record_source(record: dict[str, Any]) -> str:
    if record.get("source_b64"):
        import base64

        return os.fsdecode(base64.b64decode(record["source_b64"]))
    return str(record["source"])


def _done_sources(output: Path) -> set[str]:
    """Sources already in the output (and its journal): a resumed run skips them."""
    done: set[str] = set()
    journal = output.with_name(output.name + _JOURNAL)
    for path in (output, journal):
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for rec in pq.read_table(path).to_pylist():
                done.add(_record_source(rec))
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                done.update(_record_source(rec) for rec in csv.DictReader(f))
        else:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        try:
                            done.add(_record_source(json.loads(line)))
                        except json.JSONDecodeError:
                            continue  # a line cut by a crash: that source is done again
    return done


class _Writer:
    """Appends records durably (flush + fsync per batch)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.kind = output.suffix
        target = output.with_name(output.name + _JOURNAL) if self.kind == ".parquet" else output
        new = not target.exists() or target.stat().st_size == 0
        self.f = open(target, "a", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.csv = csv.DictWriter(self.f, fieldnames=CSV_FIELDS) if self.kind == ".csv" else None
        if self.csv is not None and new:
            self.csv.writeheader()

    def write(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            if self.csv is not None:
                self.csv.writerow({k: rec.get(k) for k in CSV_FIELDS})
            else:
                self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self, complete: bool) -> None:
        self.f.close()
        if self.kind == ".parquet" and complete:
            _journal_to_parquet(self.output)


def _journal_to_parquet(output: Path) -> None:
    """Fold the journal into the Parquet file (previous rows kept), atomically: temp file, rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    journal = output.with_name(output.name + _JOURNAL)
    rows: list[dict[str, Any]] = pq.read_table(output).to_pylist() if output.is_file() else []
    if journal.is_file():
        with open(journal, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    table = pa.Table.from_pylist([{k: r.get(k) for k in CSV_FIELDS} for r in rows])
    tmp = output.with_name(output.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, output)
    journal.unlink(missing_ok=True)


# ---- the job ------------------------------------------------------------------------------------------------------
def _decoded(items: list[_Item], workers: int) -> Iterator[tuple[_Item, Image.Image | None, str | None]]:
    from .images import ImageDecodeError

    def load(item: _Item) -> tuple[_Item, Image.Image | None, str | None]:
        try:
            return item, item.load(), None
        except ImageDecodeError as e:
            return item, None, e.reason + (f" ({e.detail})" if e.detail else "")
        except Exception as e:  # a broken dataset cell: recorded, never fatal
            return item, None, f"decode error ({type(e).__name__}: {str(e)[:120]})"

    if workers == 0:
        yield from map(load, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="cocatk-recaption") as pool:
        yield from pool.map(load, items)  # in order; decoding runs ahead of the model


def recaption(
    sources: Sequence[str],
    output: str | os.PathLike[str],
    model: CocaModel,
    config: GenerationConfig | Mapping[str, Any] | None = None,
    *,
    batch_size: int = 16,
    workers: int | None = None,
    limit: int | None = None,
    split: str | None = None,
    image_column: str | None = None,
    progress: Any = None,
    captioner: Any = None,
) -> RecaptionReport:
    """Caption every image of ``sources`` (files, folders, ``hf:NAME``, ``hf:PATH``) into ``output``.

    Args:
        captioner: a :class:`~cocatk.retrieval.ray_encoder.RayCaptioner` to caption on a Ray cluster (files only);
            None captions here with ``model``. The output, its checkpoints and its resume are the same either way.

    Raises:
        UsageError: an unknown output format, a source that does not exist, a model without a decoder, a dataset
            source with a captioner.
    """
    from .captioning import generate_captions, make_config
    from .retrieval.captions import caption_settings, require_decoder

    out = Path(output).expanduser()
    if out.suffix not in FORMATS:
        raise UsageError(
            f"--output {output}: unknown format '{out.suffix or '(none)'}'", hint=f"end it with {', '.join(FORMATS)}"
        )
    if out.is_dir():
        raise UsageError(f"--output {output} is a folder", hint=f"pass a file name such as {out / 'captions.jsonl'}")
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}", hint="pass --batch-size 1 or more")
    require_decoder(model)
    cfg = make_config(model, config)
    cfg.resolved_max_len(model.context_length)
    key, _ = caption_settings(model, cfg)
    t0 = time.monotonic()
    if captioner is not None and any(str(src).startswith("hf:") for src in sources):
        raise UsageError(
            "--ray captions image files; a Hugging Face dataset (hf:...) is captioned in this process",
            hint="drop --ray for hf: sources, or save the dataset's images as files on a shared filesystem",
        )
    items = _items(sources, split, image_column)
    report = RecaptionReport(output=str(out), format=out.suffix[1:], settings=key, sources=len(items))
    done = _done_sources(out)
    todo = [it for it in items if it.key not in done]
    report.already = len(items) - len(todo)
    if limit is not None:
        todo = todo[: max(0, limit)]
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = progress or (lambda stage, done, total: None)
    progress("caption", 0, len(todo))
    writer = _Writer(out)
    complete = False
    try:
        batch: list[tuple[_Item, Image.Image]] = []
        records: list[dict[str, Any]] = []
        count = 0

        def flush() -> None:
            nonlocal count
            if batch:
                caps = generate_captions(model, [im for _, im in batch], cfg, batch_size=len(batch))
                for (item, _), cap in zip(batch, caps, strict=True):
                    _add(report, records, item.key, model, key, caption=cap.text, logprob=cap.logprob)
            writer.write(records)
            count += len(batch) + sum(1 for r in records if r["error"])
            batch.clear()
            records.clear()
            progress("caption", count, len(todo))

        if captioner is not None:
            _caption_on_ray(captioner, todo, cfg, model, key, report, writer, batch_size, progress)
            complete = True
            return _finished(report, t0)
        threads = max(1, min(8, os.cpu_count() or 1)) if workers is None else workers
        for item, image, error in _decoded(todo, threads):
            if image is None:
                _add(report, records, item.key, model, key, error=error or "decode error")
            else:
                batch.append((item, image))
            if len(batch) >= batch_size:
                flush()
        flush()
        complete = True
    finally:
        writer.close(complete)
    return _finished(report, t0)


def _finished(report: RecaptionReport, t0: float) -> RecaptionReport:
    report.seconds = time.monotonic() - t0
    return report


def _caption_on_ray(
    captioner: Any,
    todo: list[_Item],
    cfg: GenerationConfig,
    model: CocaModel,
    key: str,
    report: RecaptionReport,
    writer: _Writer,
    batch_size: int,
    progress: Any,
) -> None:
    """The files of ``todo`` through ``captioner``: results come back in order and are written every ``batch_size``
    records, as the local loop writes them. Files are decoded at full size, as locally (no JPEG draft)."""
    records: list[dict[str, Any]] = []
    done = 0
    for item, res in zip(todo, captioner.caption([it.path for it in todo], cfg, draft=False), strict=True):
        if res.reason:
            _add(report, records, item.key, model, key, error=res.reason + (f" ({res.detail})" if res.detail else ""))
        else:
            _add(report, records, item.key, model, key, caption=res.caption, logprob=res.logprob)
        done += 1
        if len(records) >= batch_size:
            writer.write(records)
            records.clear()
            progress("caption", done, len(todo))
    writer.write(records)
    progress("caption", done, len(todo))


def _add(
    report: RecaptionReport,
    records: list[dict[str, Any]],
    source: str,
    model: Any,
    key: str,
    *,
    caption: str | None = None,
    logprob: float | None = None,
    error: str | None = None,
) -> None:
    """One source's record, counted in the report: a failure by its reason (the text before " (detail)"), or a
    caption (the first five are the report's examples)."""
    records.append(_record(source, caption, logprob, error, model, key))
    if error is not None:
        reason = error.split(" (")[0]
        report.failed[reason] = report.failed.get(reason, 0) + 1
    else:
        report.captioned += 1
        if len(report.examples) < 5:
            report.examples.append({"source": text_path(source), "caption": caption or ""})


def _record(source: str, caption: str | None, logprob: float | None, error: str | None, model: Any, key: str) -> dict:
    rec = json_path(source, "source")
    rec.update({"caption": caption, "logprob": logprob, "error": error, "model": model.spec.name, "settings": key})
    rec.setdefault("source_b64", None)
    return rec


__all__ = ["FORMATS", "RecaptionReport", "recaption"]
