"""WebDataset tar shards as a collection (issue 30): scanned like webdataset reads them, indexed like files, resumed,
served from their byte ranges.

References: the shards are written by webdataset's own ``TarWriter`` and read back by ``webdataset.WebDataset``
(the peer's reader): cocatk's scanner must find the same samples and bytes. Each item's embedding must equal the
embedding of the same bytes indexed as a file (the same decode and model path), and the bytes the server sends
must be the bytes that were written.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocatk.cli import main
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index
from cocatk.sources import scan_shard
from tests.conftest import TINY_CONFIG
from tests.test_index import assert_consistent, open_tiny

wds = pytest.importorskip("webdataset")

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]
WORDS = ["beach", "forest", "city", "snow"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((30 + seed % 7, 44, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG" if seed % 2 else "PNG")
    return buf.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, corrupt: tuple[int, int] | None = None) -> dict:
    """img2dataset's layout, written by webdataset's TarWriter: key.jpg|png, key.txt, key.json. Returns
    key -> (shard path, image bytes, caption, meta)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in range(shards):
        path = folder / f"{s:05d}.tar"
        with wds.TarWriter(str(path)) as w:
            for i in range(per_shard):
                n = s * per_shard + i
                key = f"{n:09d}"
                data = _jpeg(n)
                if corrupt == (s, i):
                    data = b"\xff\xd8\xff\xe0 this is not a jpeg"
                ext = "jpg" if n % 2 else "png"
                caption = f"a photo of the {WORDS[n % len(WORDS)]} number {n}"
                meta = {"url": f"https://example.org/{key}.{ext}", "width": 44, "height": 30 + n % 7, "key": key}
                w.write({"__key__": key, ext: data, "txt": caption, "json": json.dumps(meta).encode()})
                out[key] = (str(path.resolve()), data, caption, meta)
    return out


def test_scan_finds_what_webdatasets_reader_finds(tmp_path: Path) -> None:
    written = write_shards(tmp_path / "s", 2, 5)
    for shard in sorted((tmp_path / "s").glob("*.tar")):
        ours = scan_shard(str(shard), [".jpg", ".png"])
        assert ours.error is None and not ours.skipped
        theirs = list(wds.WebDataset(str(shard), shardshuffle=False))
        assert [m.key for m in ours.members] == [t["__key__"] for t in theirs]
        raw = shard.read_bytes()
        for m, t in zip(ours.members, theirs, strict=True):
            image = t.get("jpg", t.get("png"))
            assert raw[m.offset : m.offset + m.size] == image == written[m.key][1]
            assert m.text == t["txt"].decode() and m.meta == json.loads(t["json"])


