"""clip-retrieval's embeddings folder, both ways (`cocatk export`, `cocatk index --from-embeddings`), checked against
clip-retrieval's own reader (the embedding-reader package) and against the index it came from."""

from __future__ import annotations

import base64
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

from cocatk.cli import main
from cocatk.errors import IndexMismatchError, UsageError
from cocatk.retrieval.exchange import open_embeddings
from cocatk.retrieval.from_embeddings import IMPORTED_CAPTIONS, import_embeddings, import_model
from cocatk.retrieval.index import Index
from cocatk.retrieval.search import search_index
from tests.conftest import TINY_CONFIG
from tests.test_index import assert_consistent, make_images, open_tiny

embedding_reader = pytest.importorskip("embedding_reader", reason="embedding-reader is not installed (the dev extra)")

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]
#: A name that is not UTF-8 (a Latin-1 camera card): it must come back byte for byte.
LATIN1 = os.fsdecode(b"caf\xe9.png")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(photos, index): 12 images (one with a non-UTF-8 name), two of them captioned."""
    root = tmp_path_factory.mktemp("source")
    photos = root / "photos"
    make_images(photos, 11)
    shutil.copy(photos / "im001.png", photos / LATIN1)
    (photos / LATIN1).write_bytes((photos / LATIN1).read_bytes() + b"\0")  # its own content hash
    ix = open_tiny(root / "idx")
    ix.update([photos], workers=0)
    ids = ix.store.ids().tolist()
    ix.store.begin()
    ix.store.ensure_caption_config("k", {"model": "tiny"})
    for i in ids[:2]:
        ix.store.put_caption(i, "k", ix.store.hashes_for_ids([i])[0] or "", f"caption of {i}", -1.0)
    ix.store.commit()
    ix.close()
    return photos, root / "idx"


def _export(tmp_path: Path, idx: Path, *args: str, name: str = "out") -> Path:
    out = tmp_path / name
    assert main(["export", str(out), "--index", str(idx), "--format", "clip-retrieval", *args]) == 0
    return out


def _read_back(out: Path, columns: list[str]) -> tuple[np.ndarray, list[dict]]:
    """The folder as clip-retrieval's back end reads it: embedding-reader's parquet_npy reader, in its own order."""
    reader = embedding_reader.EmbeddingReader(
        embeddings_folder=str(out / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(out / "metadata"),
        meta_columns=columns,
    )
    vecs, meta = [], []
    for emb, df in reader(batch_size=5, start=0, end=reader.count, show_progress=False):
        vecs.append(emb)
        meta.extend(df.to_dict("records"))
    return np.concatenate(vecs), meta


@pytest.mark.parametrize(("dtype", "shard_size", "shards"), [("float32", 5, 3), ("float16", 1, 12)])
def test_export_reads_back_with_embedding_reader(
    tmp_path: Path, source: tuple[Path, Path], capsys, dtype: str, shard_size: int, shards: int
) -> None:
    _, idx = source
    capsys.readouterr()
    out = _export(tmp_path, idx, "--dtype", dtype, "--shard-size", str(shard_size), "--json")
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows"], summary["shards"], summary["dtype"], summary["captions"]) == (12, shards, dtype, 2)
    # clip-retrieval's zero padding: sorted names are the row order (img_emb_00 ... img_emb_11).
    assert sorted(p.name for p in (out / "img_emb").iterdir())[:2] == (
        ["img_emb_00.npy", "img_emb_01.npy"] if shards == 12 else ["img_emb_0.npy", "img_emb_1.npy"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    vecs, meta = _read_back(out, ["image_path", "image_path_b64", "id", "caption"])
    with Index.open(idx) as ix:
        ids = ix.store.ids().tolist()
        ref = ix.embeddings(ids)
        paths = ix.store.paths_for_ids(ids)
        captions = ix.store.captions_for_ids(ids)
    assert [m["id"] for m in meta] == ids  # id order, as the .npy rows
    if dtype == "float32":
        assert np.abs(vecs - ref).max() == 0
    else:  # exactly the fp16 rounding of the stored vectors
        assert np.array_equal(vecs, ref.astype(np.float16).astype(np.float32))
        assert np.abs(vecs - ref).max() <= 2**-11
    for m, p, i in zip(meta, paths, ids, strict=True):
        b64 = m["image_path_b64"] if isinstance(m["image_path_b64"], str) else None
        assert (os.fsdecode(base64.b64decode(b64)) if b64 else m["image_path"]) == p
        assert (b64 is not None) == (p == str(Path(p).parent / LATIN1))
        assert (m["caption"] if isinstance(m["caption"], str) else None) == captions.get(i)
    record = json.loads((out / "cocatk.json").read_text())
    assert record["embed_dim"] == ref.shape[1] and record["count"] == 12 and record["dtype"] == dtype


def test_round_trip_searches_the_same_and_the_next_index_encodes_nothing(
    tmp_path: Path, source: tuple[Path, Path], capsys
) -> None:
    photos, idx = source
    out = _export(tmp_path, idx, "--dtype", "float32")
    new = tmp_path / "new"
    capsys.readouterr()
    # No --model: the export records it.
    assert main(["index", "--from-embeddings", str(out), "--index", str(new), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["imported"], report["missing"], report["already"], report["total"]) == (12, 0, 0, 12)
    assert report["hashed"] == 0  # same machine, same stat: the recorded hashes are trusted
    assert [r["path"] for r in report["roots"]] == [str(photos.resolve())]
    with Index.open(idx, device="cpu") as a, Index.open(new, device="cpu") as b:
        assert_consistent(b)
        pa = dict(zip(a.store.paths_for_ids(a.store.ids().tolist()), a.store.ids().tolist(), strict=True))
        pb = dict(zip(b.store.paths_for_ids(b.store.ids().tolist()), b.store.ids().tolist(), strict=True))
        assert set(pa) == set(pb)  # the non-UTF-8 name too, byte for byte
        assert np.array_equal(a.embeddings([pa[p] for p in pa]), b.embeddings([pb[p] for p in pa]))
        assert a.store.file_rows().keys() == b.store.file_rows().keys()
        for query in ("a red square", "blue"):
            ha = search_index(a, query, n=12, rerank=False).hits
            hb = search_index(b, query, n=12, rerank=False).hits
            assert [(h.path, h.similarity) for h in ha] == [(h.path, h.similarity) for h in hb]
        assert sorted(b.store.captions_for_ids(b.store.ids().tolist()).values()) == sorted(
            a.store.captions_for_ids(a.store.ids().tolist()).values()
        )
        assert IMPORTED_CAPTIONS in b.store.caption_configs()
        assert b.manifest["cache_tokens"] is False
    assert main(["index", str(photos), "--index", str(new), "--device", "cpu", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["encoded"], again["unchanged"], again["new"], again["removed"]) == (0, 12, 0, 0)


def _clip_retrieval_folder(out: Path, vecs: np.ndarray, paths: list[str], shard: int = 4) -> Path:
    """A folder as clip-retrieval's OutputSink writes it: np.save of float16 rows, pandas to_parquet of image_path,
    names zero-padded to the partition count; no cocatk.json."""
    import pandas as pd

    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    parts = range(0, len(paths), shard)
    width = int(np.log10(len(parts))) + 1
    for k, a in enumerate(parts):
        np.save(out / "img_emb" / f"img_emb_{str(k).zfill(width)}.npy", vecs[a : a + shard].astype(np.float16))
        pd.DataFrame({"image_path": paths[a : a + shard]}).to_parquet(
            out / "metadata" / f"metadata_{str(k).zfill(width)}.parquet"
        )
    return out


def test_clip_retrieval_output_imports_with_a_notice_and_missing_files(
    tmp_path: Path, source: tuple[Path, Path], capsys, monkeypatch
) -> None:
    photos, idx = source
    with Index.open(idx) as ix:
        ids = ix.store.ids().tolist()
        vecs, paths = ix.embeddings(ids), ix.store.paths_for_ids(ids)
    keep = [k for k, p in enumerate(paths) if p is not None and not p.endswith(LATIN1)]
    rel = [os.path.relpath(str(paths[k]), tmp_path) for k in keep]  # relative, as a run in tmp_path writes them
    gone = str(tmp_path / "elsewhere" / "gone.jpg")
    rows = np.concatenate([vecs[keep], vecs[keep[:1]]])
    folder = _clip_retrieval_folder(tmp_path / "cr", rows, [*rel, gone])
    new = tmp_path / "new"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    # Without a record, --model is needed for a new index: refused before anything is written.
    assert main(["index", "--from-embeddings", str(folder), "--index", str(new), "--json"]) == 2
    assert "pass --model" in capsys.readouterr().err and not new.exists()
    assert main(["index", "--from-embeddings", str(folder), "--index", str(new), *TINY, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "only the dimension (64) was checked" in " ".join(captured.err.split())
    assert (report["imported"], report["missing"], report["hashed"]) == (len(rel) + 1, 1, len(rel))
    assert report["missing_examples"] == [{"path": gone}]
    with Index.open(new, device="cpu") as b:
        assert_consistent(b)
        got = b.embeddings(b.store.ids().tolist())
        assert np.abs(got - rows).max() < 2e-3  # fp16 rows, normalised again
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
        # A search skips a row while its file is not there (as any deleted file), and finds it once it is.
        result = search_index(b, "anything", n=len(rel) + 1, rerank=False)
        assert (gone, "file is gone") in result.dropped and len(result.hits) == len(rel)
        Path(gone).parent.mkdir()
        shutil.copy(photos / "im000.jpg", gone)
        assert gone in {h.path for h in search_index(b, "anything", n=len(rel) + 1, rerank=False).hits}
        Path(gone).unlink()
        Path(gone).parent.rmdir()
    # The next index of the photos encodes only the one photo the folder left out; the row without its file is kept.
    assert main(["index", str(photos), "--index", str(new), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["encoded"], again["new"], again["unchanged"], again["removed"]) == (1, 1, len(rel), 0)
    with Index.open(new) as b:
        assert gone in b.store.file_rows() and b.check().ok


def test_dim_and_model_mismatch_are_typed_refusals(tmp_path: Path, source: tuple[Path, Path], capsys) -> None:
    photos, idx = source
    seven = _clip_retrieval_folder(tmp_path / "seven", np.eye(3, 7, dtype=np.float32), ["/a.jpg", "/b.jpg", "/c.jpg"])
    new = tmp_path / "new"
    capsys.readouterr()
    assert main(["index", "--from-embeddings", str(seven), "--index", str(new), *TINY]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "holds 7-d embeddings" in err and "gives 64-d" in err and "Fix:" in err and not new.exists()
    assert main(["index", "--from-embeddings", str(seven), "--index", str(idx)]) == 1  # into an existing index
    assert "holds 64-d" in capsys.readouterr().err
    # Same dim, another model: the export's record refuses it, named or not, before any folder is made.
    other = tmp_path / "coca_tiny_other.json"
    other.write_text(json.dumps(json.loads(TINY_CONFIG.read_text())))  # other bytes: another identity
    out = _export(tmp_path, idx, "--dtype", "float32")
    cmd = ["index", "--from-embeddings", str(out), "--index", str(new), "--device", "cpu"]
    assert main([*cmd, "--model", str(other), "--pretrained", "none"]) == 1
    assert "holds embeddings of" in capsys.readouterr().err and not new.exists()
    ix = Index.open(new, model=str(other), pretrained="none", device="cpu", create=True)
    ix.close()
    assert main(cmd) == 1  # an index of the other model, no --model: refused by the index's own check
    assert "was built with" in capsys.readouterr().err
    src = open_embeddings(out)
    with Index.open(new, device="cpu", lock=True) as ix, pytest.raises(IndexMismatchError) as e:
        import_embeddings(ix, src)
    assert "new index of that model" in e.value.hint
    with pytest.raises(IndexMismatchError):
        import_model(src, new, str(other), "none")
    # Options that an import cannot honour, and a damaged folder, are usage errors.
    assert main([*cmd, "--caption"]) == 2
    (out / "metadata" / "metadata_0.parquet").write_bytes(b"not parquet")
    with pytest.raises(UsageError):
        open_embeddings(out)


def test_export_refuses_a_non_empty_out(tmp_path: Path, source: tuple[Path, Path], capsys) -> None:
    _, idx = source
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(out), "--index", str(idx)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "already exists and is not an empty folder" in err and "Fix: pass a new folder" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", str(empty), "--index", str(idx)]) == 0  # an empty folder is filled
    assert (empty / "cocatk.json").is_file()


def test_a_rerun_after_an_interrupted_import_imports_each_row_once(
    tmp_path: Path, source: tuple[Path, Path], monkeypatch
) -> None:
    _, idx = source
    out = _export(tmp_path, idx)
    src = open_embeddings(out)
    ix = open_tiny(tmp_path / "new", lock=True)
    real = ix.store.insert_file
    calls = []

    def dies_on_the_sixth(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 6:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(ix.store, "insert_file", dies_on_the_sixth)
    with pytest.raises(KeyboardInterrupt):
        import_embeddings(ix, src, checkpoint_every=2, workers=0)
    monkeypatch.setattr(ix.store, "insert_file", real)
    ix.close()
    with Index.open(tmp_path / "new", device="cpu", lock=True) as ix:
        assert ix.ntotal == 4  # two checkpoints committed; the fifth row rolled back
        report = import_embeddings(ix, src, checkpoint_every=2, workers=2)
        assert (report.imported, report.already, report.total) == (8, 4, 12)
        assert_consistent(ix)
        paths = ix.store.paths_for_ids(ix.store.ids().tolist())
    with Index.open(idx) as a:
        assert sorted(paths) == sorted(a.store.paths_for_ids(a.store.ids().tolist()))  # each row exactly once
    with Index.open(tmp_path / "new", device="cpu", lock=True) as ix:
        assert import_embeddings(ix, src).imported == 0


def _float32_folder(out: Path, n: int, shard: int) -> tuple[np.ndarray, list[str]]:
    """clip-retrieval's layout with float32 rows (np.save, pandas to_parquet), each row's file a few distinct bytes
    under ``out/files``: (the vectors as written, their absolute paths in row order)."""
    import pandas as pd

    files = out / "files"
    files.mkdir(parents=True)
    files = files.resolve()  # the index keeps a row's folder resolved (a /tmp that is a symlink)
    rng = np.random.default_rng(30)
    vecs = rng.standard_normal((n, 64)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    paths = []
    for i in range(n):
        p = files / f"f{i:06d}.jpg"
        p.write_bytes(i.to_bytes(4, "little"))
        paths.append(str(p))
    (out / "emb" / "img_emb").mkdir(parents=True)
    (out / "emb" / "metadata").mkdir()
    parts = range(0, n, shard)
    width = len(str(len(parts) - 1))
    for k, a in enumerate(parts):
        np.save(out / "emb" / "img_emb" / f"img_emb_{str(k).zfill(width)}.npy", vecs[a : a + shard])
        pd.DataFrame({"image_path": paths[a : a + shard]}).to_parquet(
            out / "emb" / "metadata" / f"metadata_{str(k).zfill(width)}.parquet"
        )
    return vecs, paths


def _committed_rows(db: Path) -> int | None:
    """Rows committed in the index's SQLite file, read-only; None while it cannot be read yet."""
    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    except sqlite3.Error:
        return None


