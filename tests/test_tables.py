"""Image tables as a collection (issue 30): Parquet files (img2dataset's parquet output) and Hugging Face datasets
(``hf:PATH`` written by ``save_to_disk``, ``hf:NAME`` from the local datasets cache), indexed row by row, resumed,
served from their rows.

References: the tables are written by pyarrow and by ``datasets`` itself and read back by them (the peers' readers):
cocatk's scan must find the same rows, bytes, captions and metadata. Each row's embedding must equal the embedding
of the same bytes indexed as a file, and the bytes the server sends must be the row's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cocatk.cli import main
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index
from cocatk.sources import Columns, read_source, scan_table
from tests.conftest import TINY_CONFIG
from tests.test_index import assert_consistent, open_tiny

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]
WORDS = ["beach", "forest", "city", "snow"]


def _image(seed: int) -> bytes:
    from tests.test_webdataset import _jpeg  # the same small JPEG/PNG images as the shard tests

    return _jpeg(seed)


def write_parquet(path: Path, start: int, rows: int, row_group: int = 7, broken: int | None = None) -> dict:
    """img2dataset's parquet layout (key, jpg, caption, url, width, height), written by pyarrow in row groups of
    ``row_group``. Returns row -> (image bytes, caption, url)."""
    images = [_image(start + i) for i in range(rows)]
    if broken is not None:
        images[broken] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    caps = [f"a photo of the {WORDS[(start + i) % 4]} number {start + i}" for i in range(rows)]
    urls = [f"https://example.org/{start + i:09d}.jpg" for i in range(rows)]
    table = pa.table({"key": [f"{start + i:09d}" for i in range(rows)], "jpg": images, "caption": caps, "url": urls,
                      "width": [44] * rows, "height": [30 + (start + i) % 7 for i in range(rows)]})  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group)
    return {i: (images[i], caps[i], urls[i]) for i in range(rows)}


def test_scan_finds_what_pyarrow_reads(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write_parquet(path, 0, 20)
    scan = scan_table(str(path), Columns())
    assert scan.error is None and not scan.skipped and scan.kind == "parquet"
    theirs = pq.read_table(path).to_pylist()
    assert [m.key for m in scan.members] == [str(i) for i in range(20)]
    for m, row in zip(scan.members, theirs, strict=True):
        assert m.field == "jpg" and m.size == len(row["jpg"]) and m.text == row["caption"]
        assert m.meta == {"key": row["key"], "url": row["url"], "width": 44, "height": row["height"]}
        # row m.offset read again, across row groups of 7, in any order
        assert read_source(str(path), m.offset, m.size, m.field) == row["jpg"]
    assert read_source(str(path), 3, -1, "jpg") == theirs[3]["jpg"]
    with pytest.raises(OSError, match="cannot be read"):
        read_source(str(path), 20, -1, "jpg")


def test_index_search_serve_and_rerun_parquet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_parquet(tmp_path / "data" / "a.parquet", 0, 12, broken=5)
    b = write_parquet(tmp_path / "data" / "b.parquet", 12, 9)
    idx = tmp_path / "idx"
    code = main(["index", str(tmp_path / "data" / "*.parquet"), "--index", str(idx), *TINY, "--json",
                 "--image-column", "jpg", "--caption-column", "caption", "--workers", "2"])  # fmt: skip
    first = json.loads(capsys.readouterr().out)
    assert code == 0 and (first["new"], first["encoded"], first["failed_total"]) == (20, 20, 1)
    assert first["failures"][0]["path"].endswith("a.parquet#5")
    written = {f"{tmp_path / 'data' / 'a.parquet'}#{i}": v for i, v in a.items() if i != 5}
    written |= {f"{tmp_path / 'data' / 'b.parquet'}#{i}": v for i, v in b.items()}

    with Index.open(idx, device="cpu") as ix:
        assert_consistent(ix)
        rows = ix.store.file_rows()
        assert set(rows) == set(written) and ix.manifest["columns"] == {"image": "jpg", "caption": "caption"}
        files = tmp_path / "files"  # the same bytes as files give the same embeddings
        files.mkdir()
        for n, (_, (data, _, _)) in enumerate(sorted(written.items())):
            (files / f"{n:03d}.img").with_suffix(".jpg" if data[:2] == b"\xff\xd8" else ".png").write_bytes(data)
        with open_tiny(tmp_path / "idx-files") as fx:
            fx.update([files], workers=0)
            by_n = {int(Path(p).stem): r.id for p, r in fx.store.file_rows().items()}
            theirs = fx.store.embeddings([by_n[n] for n in range(len(written))], fx.dim)
        ours = ix.store.embeddings([rows[i].id for i in sorted(written)], ix.dim)
        assert np.abs(ours - theirs).max() == 0
        hits = search_index(ix, text="a photo", n=50, rerank=False, match="snow").hits
        assert {h.path for h in hits} == {k for k, v in written.items() if "snow" in v[1]}
        assert len(search_index(ix, text="a photo of the city", n=5).hits) == 5  # reranked from cached tokens
        some = sorted(written)[-1]
        fid = rows[some].id

    assert main(["index", "--index", str(idx), "--json"]) == 0  # a rerun reads no table
    again = json.loads(capsys.readouterr().out)
    assert (again["encoded"], again["unchanged"], again["new"], again["removed"]) == (0, 20, 0, 0)
    assert again["timings"]["scan"] < first["timings"]["scan"] + 1

    from fastapi.testclient import TestClient

    from cocatk.server.app import ServeSettings, create_app

    with TestClient(create_app(ServeSettings(index_dir=idx, device="cpu"))) as c:
        r = c.get(f"/api/image/{fid}")
        assert r.status_code == 200 and r.content == written[some][0]
        assert c.get(f"/api/thumb/{fid}").status_code == 200
        meta = c.post("/metadata", json={"ids": [fid]}).json()[0]["metadata"]
        assert meta["caption"] == written[some][1] and meta["source_url"] == written[some][2]
        knn = c.post("/knn-service", json={"text": "a photo", "indice_name": "cocatk", "num_images": 3}).json()
        assert len(knn) == 3 and all(row["caption"] == written[row["image_path"]][1] for row in knn)


def test_a_changed_table_is_read_again_and_a_damaged_one_is_one_failure(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    write_parquet(path, 0, 10)
    with open_tiny(tmp_path / "idx") as ix:
        assert ix.update([path], workers=0).new == 10
        write_parquet(path, 0, 12)  # two rows appended: the rest is unchanged
        report = ix.update([path], workers=0)
        assert (report.new, report.encoded, report.unchanged) == (2, 2, 10)
        path.write_bytes(path.read_bytes()[:-40])  # the footer cut off
        report = ix.update([path], workers=0)
        assert report.failed == {"truncated": 1} and report.removed == 12  # nothing of it can be read now
        assert_consistent(ix)


def test_an_interrupted_run_resumes_with_each_row_exactly_once(tmp_path: Path) -> None:
    from tests.test_webdataset import assert_resumes_each_item_once

    for s in range(3):
        write_parquet(tmp_path / f"{s}.parquet", s * 10, 10, row_group=4)
    tables = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    assert_resumes_each_item_once(tmp_path / "idx", tables, 30, stop_at=12)


def test_wrong_columns_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_parquet(tmp_path / "a.parquet", 0, 3)
    for flag, col, fix in (("--image-column", "image", "--image-column"), ("--image-column", "caption", "encoded"),
                           ("--caption-column", "width", "--caption-column")):  # fmt: skip
        code = main(["index", str(tmp_path / "a.parquet"), "--index", str(tmp_path / "i"), *TINY, flag, col])
        err = capsys.readouterr().err
        assert code == 2 and "columns: key, jpg, caption" in err and fix in err and err.count("\n") == 1
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "none.parquet")
    code = main(["index", str(tmp_path / "none.parquet"), "--index", str(tmp_path / "j"), *TINY])
    err = capsys.readouterr().err
    assert code != 0 and "no column of image bytes" in err and "--image-column" in err


def _hf_dataset(n: int) -> tuple[object, list[bytes]]:
    datasets = pytest.importorskip("datasets")
    images = [_image(100 + i) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.Value("int64")})  # fmt: skip
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "text": [f"{WORDS[i % 4]} {i}" for i in range(n)],
         "label": list(range(n))}, features=features)  # fmt: skip
    return ds, images


def test_hf_save_to_disk_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = pytest.importorskip("datasets")
    ds, images = _hf_dataset(9)
    datasets.DatasetDict({"train": ds.select(range(6)), "test": ds.select(range(6, 9))}).save_to_disk(tmp_path / "hf")
    idx = tmp_path / "idx"
    assert main(["index", f"hf:{tmp_path / 'hf'}", "--index", str(idx), *TINY, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new"] == 9 and out["failed_total"] == 0
    with Index.open(idx, device="cpu") as ix:
        rows = ix.store.file_rows()
        theirs = datasets.load_from_disk(str(tmp_path / "hf")).cast_column("image", datasets.Image(decode=False))
        want = {}
        for split in ("train", "test"):
            for f in theirs[split].cache_files:
                for i, row in enumerate(theirs[split]):
                    want[f"{Path(f['filename']).resolve()}#{i}"] = (row["image"]["bytes"], row["text"])
        assert set(rows) == set(want)
        for ident, src in zip(rows, ix.item_sources([r.id for r in rows.values()]), strict=True):
            from cocatk.sources import source_bytes

            assert source_bytes(src) == want[ident][0]
        hits = search_index(ix, text="x", n=20, rerank=False, match="forest").hits
        assert sorted(h.path for h in hits) == sorted(k for k, v in want.items() if v[1].startswith("forest"))
        assert sorted(ix.item_meta([r.id for r in rows.values()]).values(), key=lambda m: m["label"]) == [
            {"label": i} for i in range(9)
        ]


def test_hf_name_from_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    write_parquet(tmp_path / "repo" / "data" / "train-00000.parquet", 0, 5)
    # a dataset folder that datasets loads by name (as a hub dataset in the cache is), converted into its cache
    assert main(["index", f"hf:{tmp_path / 'repo'}", "--index", str(tmp_path / "idx"), *TINY, "--json",
                 "--image-column", "jpg"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["new"] == 5 and all(str(tmp_path / "cache") in r for r in out["roots"])
    code = main(["index", "hf:no-such/dataset-anywhere", "--index", str(tmp_path / "j"), *TINY])
    err = capsys.readouterr().err
    assert code != 0 and "neither a folder written by save_to_disk nor a dataset in the local" in err
    assert "cocatk never downloads" in err and err.count("\n") == 1
