"""A new user's first hour (issue 13): odd file names end to end, no index stub without weights, the writer lock
before any model, deleted files in every search mode, forget/compact, and one-line errors for bad input."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocatk.cli import main
from cocatk.retrieval import Index
from cocatk.retrieval.store import MIGRATIONS, SCHEMA_VERSION, Store
from tests.conftest import TINY_CONFIG
from tests.test_index import make_images

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]

#: Names a filesystem holds that broke or could break a tool: Latin-1 bytes, a newline, Rich markup, 255 bytes.
ODD = {
    "latin1": os.fsdecode(b"fleur_caf\xe9.jpg"),
    "newline": "line\nbreak.png",
    "markup": "[bold red]x.jpg",
    "long": "a" * 251 + ".png",
    "plain": "plain.jpg",
}
BROKEN = os.fsdecode(b"broken_\xff.jpg")


def _odd_folder(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    out = {}
    for key, name in ODD.items():
        path = folder / name
        Image.fromarray((rng.random((30, 30, 3)) * 255).astype(np.uint8)).save(
            path, format="PNG" if name.endswith(".png") else "JPEG"
        )
        out[key] = path
    (folder / BROKEN).write_bytes(b"not an image at all")
    return out


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture
def odd_index(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    files = _odd_folder(tmp_path / "photos")
    idx = tmp_path / "idx"
    with Index.open(idx, model=str(TINY_CONFIG), pretrained="none", device="cpu", create=True) as ix:
        report = ix.update([tmp_path / "photos"], workers=2)
    assert (report.new, report.total, report.failed) == (5, 5, {"not an image": 1})
    return idx, files


def test_odd_names_in_index_output(tmp_path: Path, capsys) -> None:
    _odd_folder(tmp_path / "photos")
    code, out, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), *TINY, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["new"], report["total"], report["failed"]) == (5, 5, {"not an image": 1})
    (failure,) = report["failures"]
    assert base64.b64decode(failure["path_b64"]) == os.fsencode(tmp_path / "photos" / BROKEN)
    assert "\ufffd" in failure["path"]
    # The broken name is listed on stderr readably, never as a traceback.
    assert "broken_\ufffd.jpg" in err and "Traceback" not in err


def test_odd_names_are_indexed_and_printed_exactly(odd_index, capsysbinary) -> None:
    idx, files = odd_index
    code = main(["search", "a photo", "--index", str(idx), "-n", "10", "--no-rerank", "--paths"])
    raw = capsysbinary.readouterr().out
    assert code == 0
    # --paths: the exact bytes, one per line; the newline name is the one that cannot survive this format.
    lines = set(raw.split(b"\n"))
    for key, path in files.items():
        if key != "newline":
            assert os.fsencode(path) in lines
    code = main(["search", "a photo", "--index", str(idx), "-n", "10", "--no-rerank", "-0"])
    raw = capsysbinary.readouterr().out
    assert code == 0 and raw.endswith(b"\0")
    assert sorted(raw[:-1].split(b"\0")) == sorted(os.fsencode(p) for p in files.values())


def test_odd_names_in_json_table_and_info(odd_index, capsys, monkeypatch) -> None:
    from cocatk.cli import render

    idx, files = odd_index
    code, out, _ = _run(capsys, "search", "a photo", "--index", str(idx), "-n", "10", "--json", "--rerank-k", "5")
    assert code == 0
    hits = json.loads(out)["hits"]
    assert len(hits) == 5
    by_bytes = {
        base64.b64decode(h["path_b64"]) if "path_b64" in h else h["path"].encode(): h for h in hits
    }  # path_b64 appears only for names that are not UTF-8
    assert set(by_bytes) == {os.fsencode(p) for p in files.values()}
    assert [h for h in hits if "path_b64" in h] == [by_bytes[os.fsencode(files["latin1"])]]

    code, out, _ = _run(capsys, "search", "a photo", "--index", str(idx), "-n", "10", "--no-rerank")
    assert code == 0  # piped: TSV, one whole line per hit, the names readable
    names = {line.split("\t")[1].rsplit("/", 1)[1] for line in out.splitlines()[1:]}
    assert names == {"fleur_caf\ufffd.jpg", "line\\nbreak.png", "[bold red]x.jpg", "a" * 251 + ".png", "plain.jpg"}
    monkeypatch.setattr(render, "out", render.Console(force_terminal=True, width=2000, soft_wrap=True))
    code, out, _ = _run(capsys, "search", "a photo", "--index", str(idx), "-n", "10", "--no-rerank")
    assert code == 0 and "┃" in out  # a terminal: the Rich table, markup-like names shown literally
    assert "fleur_caf\ufffd.jpg" in out and "line\\nbreak.png" in out and "[bold red]x.jpg" in out

    code, out, _ = _run(capsys, "info", "--index", str(idx))
    assert code == 0 and "broken_\ufffd.jpg: not an image" in out and "5 files" in out
    code, out, _ = _run(capsys, "info", "--index", str(idx), "--json")
    info = json.loads(out)
    assert base64.b64decode(info["failures"][0]["path_b64"]).endswith(b"broken_\xff.jpg")


def test_missing_weights_leave_nothing_on_disk(tmp_path: Path, capsys) -> None:
    make_images(tmp_path / "photos", 2)
    idx = tmp_path / "idx"
    code, _, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(idx), "--model", "coca-b32")
    assert code == 1
    assert err.count("\n") == 1 and "--model demo" in err and "Fix:" in err
    assert not idx.exists()


def test_stub_index_reads_as_empty_without_loading_a_model(tmp_path: Path, capsys, monkeypatch) -> None:
    idx = tmp_path / "idx"
    idx.mkdir()
    Store.open(idx, create=True).close()  # what an interrupted first run of an older cocatk left behind

    def no_model(*a, **k):
        raise AssertionError("no model may be loaded for an empty index")

    monkeypatch.setattr("cocatk.models.load_model", no_model)
    code, out, _ = _run(capsys, "info", "--index", str(idx))
    assert code == 0 and "empty" in out
    code, _, err = _run(capsys, "search", "a dog", "--index", str(idx))
    assert code == 1 and "holds no images" in err


def test_busy_index_is_refused_before_any_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    make_images(tmp_path / "photos", 2)
    idx = tmp_path / "idx"
    assert main(["index", str(tmp_path / "photos"), "--index", str(idx), *TINY, "--json"]) == 0
    capsys.readouterr()
    holder = Index.open(idx, lock=True)
    try:
        monkeypatch.setattr("cocatk.models.load_model", lambda *a, **k: pytest.fail("model loaded while busy"))
        t0 = time.monotonic()
        code, _, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(idx), *TINY)
        assert code == 1 and "busy" in err and time.monotonic() - t0 < 5
    finally:
        holder.close()


def test_progress_reports_every_stage(tmp_path: Path) -> None:
    make_images(tmp_path / "photos", 5)
    seen: list[tuple[str, int, int | None]] = []
    ix = Index.open(
        tmp_path / "idx",
        model=str(TINY_CONFIG),
        pretrained="none",
        device="cpu",
        create=True,
        progress=lambda *a: seen.append(a),
    )
    with ix:
        ix.update([tmp_path / "photos"], progress=lambda *a: seen.append(a), workers=0)
    stages = [s for s, _, _ in seen]
    assert stages[0] == "model" and ("model", 1, 1) in seen
    assert ("scan", 5, 5) in seen  # the scan row ends with its count, not frozen at "n/?"
    assert stages.index("scan") < stages.index("index") and seen[-1] == ("index", 5, 5)


def test_deleted_files_are_dropped_in_every_mode(tmp_path: Path, capsys) -> None:
    files = make_images(tmp_path / "photos", 8)
    idx = tmp_path / "idx"
    assert main(["index", str(tmp_path / "photos"), "--index", str(idx), *TINY, "--json"]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, "search", "a dog", "--index", str(idx), "-n", "3", "--no-rerank", "--json")
    top = json.loads(out)["hits"][0]["path"]
    Path(top).unlink()
    image_query = next(str(p) for p in files if str(p) != top)
    # The image query asks for every remaining file, so the deleted one is met whatever its rank.
    for extra, n in ((["a dog", "--no-rerank"], 3), (["a dog", "--rerank-k", "4"], 3), (["--image", image_query], 7)):
        code, out, err = _run(capsys, "search", *extra, "--index", str(idx), "-n", str(n), "--json")
        result = json.loads(out)
        paths = [h["path"] for h in result["hits"]]
        assert code == 0 and top not in paths and len(paths) == n, extra
        assert all(Path(p).exists() for p in paths)
        assert {"path": top, "reason": "file is gone"} in result["dropped"], extra
        assert "skipped" in err and "cocatk index" in err


def test_bad_query_input_gives_one_line(tmp_path: Path, capsys) -> None:
    make_images(tmp_path / "photos" / "a", 3)
    (tmp_path / "photos" / "empty").mkdir()
    idx = tmp_path / "idx"
    assert main(["index", str(tmp_path / "photos"), "--index", str(idx), *TINY, "--json"]) == 0
    capsys.readouterr()
    code, out, err = _run(capsys, "search", "--image", str(tmp_path / "missing.jpg"), "--index", str(idx))
    assert code == 2 and "does not exist" in err and "remove it from the folder" not in err and out == ""
    code, out, err = _run(capsys, "search", "a dog", "--index", str(idx), "--under", str(tmp_path / "photos/empty"))
    assert code == 1 and "no indexed images under" in err and out == ""

    code, out, err = _run(capsys, "classify", str(tmp_path / "missing.jpg"), "--labels", "cat,dog", *TINY)
    assert code == 2 and "no such image file" in err and out == "" and "Traceback" not in err
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    code, out, err = _run(capsys, "classify", str(tmp_path / "bad.jpg"), "--labels", "cat,dog", *TINY)
    assert code == 1 and "none of the 1 image(s) could be decoded" in err and out == ""


def test_demo_model_results_carry_a_warning(tmp_path: Path, capsys, monkeypatch) -> None:
    from cocatk.cli import render

    make_images(tmp_path / "photos", 3)
    idx = tmp_path / "idx"
    assert main(["index", str(tmp_path / "photos"), "--index", str(idx), "--model", "demo", "--device", "cpu"]) == 0
    capsys.readouterr()
    code, out, _ = _run(capsys, "search", "a red circle", "--index", str(idx), "-n", "2", "--json")
    assert code == 0 and any("demo model" in w for w in json.loads(out)["warnings"])
    code, out, err = _run(capsys, "search", "a red circle", "--index", str(idx), "-n", "2")
    assert code == 0 and "warning: the demo model knows only synthetic" in err  # piped: footer on stderr
    monkeypatch.setattr(render, "out", render.Console(force_terminal=True, width=300, soft_wrap=True))
    code, out, _ = _run(capsys, "search", "a red circle", "--index", str(idx), "-n", "2")
    assert code == 0 and "warning: the demo model knows only synthetic" in out  # in the table footer


def test_forget_a_root_then_compact(tmp_path: Path, capsys) -> None:
    make_images(tmp_path / "keep", 4)
    make_images(tmp_path / "old", 5, seed=9)
    (tmp_path / "old" / "bad.jpg").write_text("x")
    idx = tmp_path / "idx"
    args = ["index", str(tmp_path / "keep"), str(tmp_path / "old"), "--index", str(idx), *TINY, "--json"]
    assert main(args) == 0
    capsys.readouterr()
    code, _, err = _run(capsys, "forget", str(tmp_path / "nope"), "--index", str(idx))
    assert code == 2 and "is not a root" in err and "keep" in err

    code, out, _ = _run(capsys, "forget", str(tmp_path / "old"), "--index", str(idx), "--json")
    assert code == 0 and json.loads(out)["files"] == 5
    assert (tmp_path / "old" / "im000.jpg").exists()  # nothing on disk is touched
    with Index.open(idx) as ix:
        assert ix.check().ok and ix.ntotal == 4 and ix.store.roots() == [str(tmp_path / "keep")]
        assert ix.store.failures() == []
    code, out, _ = _run(capsys, "compact", "--index", str(idx), "--json")
    result = json.loads(out)
    assert code == 0 and result["after_bytes"] <= result["before_bytes"]
    assert sorted(p.name for p in idx.glob("vectors.*")) == [f"vectors.{Store.open(idx).generation}.faiss"]
    with Index.open(idx) as ix:
        assert ix.check().ok and ix.ntotal == 4
    # The next run re-scans the remaining root only.
    code, out, _ = _run(capsys, "index", "--index", str(idx), "--json")
    assert code == 0 and json.loads(out)["total"] == 4


def test_migration_2_turns_text_paths_into_bytes_and_keeps_everything(tmp_path: Path) -> None:
    db = tmp_path / "index.sqlite"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
    emb = np.ones(4, "<f4").tobytes()
    for i, name in enumerate(["/p/a.jpg", "/p/é.jpg", "/p/gone.jpg"], start=1):
        conn.execute("INSERT INTO files VALUES (?, ?, 1, 2, 'h', ?, 0)", (i, name, emb))
    conn.execute("INSERT INTO tokens VALUES (2, x'0000')")
    conn.execute("DELETE FROM files WHERE id = 3")  # the AUTOINCREMENT counter stays at 3
    conn.execute("INSERT INTO roots VALUES ('/p', 0)")
    conn.execute("INSERT INTO failures VALUES ('/p/bad.jpg', 'truncated', '', 1, 2, 0)")
    conn.close()

    store = Store.open(tmp_path)
    assert store.schema_version == SCHEMA_VERSION == 5  # 2, 3 (captions), 4 (dataset sources), 5 (tags) applied
    assert {p: r.id for p, r in store.file_rows().items()} == {"/p/a.jpg": 1, "/p/é.jpg": 2}
    assert store.token_ids() == {2} and store.roots() == ["/p"] and list(store.failure_rows()) == ["/p/bad.jpg"]
    types = store.conn.execute("SELECT DISTINCT typeof(path) FROM files").fetchall()
    assert types == [("blob",)]
    store.begin()
    new_id = store.insert_file(os.fsdecode(b"/p/caf\xe9.jpg"), 1, 2, "h2", np.ones(4, np.float32))
    store.commit()
    assert new_id == 4  # ids are never reused
    assert store.paths_for_ids([4]) == [os.fsdecode(b"/p/caf\xe9.jpg")]
    assert store.ids_under("/p").tolist() == [1, 2, 4] and store.ids_under("/p/a.jpg").tolist() == [1]
    store.close()


def test_shell_completion_is_offered(capsys) -> None:
    assert main(["--help"]) == 0
    assert "--install-completion" in capsys.readouterr().out


def test_progress_display_survives_every_stage_sequence() -> None:
    """The terminal bar (not used when stderr is a pipe, so drive it on a forced terminal)."""
    import io

    from rich.console import Console

    from cocatk.cli.progress import _Bar

    buf = io.StringIO()
    bar = _Bar(console=Console(file=buf, force_terminal=True, width=120))
    with bar.progress:
        for call in [
            ("start", 0, None),
            ("model", 0, None),
            ("model", 1, 1),
            ("scan", 0, None),
            ("scan", 1000, None),
            ("scan", 1500, 1500),
            ("index", 0, 1500),
            ("index", 16, 1500),
            ("index", 1500, 1500),
            ("index", 0, 3),  # a second pass starts over
            ("index", 3, 3),
        ]:
            bar(*call)
            bar.progress.refresh()
    text = buf.getvalue()
    assert "loading model" in text and "scanning" in text and "1000" in text and "1500/1500" in text
    assert "indexing" in text and "3/3" in text and "0/?" not in text


def test_an_internal_error_is_one_line(monkeypatch, capsys) -> None:
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("cocatk.models.list_presets", boom)
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error (RuntimeError: boom)" in err and "COCATK_DEBUG=1" in err
