"""The incremental indexer (cocatk.retrieval): counts, SQLite/FAISS consistency, durability, refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocatk.errors import IndexBusyError, IndexMismatchError, IndexNotFoundError, UsageError
from cocatk.retrieval.index import Index
from tests.conftest import TINY_CONFIG

TINY = str(TINY_CONFIG)


def make_images(folder: Path, n: int, seed: int = 0, prefix: str = "im") -> list[Path]:
    """n small images with distinct content (PNG and JPEG alternating)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = (rng.random((24 + i % 5, 40, 3)) * 255).astype(np.uint8)
        path = folder / f"{prefix}{i:03d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def open_tiny(folder: Path, **kwargs) -> Index:
    return Index.open(folder, model=TINY, pretrained="none", device="cpu", create=True, **kwargs)


def assert_consistent(ix: Index) -> None:
    check = ix.check()
    assert check.ok, check.problems
    assert np.array_equal(np.sort(ix.vectors.ids()), ix.store.ids())
    assert ix.vectors.ntotal == ix.ntotal == check.files


def test_first_run_counts_failures_and_consistency(tmp_path: Path, tiny_model) -> None:
    photos = tmp_path / "photos"
    make_images(photos / "sub", 10)
    shutil.copy(photos / "sub" / "im001.png", photos / "copy.png")
    (photos / "bad.jpg").write_text("no image here")
    (photos / "empty.png").write_bytes(b"")
    ix = open_tiny(tmp_path / "idx")
    r = ix.update([photos], workers=2, checkpoint_every=4, batch_size=4)
    assert (r.scanned, r.new, r.duplicates, r.encoded, r.changed, r.removed) == (13, 11, 1, 10, 0, 0)
    assert r.failed == {"not an image": 1, "empty file": 1}
    assert {f["path"] for f in r.failures} == {str(photos / "bad.jpg"), str(photos / "empty.png")}
    assert r.checkpoints >= 2 and r.total == 11
    assert_consistent(ix)
    # Stored embeddings are what the model gives for the decoded image (JPEG draft is a no-op at this size).
    from cocatk.images import load_image

    ids = ix.store.ids()
    paths = ix.store.paths_for_ids(ids)
    want = tiny_model.encode_images([load_image(p, draft_size=32) for p in paths])
    np.testing.assert_allclose(ix.embeddings(ids), want, atol=1e-5)
    manifest = ix.manifest
    assert manifest["embed_dim"] == 64 and manifest["image_size"] == 32 and manifest["factory"] == "Flat"
    assert manifest["identity"] == tiny_model.spec.identity()
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["embed_dim"] == 64
    info = ix.info()
    assert info["files"] == 11 and info["unique_contents"] == 10 and info["roots"] == [str(photos)]
    assert info["failed"] == {"not an image": 1, "empty file": 1}
    # Known failures are reported again without being retried; a fixed file is picked up.
    r = ix.update([photos])
    assert r.failed == {"not an image": 1, "empty file": 1} and r.encoded == 0 and r.unchanged == 11
    Image.new("RGB", (30, 30), (1, 2, 3)).save(photos / "empty.png")
    r = ix.update([photos])
    assert r.failed == {"not an image": 1} and r.new == 1 and r.encoded == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_stage_timings_account_for_the_run(tmp_path: Path, workers: int) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 20)
    ix = open_tiny(tmp_path / "idx")
    r = ix.update([photos], workers=workers, batch_size=8)
    t = r.timings
    main_thread = ("scan", "model_load", "wait_decode", "model", "sqlite", "faiss", "other")
    assert set(t) == {*main_thread, "read_hash", "decode_preprocess", "decode_threads"}
    assert all(v >= 0 for v in t.values()) and t["decode_threads"] == workers
    # The main-thread stages partition the run (a stage nested in another is counted once).
    assert sum(t[k] for k in main_thread) == pytest.approx(r.seconds, rel=0.02, abs=0.02)
    assert t["model"] > 0 and t["decode_preprocess"] > 0 and t["read_hash"] > 0 and t["sqlite"] > 0
    if workers == 0:  # decoding runs inline, inside the wait for the next prepared file
        assert t["wait_decode"] >= t["decode_preprocess"] + t["read_hash"] - 0.01
    assert r.to_dict()["timings"]["model"] == round(t["model"], 3)
    # A run with nothing to do loads no model and encodes nothing.
    r = ix.update([photos])
    assert r.encoded == 0 and r.timings["model"] == 0 and r.timings["model_load"] == 0
    assert set(r.timings) == set(t)


