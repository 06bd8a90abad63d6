"""`cocatk tag` killed with SIGKILL at the moments that matter, then run again (the writer rules of issue 29, for the
tag writer of issue 31).

Each kill is real (``os.kill(getpid(), SIGKILL)``: no cleanup, no ``finally``), placed exactly by a child process that
wraps one of cocatk's own functions before it calls the CLI: the sidecar's bytes about to land (a new sidecar, a
user's sidecar being merged into), just landed, a sidecar being put back on a rerun with other settings or by
``--remove-xmp``, and the tags transaction before its commit. References: the index's own tags table and sidecar
records, ExifTool's reading of every sidecar, the user's sidecars byte for byte, and a copy of the index tagged
without a kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cocatk.retrieval import Index, tagstore

DEMO = ["--model", "demo", "--device", "cpu"]
USER_SIDECARS = ("s001.png", "s004.png")  # merged into; the other images' sidecars are created by cocatk

#: The child: argv = function ("replace", "create", "replace-after", "tags"), the sidecar name it kills on (or
#: "-"), then the cocatk arguments.
CHILD = r"""
import os, signal, sys
from pathlib import Path
import cocatk.sidecars.xmp as xmp
from cocatk.retrieval import tagstore
what, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def before(real):
    def f(target, *a, **k):
        if Path(target).name == name:
            die()
        return real(target, *a, **k)
    return f

if what == "replace":
    xmp._replace_atomic = before(xmp._replace_atomic)
elif what == "create":
    xmp._create_exclusive = before(xmp._create_exclusive)
elif what == "replace-after":
    real = xmp._replace_atomic
    def after(target, *a, **k):
        real(target, *a, **k)
        if Path(target).name == name:
            die()
    xmp._replace_atomic = after
elif what == "tags":
    real_tags = tagstore.replace_tags
    def tags(*a, **k):
        n = real_tags(*a, **k)
        die()  # the rows are in the open transaction, not committed
    tagstore.replace_tags = tags
