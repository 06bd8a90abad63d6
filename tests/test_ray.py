"""`cocatk index --ray`: the Ray Data encoder against the local one, crashes of the driver and of an actor, a cluster.

One local Ray (2 CPUs) is started per module and shared by the tests that run in this process; the kill -9 test runs
its driver in a subprocess that joins that Ray; the last test starts a separate head node (`ray start --head
--block`, stopped through its own process group: `ray stop` would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cocatk.cli import main
from cocatk.retrieval import Index
from cocatk.retrieval.encoder import EncodeJob
from tests.test_index import TINY, assert_consistent, make_images, open_tiny

ROOT = Path(__file__).parent.parent
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (pip install '.[ray]')")


def _timed(stage: str) -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray for the module; yields the fault marker path its actors watch (see ray_encoder.FAULT_ENV)."""
    import ray

    from cocatk.retrieval.ray_encoder import FAULT_ENV

    marker = tmp_path_factory.mktemp("ray") / "kill-actor-once"
    os.environ[FAULT_ENV] = str(marker)  # inherited by the Ray processes started below
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        yield marker
    finally:
        ray.shutdown()
        os.environ.pop(FAULT_ENV, None)


def _ray_encoder(ix: Index, **kwargs):
    from cocatk.retrieval.ray_encoder import RayEncoder

    return RayEncoder(ix.manifest["model"], ix.manifest["pretrained"], **kwargs)


def _photos(folder: Path, n: int) -> Path:
    make_images(folder, n)
    (folder / "sub").mkdir()
    make_images(folder / "sub", 3, seed=1, prefix="sub")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    shutil.copy(folder / "im001.png", folder / "copy-of-im001.png")  # the same content twice in one run
    return folder


def _same_index(a: Index, b: Index, tokens: bool = False) -> None:
    ids_a, ids_b = a.store.ids(), b.store.ids()
    assert np.array_equal(ids_a, ids_b)
    assert a.store.paths_for_ids(ids_a) == b.store.paths_for_ids(ids_b)
    ea, eb = a.store.embeddings(list(ids_a), a.dim), b.store.embeddings(list(ids_b), b.dim)
    assert np.abs(ea - eb).max() <= 1e-5
    assert a.store.failure_rows().keys() == b.store.failure_rows().keys()
    assert {p: f[:2] for p, f in a.store.failure_rows().items()} == {
        p: f[:2] for p, f in b.store.failure_rows().items()
    }  # the same reason and detail for every failed file
    if tokens:
        assert a.store.token_ids() == b.store.token_ids()
    assert_consistent(b)


