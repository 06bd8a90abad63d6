"""One progress bar for every long command, fed by the library's ``progress(stage, done, total)`` callbacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .render import err

#: How each library stage is named on the bar.
STAGE_LABELS = {
    "start": "starting",
    "model": "loading model",
    "scan": "scanning",
    "shards": "reading shards",
    "index": "indexing",
    "photos": "generating photos",
    "search": "searching",
    "text": "text classifier",
    "prior": "text priors",
    "images": "classifying",
    "zeroshot": "zero-shot",
    "text-onnx": "exporting ONNX",
    "rerank-tokens": "reading candidates",
    "export": "exporting",
    "import": "importing",
}


class _Bar:
    """A Rich progress display on stderr: one row per stage (spinner, label, bar, count, rate, elapsed, ETA);
    transient (gone when done). A stage without a known total (loading, scanning) shows a spinner and its running
    count; the first real stage replaces the "starting" row."""

    def __init__(self, console: Any = None) -> None:
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[count]:>13}"),
            TextColumn("{task.fields[rate]:>9}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console or err,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}  # stage -> task id
        self.done: dict[str, int] = {}  # stage -> last count

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != "start" and "start" in self.tasks:  # the first real stage replaces the "starting" row
            self.progress.remove_task(self.tasks.pop("start"))
        task = self.tasks.get(stage)
        if task is not None and done == 0 and self.done.get(stage, 0) > 0:
            self.progress.remove_task(task)  # a stage that starts over (e.g. a second pass) gets a fresh row
            task = None
        if task is None:
            task = self.progress.add_task(STAGE_LABELS.get(stage, stage), total=total, count="", rate="", eta="")
            self.tasks[stage] = task
        self.done[stage] = done
        self.progress.update(task, completed=done, total=total)
        state = self.progress._tasks[task]  # noqa: SLF001 - the Task object holds Rich's speed estimate
        count = f"{done}/{total}" if total is not None else (str(done) if done else "")
        speed = state.speed if stage in ("index", "images") else None
        remaining = state.time_remaining if total is not None and done < total else None
        self.progress.update(
            task,
            count=count,
            rate=f"{speed:.0f}/s" if speed else "",
            eta=f"ETA {int(remaining) // 60}:{int(remaining) % 60:02d}" if remaining else "",
        )


@contextmanager
def progress_bar(disable: bool = False) -> Iterator[Any]:
    """Yield a ``progress(stage, done, total)`` callback drawing on stderr, or None when stderr is not a terminal
    (logs and pipes stay clean) or ``disable`` is set."""
    if disable or not err.is_terminal:
        yield None
        return
    bar = _Bar()
    with bar.progress:
        yield bar