def test_incremental_add_modify_delete_move_duplicate(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    paths = make_images(photos, 12)
    ix = open_tiny(tmp_path / "idx")
    ix.update([photos], workers=1)
    before = dict(zip(ix.store.paths_for_ids(ix.store.ids()), ix.store.ids().tolist(), strict=True))

    make_images(photos / "new", 2, seed=7)  # 2 added
    Image.fromarray(np.zeros((20, 20, 3), np.uint8) + 77).save(paths[0])  # 1 modified (same name, new content)
    paths[1].unlink()  # 1 deleted
    paths[2].rename(photos / "renamed.png")  # 1 moved
    shutil.copy(paths[3], photos / "dup_of_3.jpg")  # 1 duplicate of an indexed file
    os.utime(paths[4], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched only
    r = ix.update(workers=2)  # no paths: the stored roots
    assert (r.new, r.changed, r.moved, r.removed, r.duplicates, r.encoded) == (3, 1, 1, 1, 1, 3)
    assert r.unchanged == 12 - 3  # all but the modified, deleted and moved ones; the touched file included
    assert r.scanned == 14 and r.total == 14
    assert_consistent(ix)
    after = dict(zip(ix.store.paths_for_ids(ix.store.ids()), ix.store.ids().tolist(), strict=True))
    assert after[str(photos / "renamed.png")] == before[str(paths[2])]  # moved: same id, not re-encoded
    assert after[str(paths[0])] == before[str(paths[0])]  # changed in place: same id, new vector
    assert str(paths[1]) not in after
    e = ix.embeddings([after[str(paths[3])], after[str(photos / "dup_of_3.jpg")]])
    assert np.array_equal(e[0], e[1])

    r = ix.update([photos])
    assert (r.new, r.changed, r.moved, r.removed, r.encoded, r.unchanged) == (0, 0, 0, 0, 0, 14)


def test_roots_are_scoped_and_failures_cleared(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_images(a, 3)
    make_images(b, 3, seed=1)
    (a / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ix = open_tiny(tmp_path / "idx")
    ix.update([a])
    ix.update([b])
    assert ix.ntotal == 6 and sorted(ix.store.roots()) == [str(a), str(b)]
    shutil.rmtree(b)
    make_images(b, 1, seed=1)
    r = ix.update([a])  # only `a` is scanned: b's missing files are not touched
    assert r.removed == 0 and ix.ntotal == 6
    (a / "broken.png").unlink()
    r = ix.update()
    assert r.removed == 2 and ix.ntotal == 4 and r.failed == {}
    assert ix.info()["failures"] == []
    assert_consistent(ix)


def test_faiss_search_equals_numpy_topk(tmp_path: Path, tiny_model) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 30, seed=3)
    ix = open_tiny(tmp_path / "idx")
    ix.update([photos], workers=0)
    ids = ix.store.ids()
    emb = ix.embeddings(ids)
    queries = tiny_model.encode_texts(["a red square", "noise", "a photo of a cat"])
    scores, got = ix.vectors.search(queries, 5)
    sims = queries @ emb.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order, 1), atol=1e-5)
    np.testing.assert_array_equal(np.sort(got, 1), np.sort(ids[order], 1))
    # id_selector restricts the candidates
    allowed = ids[::3]
    s2, g2 = ix.vectors.search(queries, 4, id_selector=allowed)
    assert set(g2.ravel().tolist()) <= set(allowed.tolist())
    sub = queries @ ix.embeddings(allowed).T
    np.testing.assert_allclose(s2, -np.sort(-sub, 1)[:, :4], atol=1e-5)
    # a fresh reader sees the saved FAISS file and the same results
    reader = Index.open(tmp_path / "idx")
    s3, g3 = reader.vectors.search(queries, 5)
    np.testing.assert_array_equal(g3, got)


def test_mismatch_refused_with_rebuild_command_and_rebuild_works(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 4)
    ix = open_tiny(tmp_path / "idx")
    ix.update([photos])
    ix.close()
    other = tmp_path / "coca_tiny_b.json"
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["embed_dim"] = cfg["text_cfg"]["width"] = cfg["multimodal_cfg"]["width"] = 32
    cfg["vision_cfg"]["attn_pooler_heads"] = 2
    other.write_text(json.dumps(cfg))
    with pytest.raises(IndexMismatchError) as e:
        Index.open(tmp_path / "idx", model=str(other), pretrained="none", device="cpu")
    assert "--rebuild" in e.value.hint and str(tmp_path / "idx") in e.value.hint
    ix = Index.open(tmp_path / "idx", model=str(other), pretrained="none", device="cpu", rebuild=True)
    assert ix.ntotal == 0 and ix.manifest["embed_dim"] == 32
    r = ix.update()
    assert r.new == 4 and ix.vectors.dim == 32
    assert_consistent(ix)
    with pytest.raises(IndexNotFoundError):
        Index.open(tmp_path / "nothing-here")


def test_second_writer_gets_busy_error(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 2)
    first = open_tiny(tmp_path / "idx")
    second = Index.open(tmp_path / "idx")
    first._acquire_lock()
    try:
        with pytest.raises(IndexBusyError, match="busy"):
            second.update([photos])
    finally:
        first._release_lock()
    assert second.update([photos]).new == 2


def test_cache_tokens_and_budget(tmp_path: Path, tiny_model) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 5)
    ix = open_tiny(tmp_path / "idx")
    ix.update([photos], cache_tokens=False)  # an index without tokens (as older cocatk built them)
    assert ix.get_tokens(ix.store.ids()) is None
    assert ix.update([photos]).tokens_cached == 0  # a default run keeps its choice: no backfill
    with pytest.raises(UsageError, match="GiB"):
        ix.update([photos], cache_tokens=True, token_cache_limit_gb=1e-6)
    r = ix.update([photos], cache_tokens=True)  # backfills the 5 existing files
    assert r.tokens_cached == 5 and r.unchanged == 5 and r.new == 0
    ids = ix.store.ids()
    toks = ix.get_tokens(ids)
    assert toks is not None and tuple(toks.shape) == (5, 16, 64) and str(toks.dtype) == "torch.float16"
    from cocatk.images import load_image

    want = tiny_model.image_tokens([load_image(p, draft_size=32) for p in ix.store.paths_for_ids(ids)])
    np.testing.assert_allclose(toks.float().numpy(), want.numpy(), atol=2e-2, rtol=1e-2)
    make_images(photos, 1, seed=9, prefix="extra")
    r = ix.update()  # the manifest keeps caching on
    assert r.tokens_cached == 1 and ix.get_tokens(ix.store.ids()).shape[0] == 6
    assert_consistent(ix)