def test_without_the_extra_index_ray_names_it(tmp_path: Path, monkeypatch, capsys) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    make_images(tmp_path / "p", 1)
    rc = main(["index", str(tmp_path / "p"), "--index", str(tmp_path / "idx"), "--ray", "local"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "cocatk[ray]" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "idx").exists()  # refused before any index folder is created


def test_index_help_does_not_import_ray() -> None:
    code = (
        "import sys\nfrom cocatk.cli import main\nmain(['index', '--help'])\n"
        "print('HEAVY', [m for m in ('ray', 'torch', 'faiss') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "--ray-actors" in out


@needs_ray
def test_ray_indexes_webdataset_shards_as_locally(tmp_path: Path, ray_local: Path, tiny_model) -> None:
    """Issue 30: the actors read each item from its byte range in the shard (no file of that name exists)."""
    from tests.test_webdataset import write_shards

    write_shards(tmp_path / "s", 3, 5, corrupt=(2, 1))
    shards = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    local = open_tiny(tmp_path / "local")
    r_local = local.update(shards, cache_tokens=True)
    remote = open_tiny(tmp_path / "ray")
    r_ray = remote.update(shards, cache_tokens=True, checkpoint_every=4, encoder=_ray_encoder(remote))
    for key in ("new", "encoded", "failed", "tokens_cached", "total"):
        assert getattr(r_ray, key) == getattr(r_local, key), key
    assert r_ray.new == 14 and r_ray.failed_total == 1
    _same_index(local, remote, tokens=True)
    local.close()
    remote.close()


@needs_ray
def test_ray_index_equals_local_index(tmp_path: Path, ray_local: Path, tiny_model) -> None:
    photos = _photos(tmp_path / "photos", 20)
    local = open_tiny(tmp_path / "local")
    r_local = local.update([photos], cache_tokens=True)
    remote = open_tiny(tmp_path / "ray")
    enc = _ray_encoder(remote)
    r_ray = remote.update([photos], cache_tokens=True, checkpoint_every=5, encoder=enc)
    assert enc.plan["actors"] == 1 and enc.plan["device"] == "cpu"
    # a local Ray: the actor reserves one CPU but its torch may use both cores (tuned per batch)
    assert enc.plan["cpus_per_actor"] == 1 and enc.plan["thread_cap"] == 2
    for key in ("new", "encoded", "duplicates", "failed", "tokens_cached", "total"):
        assert getattr(r_ray, key) == getattr(r_local, key), key
    assert r_ray.duplicates == 1 and r_ray.failed_total == 2 and "empty file" in r_ray.failed
    _same_index(local, remote, tokens=True)

    # The second run reuses known contents (a move, a touch) and re-encodes a changed file, as locally.
    (photos / "im002.jpg").rename(photos / "sub" / "moved.jpg")
    os.utime(photos / "im003.png", ns=(1, 1))
    make_images(tmp_path / "other", 5, seed=7)
    shutil.copy(tmp_path / "other" / "im004.jpg", photos / "im004.jpg")  # changed content
    r_local = local.update([photos])
    r_ray = remote.update([photos], encoder=enc)
    for key in ("moved", "changed", "unchanged", "encoded", "total"):
        assert getattr(r_ray, key) == getattr(r_local, key), key
    assert r_ray.moved == 1 and r_ray.encoded == 1
    _same_index(local, remote)


@needs_ray
def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_doubled(tmp_path: Path, ray_local: Path) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 40)
    ray_local.write_text("")  # the first actor batch kills its own process (os._exit), once
    ix = open_tiny(tmp_path / "idx")
    r = ix.update([photos], checkpoint_every=8, encoder=_ray_encoder(ix, batch_size=8))
    assert not ray_local.exists() and Path(f"{ray_local}.fired").exists(), "the actor was not killed"
    assert r.encoded == r.new == r.total == 40 and r.failed_total == 0
    assert sorted(ix.store.paths_for_ids(ix.store.ids())) == sorted(str(p) for p in photos.iterdir())
    assert_consistent(ix)


@needs_ray
def test_a_file_missing_on_a_worker_says_shared_filesystem(tmp_path: Path, ray_local: Path) -> None:
    ix = open_tiny(tmp_path / "idx")
    make_images(tmp_path, 1)
    jobs = [EncodeJob(str(tmp_path / "im000.jpg"), 1, 1, None), EncodeJob(str(tmp_path / "gone.jpg"), 1, 1, None)]
    found, gone = list(_ray_encoder(ix).encode(jobs, known=(), tokens=False, timed=_timed))
    assert found.embedding is not None and found.error is None
    assert gone.error is not None and gone.error.reason == "unreadable"
    assert "shared filesystem" in gone.error.detail and "No such file" in gone.error.detail


_KILL_SCRIPT = """
import sys, time
from cocatk.retrieval.updater import Updater
_orig = Updater._commit
def _slow(self, res):
    time.sleep(0.05)  # the driver commits slowly enough to be killed mid-run
    return _orig(self, res)
Updater._commit = _slow
from cocatk.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _committed(db: Path) -> int:
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def _kill_sources(folder: Path, kind: str) -> tuple[list[str], set[str]]:
    """160 images as files, or as dataset items (80 in 4 WebDataset shards, 80 in 2 Parquet tables of row groups of
    16): the roots to index and the identities the index must hold."""
    if kind == "files":
        make_images(folder, 160)
        return [str(folder)], {str(p) for p in folder.iterdir()}
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.test_webdataset import _jpeg, write_shards

    written = write_shards(folder, 4, 20)
    want = {f"{shard}#{key}" for key, (shard, *_) in written.items()}
    for t in range(2):
        images = [_jpeg(1000 + t * 40 + i) for i in range(40)]
        pq.write_table(pa.table({"jpg": images}), folder / f"t{t}.parquet", row_group_size=16)
        want |= {f"{(folder / f't{t}.parquet').resolve()}#{i}" for i in range(40)}
    return sorted(str(p) for p in folder.iterdir()), want


@needs_ray
@pytest.mark.parametrize("kind", ["files", "datasets"])
def test_sigkill_of_the_driver_then_resume_indexes_every_item_once(tmp_path: Path, ray_local: Path, kind: str) -> None:
    import ray

    roots, want = _kill_sources(tmp_path / "photos", kind)
    idx = tmp_path / "idx"
    address = ray.get_runtime_context().gcs_address  # the driver subprocess joins the module's Ray
    argv = [*roots, "--index", str(idx), "--model", TINY, "--pretrained", "none", "--device", "cpu"]
    argv += ["--ray", address, "--checkpoint-every", "8", "--batch-size", "8", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, "index", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and _committed(idx / "index.sqlite") < 8:
            time.sleep(0.1)
        assert proc.poll() is None, f"the driver ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ix = Index.open(idx)
    check = ix.check()
    assert check.ok, check.problems
    done = ix.ntotal
    assert 8 <= done < 160
    ix = Index.open(idx, model=TINY, pretrained="none", device="cpu")
    r = ix.update(roots, encoder=_ray_encoder(ix))
    assert r.encoded == r.new == 160 - done and r.unchanged == done and r.total == 160  # only the rest encoded
    paths = ix.store.paths_for_ids(ix.store.ids())
    assert len(paths) == len(set(paths)) == 160
    assert set(paths) == want
    assert_consistent(ix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_ray
def test_index_through_a_ray_head_node_in_another_process(tmp_path: Path, tiny_model) -> None:
    ray_bin = Path(sys.executable).parent / "ray"
    port = _free_port()
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped below without touching any other Ray
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    try:
        photos = _photos(tmp_path / "photos", 12)
        argv = [str(photos), "--index", str(tmp_path / "idx"), "--model", TINY, "--pretrained", "none"]
        argv += ["--device", "cpu", "--ray", f"127.0.0.1:{port}", "--ray-actors", "1", "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        deadline = time.monotonic() + 60
        while True:  # the head takes a few seconds to listen
            run = subprocess.run(
                [sys.executable, "-m", "cocatk", "index", *argv], env=env, capture_output=True, text=True
            )
            if run.returncode == 0 or time.monotonic() > deadline or "cannot start or join" not in run.stderr:
                break
            time.sleep(2)
        assert run.returncode == 0, run.stderr[-3000:]
        local = open_tiny(tmp_path / "local")
        local.update([photos])
        _same_index(local, Index.open(tmp_path / "idx"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        # `ray start` records the head in /tmp/ray/ray_current_cluster, where a later bare ray.init() would look.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if f":{port}" in current.read_text():
                current.unlink()


# ---- cocatk caption --ray ---------------------------------------------------------------------------------------
DEMO = ["--model", "demo", "--device", "cpu"]


def _scene_photos(folder: Path) -> Path:
    """Demo scenes the demo model captions (PNG, and one as JPEG: decoded at full size, as locally), a copy of one
    (a decode task sends a content once), a broken file."""
    from PIL import Image

    from cocatk.demo.quality import EVAL_SEED
    from cocatk.demo.scenes import iter_scenes, render_scene

    folder.mkdir(parents=True)
    for i, scene in enumerate(iter_scenes(EVAL_SEED, 5, namespace="eval-pairs")):
        render_scene(scene, 64).save(folder / f"s{i:02d}.png")
    Image.open(folder / "s00.png").convert("RGB").resize((200, 150)).save(folder / "big.jpg", quality=90)
    shutil.copy(folder / "s03.png", folder / "dup.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def _captions_of(index_dir: Path) -> dict[str, tuple[str, float]]:
    with contextlib.closing(sqlite3.connect(index_dir / "index.sqlite")) as db:
        rows = db.execute("SELECT f.path, c.text, c.logprob FROM captions c JOIN files f ON f.id = c.id").fetchall()
    return {Path(os.fsdecode(p)).name: (t, lp) for p, t, lp in rows}


@needs_ray
def test_ray_caption_equals_local_caption(tmp_path: Path, ray_local: Path, capsys) -> None:
    """`cocatk caption --ray`, into a file and into an index: the captions, log-probs and failures of a local run,
    the same resume, and Ray left running (the test's session, not started by the command)."""
    import json

    src = _scene_photos(tmp_path / "src")

    def run(*args: str) -> dict:
        code = main([*args, "--json"])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        return json.loads(cap.out)

    local = run("caption", str(src), "--output", str(tmp_path / "local.jsonl"), *DEMO)
    ray_local.write_text("")  # the first actor batch kills its own process, once: Ray restarts it, retries the batch
    remote = run(
        "caption", str(src), "--output", str(tmp_path / "ray.jsonl"), *DEMO, "--ray", "local", "--batch-size", "2"
    )
    assert not ray_local.exists(), "the actor was not killed"
    assert remote["captioned"] == local["captioned"] == 7 and remote["failed"] == local["failed"] == {"not an image": 1}
    by_source = {}
    for name in ("local", "ray"):
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        by_source[name] = {r["source"]: r for r in records}
    assert by_source["local"].keys() == by_source["ray"].keys()
    for source, a in by_source["local"].items():
        b = by_source["ray"][source]
        assert (a["caption"], a["error"], a["settings"]) == (b["caption"], b["error"], b["settings"]), source
        assert a["caption"] or a["error"]
        if a["logprob"] is not None:
            assert abs(a["logprob"] - b["logprob"]) <= 1e-4
    again = run("caption", str(src), "--output", str(tmp_path / "ray.jsonl"), *DEMO, "--ray", "local")
    assert again["already"] == 8 and again["captioned"] == 0

    # into an index: two copies of one index, captioned here and on Ray
    assert main(["index", str(src), "--index", str(tmp_path / "a"), *DEMO, "--json"]) == 0
    capsys.readouterr()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    here = run("caption", "--index", str(tmp_path / "a"), "--device", "cpu", "--no-cache-tokens")
    there = run("caption", "--index", str(tmp_path / "b"), "--device", "cpu", "--ray", "local")
    assert there["captioned"] == here["captioned"] == 7 and there["checkpoints"] >= 1
    a, b = _captions_of(tmp_path / "a"), _captions_of(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == 7 and a["dup.png"] == a["s03.png"]
    for name, (text, logprob) in a.items():
        assert b[name][0] == text and abs(b[name][1] - logprob) <= 1e-4, name
    # a file edited since it was indexed is not captioned from its new content
    (src / "s01.png").write_bytes((src / "s02.png").read_bytes())
    other = run("caption", "--index", str(tmp_path / "b"), "--device", "cpu", "--ray", "local", "--beams", "2")
    assert other["failed"] == {"changed since indexing": 1} and other["captioned"] == 6
    with contextlib.closing(sqlite3.connect(tmp_path / "b" / "index.sqlite")) as db:
        assert db.execute("SELECT count(*) FROM captions WHERE text = ''").fetchone()[0] == 0
    import ray

    assert ray.is_initialized()  # joined, not started, by the commands: left running


def test_caption_ray_refuses_a_dataset_and_names_the_extra(tmp_path: Path, monkeypatch, capsys) -> None:
    from cocatk.errors import UsageError
    from cocatk.models import load_model
    from cocatk.recaption import recaption

    with pytest.raises(UsageError, match="hf:"):
        recaption(["hf:some/dataset"], tmp_path / "o.jsonl", load_model("demo", device="cpu"), captioner=object())
    assert not (tmp_path / "o.jsonl").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    rc = main(["caption", str(tmp_path), "--output", str(tmp_path / "o.jsonl"), *DEMO, "--ray", "local"])
    err = capsys.readouterr().err
    assert rc == 1 and "cocatk[ray]" in err and len(err.strip().splitlines()) == 1, err


@needs_ray
def test_results_come_back_in_order_once_whatever_the_blocks_order() -> None:
    """_ordered against blocks that arrive out of order and twice (a retried block): every position once, in order;
    a pipeline that ends early is an error that says what is kept."""
    from cocatk.retrieval.ray_encoder import RayCaptioner, RayEncoderError

    class Blocks:
        def __init__(self, blocks: list[list[int]]) -> None:
            self.blocks = blocks

        def iter_batches(self, **kwargs):
            for block in self.blocks:
                yield {"pos": np.array(block), "value": np.array([10 * p for p in block])}

    run = RayCaptioner("demo", "none")
    blocks = [[4, 5], [0, 1], [6], [2, 3], [0, 1], [7, 8, 9], [4, 5]]
    got = [(pos, int(batch["value"][i])) for pos, batch, i in run._ordered(Blocks(blocks), 10, _timed, "kept")]
    assert got == [(p, 10 * p) for p in range(10)]
    with pytest.raises(RayEncoderError, match="2 results missing") as e:
        list(run._ordered(Blocks([[0, 1], [3]]), 5, _timed, "the captions written so far are kept"))
    assert "the captions written so far are kept" in e.value.one_line()


@needs_ray
def test_ray_reads_tables_and_captions_dataset_items_as_locally(tmp_path: Path, ray_local: Path, capsys) -> None:
    """Issue 30: `--ray` reads Parquet rows in the actors, and `cocatk caption --ray` over an index of dataset items
    (a shard's members, a table's rows: no file of that name exists) captions what a local run captions."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    src = _scene_photos(tmp_path / "src")
    images = sorted(p for p in src.iterdir() if p.name != "broken.png" and p.suffix in (".png", ".jpg"))
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "00000.tar")) as w:
        for p in images[:3]:
            w.write({"__key__": p.stem, p.suffix[1:]: p.read_bytes()})
    pq.write_table(pa.table({"jpg": [p.read_bytes() for p in images[3:]]}), tmp_path / "d" / "a.parquet",
                   row_group_size=2)  # fmt: skip
    sources = [str(tmp_path / "d" / "00000.tar"), str(tmp_path / "d" / "a.parquet")]
    local = open_tiny(tmp_path / "local")
    r_local = local.update(sources, cache_tokens=True)
    remote = open_tiny(tmp_path / "remote")
    r_ray = remote.update(sources, cache_tokens=True, checkpoint_every=2, encoder=_ray_encoder(remote))
    assert r_ray.new == r_local.new == len(images) and r_ray.failed_total == 0
    _same_index(local, remote, tokens=True)
    local.close()
    remote.close()

    def run(*args: str) -> dict:
        code = main([*args, "--json"])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        return json.loads(cap.out)

    run("index", *sources, "--index", str(tmp_path / "a"), *DEMO)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    here = run("caption", "--index", str(tmp_path / "a"), "--device", "cpu", "--no-cache-tokens")
    there = run("caption", "--index", str(tmp_path / "b"), "--device", "cpu", "--ray", "local")
    assert there["captioned"] == here["captioned"] == len(images) and not there["failed"]
    a, b = _captions_of(tmp_path / "a"), _captions_of(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) == len(images)
    for name, (text, logprob) in a.items():
        assert b[name][0] == text and abs(b[name][1] - logprob) <= 1e-4, name
