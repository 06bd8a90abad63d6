"""Keep an index current while files appear, change, move or disappear: ``cocatk index PATH... --watch``.

:func:`watch_index` listens with watchdog (inotify, FSEvents, ...) and turns events into *batches*: when no event
has arrived for ``debounce`` seconds and every image file named by an event has kept its size and mtime for
``stable`` seconds, the roots that saw events go through :meth:`Index.update` -- the same incremental path as
``cocatk index`` (scan, unchanged files skipped by size + mtime, moved files keep their ids by content hash, the
same checkpoints). An event therefore only says *which root to look at*; the scan decides what changed, so a lost
or coalesced event (a burst overflowing the kernel queue) costs nothing but a rescan.

- Temporary and partial files (``x.jpg.part``, ``x.jpg~``, ``.crdownload``, ``.tmp``, hidden ``.x.jpg.XXXX``) have no
  image extension or are hidden, so the scan never indexes them; their final rename is an event like any other.
- A root that disappears (deleted, unmounted) is left out of the updates, so its files stay in the index; it is
  checked every ``poll`` seconds and re-armed (watched again, rescanned) when it comes back.
- An error in a batch (permission denied, disk full, busy index) is reported through ``on_batch`` and the batch is
  retried after ``retry`` seconds; what earlier checkpoints committed is kept.
- ``stop.set()`` (SIGTERM in the CLI) ends the watch between batches, or inside one at its next progress report
  (the update rolls back to its last checkpoint; the next run resumes). Ctrl-C (KeyboardInterrupt) does the same.

The library never prints: every batch is handed to ``on_batch`` as a :class:`WatchBatch`.

Example:
    >>> import threading
    >>> stop = threading.Event()
    >>> with Index.open("idx", lock=True) as ix:                                     # doctest: +SKIP
    ...     watch_index(ix, ["~/Pictures"], on_batch=print, stop=stop)
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CocatkError, MissingDependencyError, UsageError
from ..paths import display_path, json_path
from .indexing import run_update
from .layout import is_under
from .updater import IndexReport, UpdateOptions

if TYPE_CHECKING:  # pragma: no cover
    from .folder import IndexFolder


#: Seconds without events before a batch runs: a copy of 500 photos arrives as one batch, not 500.
DEFAULT_DEBOUNCE_S = 1.0
#: Seconds a file's size and mtime must stay unchanged before it is indexed (a file still being written is not).
DEFAULT_STABLE_S = 1.0
#: A batch waits at most this long for files that keep changing; then it runs (a file caught mid-write is re-read
#: when it changes again, since its size or mtime then differ).
DEFAULT_MAX_HOLD_S = 60.0
#: Seconds between checks for events, missing roots and returning roots.
DEFAULT_POLL_S = 0.2
#: Seconds before a failed batch is tried again.
DEFAULT_RETRY_S = 5.0
#: Names that are never indexed, even with an image extension in the middle (``x.jpg.part``).
TEMP_SUFFIXES = (".part", ".partial", ".crdownload", ".tmp", ".temp", ".download", ".swp", "~")
#: Event types that say nothing about content (watchdog >= 4 reports opens and read-only closes).
_QUIET = frozenset({"opened", "closed_no_write"})


class WatchStopped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised inside an update when ``stop`` is set, to end it at its last checkpoint."""


@dataclass
class WatchBatch:
    """One thing the watch did, for ``on_batch``.

    ``kind``:
        ``"batch"``: an update ran (``added``, ``changed``, ``moved``, ``removed``, ``failed`` and ``seconds`` say what
        it did; ``report`` is the full :class:`IndexReport`). ``"catch-up"``: the first update, before any event.
        ``"missing"``: ``roots`` disappeared (their files are kept). ``"back"``: ``roots`` came back and are watched
        again. ``"error"``: the update of ``roots`` failed with ``error`` (one line, with what to do); it is retried.
    """

    kind: str
    number: int
    roots: list[str]
    events: int = 0
    added: int = 0
    changed: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    total: int = 0
    seconds: float = 0.0
    error: str | None = None
    time: float = field(default_factory=time.time)
    report: IndexReport | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roots"] = [json_path(r)["path"] for r in self.roots]
        d["report"] = self.report.to_dict() if self.report is not None else None
        return d


BatchCallback = Callable[[WatchBatch], None]


def is_temporary(name: str) -> bool:
    """True for names that editors, browsers and copy tools use while a file is being written."""
    base = os.path.basename(name)
    low = base.lower()
    return base.startswith(".") or low.endswith(TEMP_SUFFIXES)