def test_faiss_factory_refused_when_too_small_and_hnsw_works(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 12)
    ix = open_tiny(tmp_path / "idx")
    with pytest.raises(UsageError, match="needs at least 64"):
        ix.update([photos], faiss_factory="IVF64,Flat")
    assert ix.ntotal == 0 and ix.manifest["factory"] == "Flat"  # refused before any work
    with pytest.raises(UsageError, match="cannot build"):
        ix.update([photos], faiss_factory="NotAFactory")
    r = ix.update([photos], faiss_factory="IVF4,Flat")
    assert r.new == 12 and ix.manifest["factory"] == "IVF4,Flat"
    assert ix.vectors.ntotal == 12
    (photos / "im000.jpg").unlink()
    ix.update(faiss_factory="HNSW8")  # switches the factory without re-encoding; HNSW cannot remove: rebuilt
    assert ix.manifest["factory"] == "HNSW8" and ix.vectors.ntotal == 11
    assert ix.check().ok


_KILL_SCRIPT = """
import sys, time
from cocatk.models import CocaModel
_orig = CocaModel.encode_images_and_tokens
def _slow(self, *a, **k):
    time.sleep(0.25)  # slow enough to be killed mid-run
    return _orig(self, *a, **k)
CocaModel.encode_images_and_tokens = _slow
from cocatk.retrieval.index import Index
ix = Index.open(sys.argv[1], model=sys.argv[3], pretrained="none", device="cpu", create=True)
ix.update([sys.argv[2]], batch_size=4, checkpoint_every=4, workers=1)
"""


def test_sigkill_mid_run_leaves_a_consistent_index_that_resumes(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 48)
    idx = tmp_path / "idx"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(idx), str(photos), TINY], env=env)
    try:
        deadline = time.monotonic() + 90
        committed = 0
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            db = idx / "index.sqlite"
            if not db.is_file():
                continue
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
                    committed = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            except sqlite3.OperationalError:
                continue
            if committed >= 12:
                break
        assert proc.poll() is None, "the indexer finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ix = Index.open(idx)
    check = ix.check()
    assert check.ok, check.problems
    assert 12 <= ix.ntotal < 48
    done = ix.ntotal
    ix = Index.open(idx, model=TINY, pretrained="none", device="cpu")
    r = ix.update([photos])
    assert r.new == 48 - done and r.unchanged == done and r.total == 48
    assert_consistent(ix)
    paths = ix.store.paths_for_ids(ix.store.ids())
    assert sorted(paths) == sorted(str(p) for p in photos.iterdir())  # every file exactly once
