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
    "index": "indexing",
    "photos": "generating photos",
    "search": "searching",
    "text": "text classifier",
    "prior": "text priors",
    "images": "classifying",
    "zeroshot": "zero-shot",
}


class _Bar:
    """A Rich progress bar on stderr: one row per stage, items/s and ETA; transient (gone when done)."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]:>10}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != "start" and "start" in self.tasks:  # the first real stage replaces the "starting" row
            self.progress.remove_task(self.tasks.pop("start"))
        task = self.tasks.get(stage)
        if task is None or (done == 0 and self.progress.tasks[task].completed > 0):
            if task is not None:  # a stage that starts over (e.g. a second pass) gets a fresh row
                self.progress.remove_task(task)
            task = self.progress.add_task(STAGE_LABELS.get(stage, stage), total=total, rate="")
            self.tasks[stage] = task
        speed = self.progress.tasks[task].speed if stage in ("index", "images") else None
        self.progress.update(task, completed=done, total=total, rate=f"{speed:.0f}/s" if speed else "")


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