def test_index_search_serve_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = write_shards(tmp_path / "shards", 3, 6, corrupt=(1, 2))
    idx = tmp_path / "idx"
    spec = str(tmp_path / "shards" / "{00000..00002}.tar")  # quoted, as a shell leaves it: cocatk expands it
    assert main(["index", spec, "--index", str(idx), *TINY, "--json", "--workers", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (first["new"], first["encoded"], first["failed_total"]) == (17, 17, 1)  # the decoder's reason
    assert first["failures"][0]["path"].endswith("00001.tar#000000008")

    with Index.open(idx, device="cpu") as ix:
        assert_consistent(ix)
        rows = ix.store.file_rows()
        assert len(rows) == 17 and all("#" in p for p in rows)
        # the same bytes indexed as files give the same embeddings
        files = tmp_path / "files"
        files.mkdir()
        for key, (_, data, _, _) in written.items():
            if key != "000000008":
                (files / f"{key}.{'jpg' if int(key) % 2 else 'png'}").write_bytes(data)
        with open_tiny(tmp_path / "idx-files") as fx:
            fx.update([files], workers=0)
            by_key = {Path(p).stem: r.id for p, r in fx.store.file_rows().items()}
            theirs = fx.store.embeddings(list(by_key.values()), fx.dim)
            ours = ix.store.embeddings([rows[f"{written[k][0]}#{k}"].id for k in by_key], ix.dim)
        assert len(by_key) == 17 and np.abs(ours - theirs).max() == 0
        # --match finds the dataset's own captions
        hits = search_index(ix, text="a photo", n=50, rerank=False, match="beach").hits
        want = {k for k, v in written.items() if "beach" in v[2] and k != "000000008"}
        assert {h.path.rsplit("#", 1)[1] for h in hits} == want
        # the default search (rerank from cached tokens) answers over items
        assert len(search_index(ix, text="a photo of the snow", n=5).hits) == 5
        some = next(iter(rows))

    # a rerun opens no shard: each is recorded done with its size and mtime
    assert main(["index", "--index", str(idx), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["encoded"], again["unchanged"], again["new"], again["removed"]) == (0, 17, 0, 0)

    # served from the shard: the original bytes, a thumbnail, clip-retrieval's caption and url
    from fastapi.testclient import TestClient

    from cocatk.server.app import ServeSettings, create_app

    with TestClient(create_app(ServeSettings(index_dir=idx, device="cpu"))) as c:
        with Index.open(idx, device="cpu") as ix:
            fid = ix.store.file_rows()[some].id
        key = some.rsplit("#", 1)[1]
        r = c.get(f"/api/image/{fid}")
        assert r.status_code == 200 and r.content == written[key][1]
        assert r.headers["content-type"] in ("image/jpeg", "image/png")
        assert c.get(f"/api/thumb/{fid}").status_code == 200
        meta = c.post("/metadata", json={"ids": [fid]}).json()[0]["metadata"]
        assert meta["caption"] == written[key][2] and meta["source_url"] == written[key][3]["url"]
        assert meta["image_path"] == some and meta["url"].endswith(f"/api/image/{fid}")
        knn = c.post("/knn-service", json={"text": "a photo", "indice_name": "cocatk", "num_images": 3}).json()
        assert all(row["caption"] == written[row["image_path"].rsplit("#", 1)[1]][2] for row in knn)


def test_truncated_shard_is_one_failure_and_the_rest_goes_on(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", 2, 6)
    bad = tmp_path / "s" / "00001.tar"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    with open_tiny(tmp_path / "idx") as ix:
        report = ix.update([tmp_path / "s" / "00000.tar", bad], workers=0)
        assert report.failed.get("truncated") == 1
        assert [f["path"] for f in report.failures if f["reason"] == "truncated"] == [str(bad.resolve())]
        kept = scan_shard(str(bad), [".jpg", ".png"])
        assert kept.error and 0 < len(kept.members) < 6
        assert report.new == 6 + len(kept.members)
        assert_consistent(ix)
        # not recorded done: the next run reads it again and reports it again, encoding nothing twice
        again = ix.update([], workers=0)
        assert again.failed.get("truncated") == 1 and again.encoded == 0


def assert_resumes_each_item_once(folder: Path, sources: list[str], total: int, stop_at: int) -> None:
    """Interrupt an update of ``sources`` after ``stop_at`` items (checkpoints of 5), run it again: every item is
    committed once, and the rerun encodes only what the interrupted run did not commit."""

    def stop_after(stage: str, done: int, total: int | None) -> None:
        if stage == "index" and done >= stop_at:
            raise KeyboardInterrupt

    with open_tiny(folder) as ix:
        with pytest.raises(KeyboardInterrupt):
            ix.update(sources, workers=0, checkpoint_every=5, progress=stop_after)
        committed = ix.store.count()
        assert 0 < committed < total
        report = ix.update(sources, workers=0)
        assert report.encoded == total - committed and report.unchanged == committed
        paths = list(ix.store.file_rows())
        assert len(paths) == len(set(paths)) == total
        assert_consistent(ix)


def test_an_interrupted_run_resumes_with_each_item_exactly_once(tmp_path: Path) -> None:
    write_shards(tmp_path / "s", 4, 8)
    shards = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    assert_resumes_each_item_once(tmp_path / "idx", shards, 32, stop_at=16)


def test_forget_a_shard_drops_its_items_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path / "s", 2, 4)
    a, b = sorted(str(p) for p in (tmp_path / "s").glob("*.tar"))
    idx = str(tmp_path / "idx")
    assert main(["index", a, b, "--index", idx, *TINY]) == 0
    capsys.readouterr()
    assert main(["forget", b, "--index", idx, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == 4
    with Index.open(idx, device="cpu") as ix:
        assert sorted({p.rsplit("#", 1)[0] for p in ix.store.file_rows()}) == [a]
        assert_consistent(ix)
    # forgotten means forgotten: indexing it again reads it again
    with open_tiny(tmp_path / "idx") as ix:
        assert ix.update([b], workers=0).new == 4


def test_a_missing_pattern_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["index", str(tmp_path / "nothing" / "{00000..00003}.tar"), "--index", str(tmp_path / "i"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


def test_a_shard_that_is_not_a_tar(tmp_path: Path) -> None:
    bad = tmp_path / "00000.tar"
    bad.write_bytes(b"not a tar at all" * 40)
    scan = scan_shard(str(bad), [".jpg"])
    assert scan.error and not scan.members
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    assert scan_shard(str(tmp_path / "empty.tar"), [".jpg"]).members == []