from cocatk.cli import main
sys.exit(main(args))
"""


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "COCATK_HOME": str(root / "home"), "COCATK_CACHE": str(root / "cache"),
            "COCATK_TEXT_ONNX": "0"}  # fmt: skip


def _exiftool(path: Path) -> dict:
    out = subprocess.run(["exiftool", "-j", "-G1", "-XMP:all", str(path)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return json.loads(out)[0]


def _as_list(v: object) -> list[str]:
    return [] if v is None else [str(x) for x in v] if isinstance(v, list) else [str(v)]


@pytest.fixture
def work(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, bytes]]:
    """8 demo scenes indexed with captions, two of them with a user's sidecar (returned: name -> bytes); the tagger's
    label embeddings cached by one `cocatk tag` without sidecars, so no child loads the model for them."""
    pytest.importorskip("exiftool", reason="PyExifTool is not installed")
    if shutil.which("exiftool") is None:
        pytest.skip("exiftool is missing: apt-get install libimage-exiftool-perl")
    from tests.test_tags import _demo_vocabulary, _scenes

    root = tmp_path / "w"
    env = _env(root)
    _scenes(root / "photos", 8)
    _demo_vocabulary(root / "v.txt")
    cli = [sys.executable, "-m", "cocatk"]
    subprocess.run([*cli, "index", str(root / "photos"), "--index", str(root / "idx"), *DEMO, "--caption"],
                   check=True, env=env, capture_output=True)  # fmt: skip
    assert _tag(root, env).returncode == 0
    own = {}
    for name in USER_SIDECARS:
        side = root / "photos" / f"{name}.xmp"
        tags = ["-XMP-dc:Subject+=Holiday", "-XMP-dc:Description=mine", "-XMP-lr:HierarchicalSubject+=Places|Beach"]
        subprocess.run(["exiftool", "-q", "-o", str(side), *tags, str(root / "photos" / name)], check=True)
        own[side.name] = side.read_bytes()
    return root, env, own


def _tag(
    root: Path, env: dict[str, str], *extra: str, kill: tuple[str, str] | None = None
) -> subprocess.CompletedProcess:
    args = ["tag", "--index", str(root / "idx"), "--vocabulary", str(root / "v.txt"), "--json", *extra]
    if kill is None:
        cmd = [sys.executable, "-m", "cocatk", *args]
    else:
        cmd = [sys.executable, "-c", CHILD, kill[0], kill[1], *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _killed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout[-500:], r.stderr[-2000:])


def _records(root: Path) -> dict[str, tuple[str, str, dict]]:
    with Index.open(root / "idx") as ix:
        return tagstore.sidecars(ix.store)


def _check_written(root: Path, own: dict[str, bytes]) -> None:
    """Every image's sidecar holds exactly its current tags under cocatk| (and its keywords), the user's keywords
    and description kept, and every sidecar there is recorded."""
    photos = root / "photos"
    with Index.open(root / "idx") as ix:
        rows = ix.store.file_rows()
        tags = tagstore.tags_for_ids(ix.store, [r.id for r in rows.values()])
        records = tagstore.sidecars(ix.store)
        ids = {Path(p).name: r.id for p, r in rows.items()}
    assert set(records) == {str(p) for p in photos.glob("*.xmp")}
    for name, fid in ids.items():
        mine = tags.get(fid, [])
        got = _exiftool(photos / f"{name}.xmp")
        subjects, hier = _as_list(got.get("XMP-dc:Subject")), _as_list(got.get("XMP-lr:HierarchicalSubject"))
        assert sorted(f"cocatk|{t['path']}" for t in mine) == sorted(h for h in hier if h.startswith("cocatk|")), name
        assert {t["label"] for t in mine} <= set(subjects), name
        if f"{name}.xmp" in own:
            assert "Holiday" in subjects and "Places|Beach" in hier and got["XMP-dc:Description"] == "mine"


def _check_removed(root: Path, env: dict[str, str], own: dict[str, bytes]) -> None:
    r = _tag(root, env, "--remove-xmp")
    assert r.returncode == 0, r.stderr
    photos = root / "photos"
    assert sorted(p.name for p in photos.glob("*.xmp")) == sorted(own)
    for name, data in own.items():
        assert (photos / name).read_bytes() == data, name  # byte for byte
    assert _records(root) == {}


@pytest.mark.parametrize(
    ("what", "name", "before"),
    [
        ("create", "s002.png.xmp", True),  # a new sidecar's bytes about to be linked into place
        ("replace", "s004.png.xmp", True),  # the user's sidecar about to be replaced by the merged bytes
        ("replace-after", "s001.png.xmp", False),  # the merged bytes just landed
    ],
)
def test_write_xmp_killed_around_a_write_leaves_nothing_unrecorded(work, what: str, name: str, before: bool) -> None:
    root, env, own = work
    side = root / "photos" / name
    was = side.read_bytes() if side.exists() else None
    _killed(_tag(root, env, "--threshold", "0.9", "--write-xmp", kill=(what, name)))
    records = _records(root)
    assert str(side) in records  # recorded before the bytes landed
    now = side.read_bytes() if side.exists() else None
    if before:
        assert now == was  # the kill came before the rename: the sidecar is as it was
    else:
        assert now != was and now is not None
    r = _tag(root, env, "--threshold", "0.9", "--write-xmp")
    assert r.returncode == 0, r.stderr
    _check_written(root, own)
    _check_removed(root, env, own)


def test_write_xmp_killed_while_a_sidecar_is_put_back(work) -> None:
    """A rerun with other settings first puts each sidecar back, then writes it; killed after a put-back (and, in a
    second case, during --remove-xmp), the next runs still end with the user's sidecars byte for byte."""
    root, env, own = work
    assert _tag(root, env, "--threshold", "0.99", "--write-xmp").returncode == 0
    _check_written(root, own)
    first = _as_list(_exiftool(root / "photos" / "s004.png.xmp").get("XMP-lr:HierarchicalSubject"))
    # other settings: the same labels grouped by colour instead of shape, so every cocatk| path changes
    from cocatk.demo.scenes import CLASS_NAMES

    (root / "v.txt").write_text("\n".join(f"{n.split()[0]}|{n}" for n in CLASS_NAMES))
    # the second run restores s004's user bytes (_replace_atomic), then would merge the new tags: killed between
    _killed(_tag(root, env, "--threshold", "0.99", "--write-xmp", kill=("replace-after", "s004.png.xmp")))
    assert (root / "photos" / "s004.png.xmp").read_bytes() == own["s004.png.xmp"]
    assert _tag(root, env, "--threshold", "0.99", "--write-xmp").returncode == 0
    _check_written(root, own)
    assert _as_list(_exiftool(root / "photos" / "s004.png.xmp").get("XMP-lr:HierarchicalSubject")) != first
    # --remove-xmp killed right after it restored s001: a rerun finishes the rest
    _killed(_tag(root, env, "--remove-xmp", kill=("replace-after", "s001.png.xmp")))
    assert (root / "photos" / "s001.png.xmp").read_bytes() == own["s001.png.xmp"]
    assert str(root / "photos" / "s001.png.xmp") in _records(root)  # its record goes with the next commit
    _check_removed(root, env, own)


def test_tag_killed_before_its_commit_keeps_the_previous_tags(work) -> None:
    """The tags of one settings key are replaced in one transaction: killed before the commit, the index holds the
    tags of before (none for new settings), and a rerun stores exactly what an unkilled run stores."""
    root, env, _ = work
    reference = root.parent / "reference"  # the same photos, indexed again: an unkilled run's tags
    ref_env = _env(reference)
    shutil.copytree(root / "photos", reference / "photos")
    shutil.copy(root / "v.txt", reference / "v.txt")
    subprocess.run([sys.executable, "-m", "cocatk", "index", str(reference / "photos"), "--index",
                    str(reference / "idx"), *DEMO], check=True, env=ref_env, capture_output=True)  # fmt: skip
    r = _tag(reference, ref_env, "--threshold", "0.7")
    assert r.returncode == 0, r.stderr

    def rows(folder: Path, key: str | None = None) -> list[tuple]:
        """The tags of ``key`` (all of them when None), by content hash: ids are each index's own."""
        with Index.open(folder / "idx") as ix:
            assert ix.store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            return ix.store.conn.execute(
                "SELECT config, hash, label, path, round(score, 6) FROM tags WHERE ? IS NULL OR config = ? "
                "ORDER BY config, hash, label", (key, key),
            ).fetchall()  # fmt: skip

    before = rows(root)
    _killed(_tag(root, env, "--threshold", "0.7", kill=("tags", "-")))
    assert rows(root) == before  # the default settings' tags of the set-up, nothing of the killed run
    r2 = _tag(root, env, "--threshold", "0.7")
    assert r2.returncode == 0, r2.stderr
    mine, theirs = rows(root, json.loads(r2.stdout)["key"]), rows(reference, json.loads(r.stdout)["key"])
    assert mine and [t[1:] for t in mine] == [t[1:] for t in theirs]
