"""`cocatk index` and `cocatk info` through the real CLI entry point (in-process, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cocatk.cli import main
from tests.conftest import TINY_CONFIG
from tests.test_index import make_images

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]


def test_index_json_then_incremental_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 6)
    (photos / "broken.jpg").write_text("nope")
    idx = str(tmp_path / "idx")
    assert main(["index", str(photos), "--index", idx, *TINY, "--json", "--workers", "2"]) == 0
    cap = capsys.readouterr()
    first = json.loads(cap.out)
    assert (first["new"], first["encoded"], first["failed"], first["total"]) == (6, 6, {"not an image": 1}, 6)
    assert "skipped" in cap.err and "broken.jpg" in cap.err  # per-file failures go to stderr, never stdout
    assert first["images_per_s"] > 0 and first["seconds"] > 0

    make_images(photos, 2, seed=5, prefix="more")
    assert main(["index", "--index", idx, "--json"]) == 0  # stored roots, the manifest's model
    second = json.loads(capsys.readouterr().out)
    assert (second["new"], second["unchanged"], second["encoded"], second["total"]) == (2, 6, 2, 8)

    assert main(["index", str(photos), "--index", idx, *TINY]) == 0
    text = capsys.readouterr().out
    assert "8 images indexed" in text and "unchanged 8" in text and "images/s" in text

    assert main(["info", "--index", idx, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] == 8 and info["roots"] == [str(photos)] and info["manifest"]["embed_dim"] == 64
    assert info["failed"] == {"not an image": 1} and info["size_bytes"] > 0
    assert main(["info", "--index", idx]) == 0
    text = capsys.readouterr().out
    assert "8 files" in text and "coca_tiny" in text and "Flat" in text


def test_cli_errors_are_one_line_with_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 2)
    idx = str(tmp_path / "idx")
    assert main(["info", "--index", idx]) == 1
    assert "no index at" in capsys.readouterr().err
    assert main(["index", str(photos), "--index", idx, *TINY, "--json"]) == 0
    capsys.readouterr()
    assert main(["index", str(photos), "--index", idx, "--model", "coca-b32", "--pretrained", "none"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "--rebuild" in err and "Fix:" in err
    assert main(["index", str(tmp_path / "missing"), "--index", idx]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["index", str(photos), "--index", idx, "--faiss", "IVF1024,PQ8", "--json"]) == 2
    assert "needs at least 1024" in capsys.readouterr().err


def test_cli_index_module_imports_no_heavy_libraries() -> None:
    code = (
        "import sys, cocatk.cli.app, cocatk.cli.index; "
        "heavy = [m for m in ('torch', 'faiss', 'PIL', 'open_clip', 'numpy.linalg') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert [m for m in ("torch", "faiss", "PIL", "open_clip") if m in out] == []


def test_missing_path_creates_no_index(tmp_path, capsys):
    from cocatk.cli import main

    code = main(["index", str(tmp_path / "nope"), "--index", str(tmp_path / "idx"), "--pretrained", "none"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


def test_check_passes_then_lists_a_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cocatk check` is Index.check() on the command line: 0 when consistent, 1 with each problem listed."""
    import sqlite3

    photos = tmp_path / "photos"
    make_images(photos, 4)
    idx = str(tmp_path / "idx")
    assert main(["index", str(photos), "--index", idx, *TINY]) == 0
    capsys.readouterr()
    assert main(["check", "--index", idx, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["problems"] == [] and report["files"] == report["vectors"] == 4
    assert main(["check", "--index", idx]) == 0
    assert "consistent (4 files, 4 vectors" in capsys.readouterr().out
    # A caption for a row that no longer exists (what an interrupted writer must never leave behind).
    with sqlite3.connect(Path(idx) / "index.sqlite") as conn:
        conn.execute("INSERT INTO caption_configs (key, settings, created_at) VALUES ('k', '{}', 0)")
        conn.execute("INSERT INTO captions (id, config, hash, text, logprob, at) VALUES (999, 'k', 'h', 't', 0, 0)")
    assert main(["check", "--index", idx]) == 1
    got = capsys.readouterr()
    assert "1 captioned ids without a file, e.g. 999" in got.err and "Traceback" not in got.err
    assert main(["check", "--index", idx, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems"] == ["1 captioned ids without a file, e.g. 999"]
    assert main(["check", "--index", str(tmp_path / "none")]) == 1
    assert "no index at" in capsys.readouterr().err