def _import_killed_when(argv: list[str], db: Path, at_least: int, timeout: float = 60) -> tuple[int, bool]:
    """Run ``cocatk index --from-embeddings`` (a whole process), SIGKILL it once ``at_least`` rows are committed:
    (rows committed when it died, whether it was still running at the kill)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cocatk", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if (_committed_rows(db) or 0) >= at_least:
                break
            time.sleep(0.002)
        running = proc.poll() is None
        if running:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert running or proc.returncode == 0, err[-2000:]
    return _committed_rows(db) or 0, running


def test_sigkill_of_an_import_then_rerun_imports_each_row_once_bit_for_bit(tmp_path: Path, capsys) -> None:
    """``cocatk index --from-embeddings`` SIGKILLed after its first checkpoint, mid-run and after its last commit
    (while the FAISS file is written), each time rerun: every row once, with the source's vector bit for bit and the
    ids an unkilled import gives (the source's row order)."""
    n, every = 12_000, 400
    vecs, paths = _float32_folder(tmp_path, n, shard=3_000)
    emb, idx = tmp_path / "emb", tmp_path / "idx"
    argv = ["index", "--from-embeddings", str(emb), "--index", str(idx), *TINY, "--checkpoint-every", str(every)]
    db = idx / "index.sqlite"
    done = 0
    for at_least, mid_run in ((1, True), (n // 2, True), (n, False)):
        committed, killed = _import_killed_when(argv, db, at_least)
        assert killed or not mid_run, "the import ended before the kill: give it more rows"
        if killed and mid_run:
            assert at_least <= committed < n
        assert committed % every == 0 and committed >= done  # whole checkpoints, none lost to a kill
        with Index.open(idx, device="cpu") as ix:
            assert ix.check().ok, ix.check().problems
        done = committed
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["imported"], report["already"], report["total"]) == (n - done, done, n)
    ref = tmp_path / "ref"  # the same folder imported without a kill
    with open_tiny(ref, lock=True) as rx:
        import_embeddings(rx, open_embeddings(emb), checkpoint_every=every)
    with Index.open(idx, device="cpu") as ix, Index.open(ref, device="cpu") as rx:
        assert_consistent(ix)
        ids = ix.store.ids().tolist()
        assert ids == rx.store.ids().tolist() == list(range(1, n + 1))
        assert ix.store.paths_for_ids(ids) == rx.store.paths_for_ids(ids) == paths  # row order, each row once
        assert np.abs(ix.embeddings(ids) - vecs).max() == 0  # float32: bit for bit
        assert np.abs(ix.vectors.reconstruct(np.array(ids)) - vecs).max() == 0  # and so is the FAISS file
        assert ix.store.file_rows().keys() == rx.store.file_rows().keys()