class _Root:
    """One watched root: its path, the folder watchdog watches, and the watch handle (None while missing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handle: Any = None
        self.missing = False

    @property
    def watch_dir(self) -> tuple[str, bool]:
        return (self.path, True) if os.path.isdir(self.path) else (os.path.dirname(self.path), False)


class _Watcher:
    def __init__(
        self,
        index: IndexFolder,
        roots: list[str],
        *,
        debounce: float,
        stable: float,
        max_hold: float,
        poll: float,
        retry: float,
        on_batch: BatchCallback,
        stop: threading.Event,
        update_kwargs: dict[str, Any],
    ) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        from ..images import image_extensions

        self.index = index
        self.roots = [_Root(r) for r in roots]
        self.debounce, self.stable, self.max_hold, self.poll, self.retry = debounce, stable, max_hold, poll, retry
        self.on_batch = on_batch
        self.stop = stop
        self.update_kwargs = update_kwargs
        self.exts = image_extensions()
        self.events: queue.SimpleQueue[tuple[str, str | None, bool]] = queue.SimpleQueue()
        self.dirty: set[str] = set()  # roots to update in the next batch
        self.pending: dict[str, float] = {}  # image path -> time of its last event or stat change
        self.stats: dict[str, tuple[int, int] | None] = {}
        self.last_event = 0.0
        self.first_event = 0.0
        self.event_count = 0
        self.retry_at = 0.0
        self.number = 0

        events = self.events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:  # runs on watchdog's thread: only enqueue
                if event.event_type in _QUIET or (event.is_directory and event.event_type == "modified"):
                    return  # a folder's "modified" accompanies every file event below it
                src = os.fsdecode(event.src_path)
                dest = os.fsdecode(event.dest_path) if getattr(event, "dest_path", "") else None
                events.put((src, dest, bool(event.is_directory)))

        self.handler = Handler()
        self.observer = Observer()

    # -- roots --
    def _arm(self, root: _Root) -> bool:
        folder, recursive = root.watch_dir
        try:
            root.handle = self.observer.schedule(self.handler, folder, recursive=recursive)
        except OSError:  # vanished between the check and the schedule, or unreadable: tried again next poll
            root.handle = None
            return False
        return True

    def _disarm(self, root: _Root) -> None:
        if root.handle is not None:
            with contextlib.suppress(Exception):  # watchdog may already have dropped a deleted folder's watch
                self.observer.unschedule(root.handle)
            root.handle = None

    def _check_roots(self) -> None:
        gone, back = [], []
        for root in self.roots:
            exists = os.path.exists(root.path)
            if root.missing and exists and self._arm(root):
                root.missing = False
                back.append(root.path)
                self.dirty.add(root.path)  # whatever changed while it was away
                self.last_event = self.first_event = time.monotonic()
            elif not root.missing and not exists:
                self._disarm(root)
                root.missing = True
                gone.append(root.path)
                self.dirty.discard(root.path)  # never update a missing root: its files are kept
        for kind, paths in (("missing", gone), ("back", back)):
            if paths:
                self.number += 1
                self.on_batch(WatchBatch(kind, self.number, paths, total=self.index.store.count()))

    # -- events --
    def _note(self, path: str, is_dir: bool, now: float) -> bool:
        """Mark the roots of ``path`` dirty; remember an image file for the stability check. False: irrelevant."""
        if not is_dir:
            if is_temporary(path):
                return False
            if os.path.splitext(path)[1].lower() in self.exts:
                self.pending[path] = now
                self.stats.pop(path, None)
        hit = False
        for root in self.roots:
            if not root.missing and (is_under(path, [root.path]) or (is_dir and is_under(root.path, [path]))):
                self.dirty.add(root.path)
                hit = True
        return hit

    def _drain(self) -> None:
        now = time.monotonic()
        while True:
            try:
                src, dest, is_dir = self.events.get_nowait()
            except queue.Empty:
                return
            relevant = self._note(src, is_dir, now)
            if dest is not None:
                relevant = self._note(dest, is_dir, now) or relevant
            if relevant:
                if not self.event_count:
                    self.first_event = now
                self.event_count += 1
                self.last_event = now

    def _unstable(self, now: float) -> int:
        """How many pending image files changed size or mtime within the last ``stable`` seconds."""
        waiting = 0
        for path, since in list(self.pending.items()):
            try:
                st = os.stat(path)
                key: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
            except OSError:
                key = None  # gone (deleted or renamed): nothing to wait for
            if key != self.stats.get(path, key):
                self.pending[path] = since = now
            self.stats[path] = key
            if key is not None and now - since < self.stable:
                waiting += 1
        return waiting

    # -- batches --
    def _progress(self, stage: str, done: int, total: int | None) -> None:
        if self.stop.is_set():
            raise WatchStopped
        user = self.update_kwargs.get("progress")
        if user is not None:
            user(stage, done, total)

    def _run(self, kind: str, roots: list[str], events: int) -> None:
        self.number += 1
        t0 = time.monotonic()
        kwargs = {**self.update_kwargs, "progress": self._progress}
        try:
            report = run_update(self.index, UpdateOptions(paths=tuple(roots), **kwargs))
        except (CocatkError, OSError) as e:
            message = e.one_line() if isinstance(e, CocatkError) else _os_error_line(e)
            self.dirty.update(r for r in roots if os.path.exists(r))
            self.retry_at = time.monotonic() + self.retry
            self.on_batch(
                WatchBatch("error", self.number, roots, events, error=message, total=self.index.store.count())
            )
            return
        self.on_batch(
            WatchBatch(
                kind,
                self.number,
                roots,
                events,
                added=report.new,
                changed=report.changed,
                moved=report.moved,
                removed=report.removed,
                failed=report.failed_total,
                total=report.total,
                seconds=time.monotonic() - t0,
                report=report,
            )
        )

    def _maybe_batch(self) -> None:
        now = time.monotonic()
        if not self.dirty or now < self.retry_at or now - self.last_event < self.debounce:
            return
        if self._unstable(now) and now - self.first_event < self.max_hold:
            return
        roots = sorted(r for r in self.dirty if os.path.exists(r))
        events = self.event_count
        self.dirty.clear()
        self.pending.clear()
        self.stats.clear()
        self.event_count = 0
        if roots:
            self._run("batch", roots, events)

    def run(self, catch_up: bool) -> int:
        self.observer.start()
        try:
            for root in self.roots:
                if os.path.exists(root.path) and self._arm(root):
                    continue
                root.missing = True
            if catch_up:
                present = [r.path for r in self.roots if not r.missing]
                if present:
                    self._run("catch-up", present, 0)
            while not self.stop.is_set():
                self._check_roots()
                self._drain()
                self._maybe_batch()
                self.stop.wait(self.poll)
        except WatchStopped:
            pass
        finally:
            self.observer.stop()
            with contextlib.suppress(RuntimeError):
                self.observer.join(timeout=5)
        return self.number


def _os_error_line(e: OSError) -> str:
    where = f" {display_path(os.fsdecode(e.filename))}" if e.filename else ""
    reason = e.strerror or type(e).__name__
    return f"cannot update the index{where}: {reason}. Fix: check the permissions and free space; retrying"


def watch_index(
    index: IndexFolder,
    paths: Sequence[str | os.PathLike[str]] | None = None,
    *,
    debounce: float = DEFAULT_DEBOUNCE_S,
    stable: float = DEFAULT_STABLE_S,
    max_hold: float = DEFAULT_MAX_HOLD_S,
    poll: float = DEFAULT_POLL_S,
    retry: float = DEFAULT_RETRY_S,
    catch_up: bool = True,
    on_batch: BatchCallback | None = None,
    stop: threading.Event | None = None,
    **update_kwargs: Any,
) -> int:
    """Watch ``paths`` (default: the index's roots) and keep ``index`` current until ``stop`` is set.

    Args:
        index: an open index (ideally opened with ``lock=True``: the watch is its writer).
        paths: folders (or image files) to watch; they must exist now. None: every root of the index; roots that
            are missing now are watched for their return.
        debounce: seconds without events before a batch runs.
        stable: seconds an image file's size and mtime must stay unchanged before it is indexed.
        max_hold: the longest a batch waits for files that keep changing.
        poll: seconds between checks (events, missing and returning roots, ``stop``).
        retry: seconds before a failed batch is tried again.
        catch_up: run one update of every present root first (files that changed while nobody watched).
        on_batch: called with each :class:`WatchBatch` (on the calling thread).
        stop: set it to end the watch; None: run until KeyboardInterrupt.
        update_kwargs: passed to :meth:`Index.update` (workers, batch_size, checkpoint_every, progress, ...).

    Returns:
        The number of batches reported.

    Raises:
        UsageError: a path does not exist, bad timings, or no path and no root. MissingDependencyError: watchdog is
        not installed.
    """
    for name, value in (("debounce", debounce), ("stable", stable), ("poll", poll), ("retry", retry)):
        if not value >= 0:
            raise UsageError(f"{name} must be >= 0 seconds, got {value}", hint="pass a number of seconds")
    if paths:
        roots = []
        for p in paths:
            path = Path(p).expanduser()
            if not path.exists():
                raise UsageError(
                    f"cannot watch {display_path(os.fspath(p))}: it does not exist",
                    hint="create the folder (or mount the drive) first, or pass an existing folder",
                )
            roots.append(str(path.resolve()))
        roots = sorted(set(roots))
    else:
        roots = index.store.roots()
        if not roots:
            raise UsageError("no folders to watch", hint="pass one or more PATHs: `cocatk index ~/Pictures --watch`")
    try:
        import watchdog  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"watchdog is not installed ({e})", hint="pip install watchdog") from e
    watcher = _Watcher(
        index,
        roots,
        debounce=debounce,
        stable=stable,
        max_hold=max_hold,
        poll=poll,
        retry=retry,
        on_batch=on_batch or (lambda batch: None),
        stop=stop or threading.Event(),
        update_kwargs=update_kwargs,
    )
    return watcher.run(catch_up)


__all__ = [
    "DEFAULT_DEBOUNCE_S",
    "DEFAULT_STABLE_S",
    "TEMP_SUFFIXES",
    "WatchBatch",
    "WatchStopped",
    "is_temporary",
    "watch_index",
]
