"""The CLI shell: fast help, version, models, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cocatk import __version__
from cocatk.cli import main


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from cocatk.cli import main\n"
        "rc = main(['--help'])\n"
        "heavy = [m for m in ('torch', 'open_clip', 'faiss', 'datasets', 'numpy', 'transformers')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy, rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY [] 0" in out
    assert "models" in out


def test_every_command_help_is_light():
    import typer.main

    from cocatk.cli.app import app

    names = list(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    code = (
        "import sys\nfrom cocatk.cli import main\n"
        + "".join(f"main([{n!r}, '--help'])\n" for n in names)
        + "print('HEAVY', [m for m in ('torch', 'open_clip', 'faiss', 'datasets', 'transformers')"
        " if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cocatk {__version__}"


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "cocatk", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["coca-l14"]["arch"] == "coca_ViT-L-14"
    assert by_name["coca-l14"]["pretrained"] == "laion2b_s13b_b90k"
    assert by_name["coca-l14"]["embed_dim"] == 768 and by_name["coca-b32"]["embed_dim"] == 512
    assert by_name["coca-l14-coco"]["pretrained"] == "mscoco_finetuned_laion2b_s13b_b90k"
    assert by_name["coca-b32"]["cached"] is False  # the test hub cache is empty


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
    # typer turns KeyboardInterrupt into a silent Exit(130); the user must still be told what happened.
    import cocatk.models

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cocatk.models, "list_presets", interrupted)
    assert main(["models"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run the same command again" in err and len(err.strip().splitlines()) == 1


def test_models_table(capsys):
    assert main(["models"]) == 0
    assert "coca-l14" in capsys.readouterr().out


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert "Traceback" not in captured.err
    text = " ".join(lines)
    assert text.startswith("error:") and "Fix:" in text
    return text


def test_unknown_model_is_one_line_usage_error(capsys):
    assert main(["models", "--download", "coca-huge"]) == 2
    text = _one_line_error(capsys)
    assert "unknown model 'coca-huge'" in text and "coca-l14" in text


def test_missing_weights_offline_is_one_line(capsys):
    assert main(["models", "--download", "coca-b32"]) == 1
    text = _one_line_error(capsys)
    assert "--pretrained" in text and "open_clip_pytorch_model.bin" in text


def test_debug_shows_traceback(capsys, monkeypatch):
    monkeypatch.setenv("COCATK_DEBUG", "1")
    assert main(["models", "--download", "coca-huge"]) == 2
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["nonsense-command"], ["models", "--no-such-flag"]])
def test_bad_usage_exits_2(args, capsys):
    assert main(args) == 2
