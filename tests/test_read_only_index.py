"""A read-only index folder (issue 29): readers work, every writer stops with one line that says why, nothing changes.

The folder is made read-only for real, never by a mock: ``chmod -R a-w`` when the tests run as an unprivileged user,
and a read-only bind mount in a private mount namespace (``unshare -rm``) when they run as root, who ignores
permission bits. Both reach the same check (``os.access`` and SQLite's own refusal). Where neither is possible the
tests are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index
from tests.conftest import TINY_CONFIG, unshare_works
from tests.test_index import make_images

AS_ROOT = os.geteuid() == 0
if AS_ROOT and not unshare_works():
    pytest.skip("running as root without user namespaces: no way to make a folder read-only", allow_module_level=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(read-only index, writable twin, photos): the same index twice, tokens cached, captions made."""
    root = tmp_path_factory.mktemp("ro")
    photos = root / "photos"
    make_images(photos, 6)
    with Index.open(root / "rw", model=str(TINY_CONFIG), pretrained="none", device="cpu", create=True) as idx:
        idx.update([photos], cache_tokens=True, workers=0)
    shutil.copytree(root / "rw", root / "ro")
    if not AS_ROOT:
        for p in [root / "ro", *(root / "ro").iterdir()]:
            p.chmod(p.stat().st_mode & ~0o222)
    yield root / "ro", root / "rw", photos
    if not AS_ROOT:
        for p in [root / "ro", *(root / "ro").iterdir()]:
            p.chmod(p.stat().st_mode | 0o200)


def _run(ro: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m cocatk ARGS`` with ``ro`` read-only (a bind mount for root)."""
    cmd = [sys.executable, "-m", "cocatk", *args]
    if AS_ROOT:
        script = f'mount --bind "{ro}" "{ro}" && mount -o remount,bind,ro "{ro}" && exec "$@"'
        cmd = ["unshare", "-rm", "sh", "-c", script, "sh", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("home")
    return {**os.environ, "COCATK_HOME": str(home), "COCATK_CACHE": str(home / "cache"), "COCATK_DEVICE": "cpu"}


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_readers_work_on_a_read_only_index(built, env) -> None:
    ro, rw, _ = built
    before = _digest(ro)
    out = _run(ro, "search", "a red square", "--index", str(ro), "-n", "4", "--json", env=env)
    assert out.returncode == 0, out.stderr
    with Index.open(rw, device="cpu") as idx:
        want = search_index(idx, text="a red square", n=4)  # the default: reranked from the cached tokens
    assert [h["id"] for h in json.loads(out.stdout)["hits"]] == [h.id for h in want.hits]
    info = _run(ro, "info", "--index", str(ro), "--json", env=env)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["files"] == 6
    check = _run(ro, "check", "--index", str(ro), env=env)
    assert check.returncode == 0 and "consistent" in check.stdout, check.stdout + check.stderr
    assert _digest(ro) == before


@pytest.mark.parametrize(
    "args",
    [
        ["index", "{photos}"],
        ["index", "{photos}", "--cache-tokens"],
        ["caption"],
        ["forget", "{photos}"],
        ["compact"],
    ],
    ids=lambda a: " ".join(a),
)
def test_every_writer_stops_with_one_line(built, env, args: list[str]) -> None:
    ro, _, photos = built
    before = _digest(ro)
    out = _run(ro, *[a.format(photos=photos) for a in args], "--index", str(ro), env=env)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("error: index folder ") and "is read-only here" in lines[0], lines[0]
    assert "chmod -R u+w" in lines[0] and "internal error" not in lines[0]
    assert _digest(ro) == before


def test_a_write_ahead_log_that_cannot_be_applied_is_refused(built, env, tmp_path: Path) -> None:
    """A log without its -shm file (a writer killed, then the folder copied read-only): reading it as immutable
    would silently miss committed work, so the reader refuses and says how to apply it."""
    _, rw, _ = built
    ro = tmp_path / "walc"
    conn = sqlite3.connect(rw / "index.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("INSERT INTO roots (path, added_at) VALUES ('/only/in/the/log', 1)")
        shutil.copytree(rw, ro)
        conn.execute("DELETE FROM roots WHERE path = '/only/in/the/log'")
    finally:
        conn.close()
    (ro / "index.sqlite-shm").unlink()
    assert (ro / "index.sqlite-wal").stat().st_size > 0
    if not AS_ROOT:
        for p in [ro, *ro.iterdir()]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        out = _run(ro, "info", "--index", str(ro), env=env)
        assert out.returncode == 1 and "write-ahead log" in out.stderr and "chmod -R u+w" in out.stderr, out.stderr
    finally:
        if not AS_ROOT:
            for p in [ro, *ro.iterdir()]:
                p.chmod(p.stat().st_mode | 0o200)
