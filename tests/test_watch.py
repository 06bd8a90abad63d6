"""`cocatk index --watch` (issue 17): batches through the incremental update, temp files, a root that goes and comes
back, errors mid-watch, and SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from cocatk.errors import UsageError
from cocatk.retrieval import watch as watch_module
from cocatk.retrieval.index import Index
from cocatk.retrieval.watch import WatchBatch, is_temporary, watch_index
from tests.conftest import TINY_CONFIG
from tests.test_index import assert_consistent, make_images, open_tiny

FAST = {"debounce": 0.3, "stable": 0.3, "poll": 0.05, "retry": 0.2, "workers": 0}


class Session:
    """watch_index on a thread; the test reads the index through its own connection (like `cocatk serve`)."""

    def __init__(self, idx: Path, roots: list[Path], **kwargs) -> None:
        self.batches: list[WatchBatch] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        ready = threading.Event()

        def run() -> None:
            try:
                with Index.open(idx, lock=True) as ix:
                    watch_index(ix, roots, on_batch=self._on, stop=self.stop, **{**FAST, **kwargs})
            except BaseException as e:  # surfaced by close()
                self.error = e
            finally:
                ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.reader = Index.open(idx)
        self.wait_for(lambda b: b.kind == "catch-up" or b.kind == "batch", timeout=10)

    def _on(self, batch: WatchBatch) -> None:
        self.batches.append(batch)

    def wait_for(self, pred: Callable[[WatchBatch], bool], timeout: float = 8.0, since: int = 0) -> WatchBatch:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for b in self.batches[since:]:
                if pred(b):
                    return b
            if self.error is not None:
                raise self.error
            time.sleep(0.02)
        raise AssertionError(f"no such batch; got {[(b.kind, b.added, b.removed) for b in self.batches]}")

    def step(self, action: Callable[[], None], kind: str = "batch", timeout: float = 8.0) -> WatchBatch:
        n = len(self.batches)
        action()
        return self.wait_for(lambda b: b.kind == kind, timeout=timeout, since=n)

    def files(self) -> dict[str, int]:
        ids = self.reader.store.ids()
        return dict(zip(self.reader.store.paths_for_ids(ids), ids.tolist(), strict=True))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the watch did not stop"
        self.reader.close()
        if self.error is not None:
            raise self.error


@pytest.fixture
def watched(tmp_path: Path):
    root = tmp_path / "photos"
    make_images(root, 3)
    idx = tmp_path / "idx"
    with open_tiny(idx) as ix:
        ix.update([root], workers=0)
    sessions: list[Session] = []

    def start(**kwargs) -> Session:
        sessions.append(Session(idx, [root], **kwargs))
        return sessions[-1]

    yield root, idx, start
    for s in sessions:
        if s.thread.is_alive():
            s.stop.set()
            s.thread.join(10)


def test_watch_add_edit_move_delete_temp_and_root_return(watched) -> None:
    root, idx, start = watched
    s = start()
    assert len(s.files()) == 3
    before = s.files()

    b = s.step(lambda: make_images(root / "new", 2, seed=5))
    assert (b.added, b.removed) == (2, 0) and len(s.files()) == 5

    edited = root / "im000.jpg"
    b = s.step(lambda: Image.new("RGB", (30, 30), (9, 200, 9)).save(edited))
    assert b.changed == 1 and s.files()[str(edited)] == before[str(edited)]  # same row, new content

    moved_to = root / "new" / "moved.png"
    b = s.step(lambda: (root / "im001.png").rename(moved_to))
    assert b.moved == 1 and s.files()[str(moved_to)] == before[str(root / "im001.png")]  # the id is kept

    b = s.step(lambda: (root / "im002.jpg").unlink())
    assert b.removed == 1 and str(root / "im002.jpg") not in s.files()

    # A download in progress: the .part file is never indexed; its rename to .jpg is.
    part = root / "download.jpg.part"
    (outside,) = make_images(root.parent / "outside", 1, seed=9)
    part.write_bytes(outside.read_bytes())
    time.sleep(1.0)
    assert str(part) not in s.files() and not any(p.endswith(".part") for p in s.files())
    b = s.step(lambda: part.rename(root / "download.jpg"))
    assert str(root / "download.jpg") in s.files()

    # The root disappears: its files are kept. It comes back with the same images: ids kept, new ones added.
    kept = s.files()
    backup = root.parent / "backup"
    s.step(lambda: shutil.move(str(root), backup), kind="missing")
    assert s.files() == kept
    n = len(s.batches)
    shutil.move(str(backup), root)
    s.wait_for(lambda b: b.kind == "back", since=n)
    b = s.wait_for(lambda b: b.kind == "batch", since=n)
    assert s.files() == kept and b.removed == 0
    b = s.step(lambda: make_images(root / "later", 1, seed=11))
    assert b.added == 1 and len(s.files()) == len(kept) + 1
    s.close()
    with Index.open(idx) as ix:
        assert_consistent(ix)


def test_files_still_being_written_wait_until_stable(watched) -> None:
    root, idx, start = watched
    s = start(stable=0.8)
    target = root / "slow.png"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(root / "seed.png")  # a distinct content for the final file
    data = (root / "seed.png").read_bytes()
    (root / "seed.png").unlink()
    n = len(s.batches)
    with open(target, "wb") as f:  # written in pieces for ~1.2 s: no batch may index it half-written
        for k in range(6):
            f.write(data[k * len(data) // 6 : (k + 1) * len(data) // 6])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(0.2)
    b = s.wait_for(lambda b: b.kind == "batch" and b.added == 1, since=n)
    assert all(x.failed == 0 for x in s.batches[n:])
    assert str(target) in s.files() and b.total == 4
    s.close()


def test_an_error_mid_watch_is_one_line_and_retried(watched, monkeypatch) -> None:
    root, idx, start = watched
    calls = {"n": 0}
    original = watch_module.run_update  # each batch is one update of the index layer

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first batch after the catch-up
            raise PermissionError(13, "Permission denied", str(root / "locked"))
        return original(*args, **kwargs)

    monkeypatch.setattr(watch_module, "run_update", flaky)
    s = start()
    make_images(root / "new", 2, seed=3)
    err = s.wait_for(lambda b: b.kind == "error")
    assert "Permission denied" in err.error and "Fix:" in err.error and "\n" not in err.error
    assert len(s.files()) == 3  # nothing lost
    b = s.wait_for(lambda b: b.kind == "batch")  # retried
    assert b.added == 2 and len(s.files()) == 5
    s.close()


def test_bad_input_is_refused_with_one_line(tmp_path: Path) -> None:
    with open_tiny(tmp_path / "idx") as ix:
        with pytest.raises(UsageError, match="does not exist") as e:
            watch_index(ix, [tmp_path / "nope"], stop=threading.Event())
        assert "Fix:" in e.value.one_line() and "\n" not in e.value.one_line()
        with pytest.raises(UsageError, match="no folders to watch"):
            watch_index(ix, None)
        with pytest.raises(UsageError, match="debounce"):
            watch_index(ix, [tmp_path], debounce=-1)
    assert [is_temporary(n) for n in ("a.jpg.part", "a.jpg~", "a.crdownload", "x.tmp", ".a.jpg.Xy1", "a.jpg")] == [
        True,
        True,
        True,
        True,
        True,
        False,
    ]


def test_cli_watch_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_images(root, 2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "cocatk", "index", str(root), "--index", str(tmp_path / "idx"), "--watch"]
    cmd += ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu", "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:  # the first run indexes the 2 images, then the watch starts
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            try:
                with Index.open(tmp_path / "idx") as ix:
                    if ix.ntotal == 2:
                        break
            except Exception:
                pass
            time.sleep(0.2)
        time.sleep(2.0)  # let the watch arm and catch up
        make_images(root / "more", 2, seed=4)
        time.sleep(3.0)  # default debounce 1 s + stability 1 s
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "batch" in out and "2 added" in out, out + err
    assert err.strip().splitlines()[-1].startswith("stopped watching after"), err
    with Index.open(tmp_path / "idx") as ix:
        assert ix.ntotal == 4
