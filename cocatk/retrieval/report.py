"""What one update of an index did (:class:`IndexReport`), and where its time went (:class:`StageTimer`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .layout import json_failure


@dataclass
class IndexReport:
    """What one :meth:`Index.update` did. ``to_dict()`` gives the JSON the CLI prints."""

    index_dir: str
    roots: list[str]
    scanned: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    duplicates: int = 0
    removed: int = 0
    encoded: int = 0
    #: Images captioned in this run (``caption=``), in the encoding pass and after it.
    captioned: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    missing_roots: list[str] = field(default_factory=list)
    tokens_cached: int = 0
    token_cache_bytes: int = 0
    checkpoints: int = 0
    total: int = 0
    seconds: float = 0.0
    #: Where the time went, in seconds. Main thread (they add up to ``seconds``): ``scan``, ``model_load``,
    #: ``wait_decode`` (blocked on the decode threads), ``model`` (image tower), ``sqlite`` (rows, tokens, commits),
    #: ``faiss`` (load, add, save), ``other``. Decode threads, summed over threads and overlapping the main thread:
    #: ``read_hash`` and ``decode_preprocess``; ``decode_threads`` says how many there were. A Ray run has
    #: ``ray_start`` (starting or joining Ray), ``ray_first_result`` (until the first block: worker processes and the
    #: actors' model loads) and ``ray`` (waiting on the pipeline after that) instead of the model and decode keys.
    #: After the run, outside ``seconds``: ``text_onnx``, the one-time export of the text tower
    #: (:mod:`cocatk.models.onnx`), when it ran.
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: ``"exported"`` or ``"failed"`` when this run exported the text tower for torch-free queries
    #: (:mod:`cocatk.models.onnx`; a failure is also a warning), else None.
    text_export: str | None = None
    #: Precisions the images of this run were encoded at (``fp32``, ``bf16``); the manifest keeps the union.
    precisions: list[str] = field(default_factory=list)

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    @property
    def images_per_s(self) -> float:
        """Images through the model per second of the whole run (scan, decode and save included)."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed_total"] = self.failed_total
        d["images_per_s"] = round(self.images_per_s, 1)
        d["seconds"] = round(self.seconds, 3)
        d["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        d["failures"] = [json_failure(f) for f in self.failures]
        return d


class StageTimer:
    """Seconds per stage on one thread; time in a nested stage is not counted in the stage around it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = 0.0

    def _charge(self, now: float) -> None:
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._stack.append(stage)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()


__all__ = ["IndexReport", "StageTimer"]
