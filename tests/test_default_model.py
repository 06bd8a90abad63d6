"""The default model fits the machine (issue 27, item 4): coca-l14 with a CUDA GPU, coca-b32 without one; said once,
when a new index takes it; an existing index keeps its recorded model without the machine being consulted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cocatk import config
from cocatk.cli import main
from cocatk.errors import WeightsNotFoundError
from cocatk.retrieval import Index
from cocatk.retrieval.folder import _choice_device
from tests.conftest import TINY_CONFIG
from tests.test_index import make_images


def _cuda(monkeypatch: pytest.MonkeyPatch, available: bool) -> list[bool]:
    """Pretend the machine has (or lacks) a CUDA GPU; the returned list counts the detections."""
    calls: list[bool] = []

    def detect() -> bool:
        calls.append(available)
        return available

    monkeypatch.setattr(config, "cuda_available", detect)
    return calls


def _no_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    def detect() -> bool:
        raise AssertionError("the machine must not be consulted here")

    monkeypatch.setattr(config, "cuda_available", detect)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---- the choice -------------------------------------------------------------------------------------------------
def test_cuda_gpu_keeps_coca_l14(monkeypatch):
    calls = _cuda(monkeypatch, True)
    choice = config.default_model_choice()
    assert choice.name == "coca-l14" == config.default_model()
    assert choice.reason == "CUDA GPU found" and "--model coca-b32" in (choice.alternative or "")
    assert calls


def test_no_cuda_gpu_gives_coca_b32_with_the_reason_and_the_alternative(monkeypatch):
    _cuda(monkeypatch, False)
    choice = config.default_model_choice()
    assert choice.name == "coca-b32" == config.default_model()
    assert choice.reason is not None and choice.reason.startswith("no CUDA GPU: coca-l14 is ~8x slower")
    assert choice.alternative == "pass --model coca-l14 for the larger model"
    assert choice.describe() == f"model coca-b32 ({choice.reason}); pass --model coca-l14 for the larger model"
    name, reason, _ = choice  # a plain tuple too
    assert (name, reason) == ("coca-b32", choice.reason)


def test_forced_device_decides_without_detection(monkeypatch):
    _no_detection(monkeypatch)
    assert config.default_model_choice("cpu").name == "coca-b32"  # the CPU forced on a GPU machine
    assert config.default_model_choice("cpu").reason.startswith("device cpu asked for: coca-l14 is ~8x slower")
    assert config.default_model_choice("cuda:1").name == "coca-l14"
    assert config.default_model_choice("mps").name == "coca-b32"
    monkeypatch.setenv("COCATK_DEVICE", "cpu")
    assert config.default_model() == "coca-b32"
    monkeypatch.setenv("COCATK_DEVICE", "cuda")
    assert config.default_model() == "coca-l14"


def test_cocatk_model_overrides_the_machine(monkeypatch):
    _no_detection(monkeypatch)
    monkeypatch.setenv("COCATK_MODEL", "coca-l14-coco")
    assert config.default_model_choice() == config.ModelChoice("coca-l14-coco", None, None)
    assert config.default_model_choice("cpu").name == "coca-l14-coco"
    assert config.default_model_choice().describe() == "model coca-l14-coco"


def test_resolve_model_default_follows_the_machine(monkeypatch):
    from cocatk.models import resolve_model

    _cuda(monkeypatch, False)
    assert resolve_model().preset == "coca-b32"
    _cuda(monkeypatch, True)
    assert resolve_model().preset == "coca-l14"
    assert resolve_model(device="cpu").preset == "coca-b32"
    assert resolve_model("coca-l14", device="cpu").preset == "coca-l14"  # a named model is never replaced


def test_ray_driver_device_does_not_pick_the_model():
    assert _choice_device(None, "cpu") == "cpu"
    assert _choice_device("auto", "cpu") is None  # --ray without --device: the actors' machine decides
    assert _choice_device("cuda", "cpu") == "cuda"


# ---- missing weights -----------------------------------------------------------------------------------------------
def test_missing_weights_name_the_preset_and_its_download(monkeypatch):
    from cocatk.models import load_model

    _cuda(monkeypatch, False)
    with pytest.raises(WeightsNotFoundError) as e:
        load_model(device="cpu")
    assert "weights for model coca-b32 (coca_ViT-B-32/laion2b_s13b_b90k)" in e.value.message
    assert "`cocatk models --download coca-b32`" in e.value.hint


# ---- indexes --------------------------------------------------------------------------------------------------------
def test_existing_index_keeps_its_model_without_consulting_the_machine(tmp_path: Path, monkeypatch, capsys):
    make_images(tmp_path / "photos", 3)
    idx = tmp_path / "idx"
    with Index.open(idx, model=str(TINY_CONFIG), pretrained="none", device="cpu", create=True) as ix:
        ix.update([str(tmp_path / "photos")])
    _no_detection(monkeypatch)
    monkeypatch.setattr(config, "default_model_choice", lambda *a, **k: pytest.fail("default consulted"))
    heard: list[config.ModelChoice] = []
    for kwargs in ({}, {"create": True, "lock": True}, {"create": True, "device": "cpu"}):
        with Index.open(idx, on_model_choice=heard.append, **kwargs) as ix:
            assert ix.manifest["model"] == str(TINY_CONFIG.resolve()) and ix.model_choice is None
    assert heard == []
    make_images(tmp_path / "photos", 1, seed=4, prefix="new")
    code, out, err = _run(capsys, "index", "--index", str(idx), "--json")  # no --model: the recorded one
    assert code == 0 and json.loads(out)["new"] == 1
    assert "note:" not in err


def test_new_index_says_once_which_model_and_why(tmp_path: Path, monkeypatch, capsys):
    """The note appears on the run that creates the index, not on the later runs that use its recorded model."""
    _cuda(monkeypatch, False)
    monkeypatch.setattr(config, "CPU_DEFAULT_MODEL", "demo")  # a default whose weights ship with cocatk
    make_images(tmp_path / "photos", 3)
    idx = tmp_path / "idx"
    code, out, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(idx), "--json")
    assert code == 0 and json.loads(out)["new"] == 3
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [
        "note: model demo (no CUDA GPU: coca-l14 is ~8x slower to encode on a CPU, 1.5 against 12 images/s measured "
        "on a 2-core Xeon); pass --model coca-l14 for the larger model"
    ]
    with Index.open(idx) as ix:
        assert ix.manifest["model"] == "demo"
    make_images(tmp_path / "photos", 1, seed=4, prefix="new")
    code, out, err = _run(capsys, "index", "--index", str(idx), "--json")
    assert code == 0 and json.loads(out)["new"] == 1 and "note:" not in err


def test_stub_folder_takes_the_machine_default_with_the_note(tmp_path: Path, monkeypatch, capsys):
    from cocatk.retrieval.store import Store

    _cuda(monkeypatch, False)
    monkeypatch.setattr(config, "CPU_DEFAULT_MODEL", "demo")
    make_images(tmp_path / "photos", 2)
    idx = tmp_path / "idx"
    idx.mkdir()
    Store.open(idx, create=True).close()  # an interrupted first run of an older cocatk: no manifest
    code, _, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(idx), "--json")
    assert code == 0 and err.count("note: model demo (no CUDA GPU: ") == 1
    with Index.open(idx) as ix:
        assert ix.manifest["model"] == "demo"


def test_library_reports_the_choice_and_never_prints(tmp_path: Path, monkeypatch, capsys):
    _cuda(monkeypatch, True)
    monkeypatch.setattr(config, "GPU_DEFAULT_MODEL", "demo")
    heard: list[config.ModelChoice] = []
    opened = Index.open(tmp_path / "idx", device="cpu", model_device="cuda", create=True, on_model_choice=heard.append)
    with opened as ix:
        assert ix.model_choice is not None and ix.model_choice.name == "demo" == ix.manifest["model"]
        assert ix.model_choice.reason == "device cuda asked for"
    assert heard == [ix.model_choice]
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == ""
    monkeypatch.setenv("COCATK_MODEL", "demo")  # the user's own choice: nothing to explain
    with Index.open(tmp_path / "idx2", device="cpu", create=True, on_model_choice=heard.append) as ix:
        assert ix.model_choice is None and ix.manifest["model"] == "demo"
    assert len(heard) == 1


def test_new_index_without_weights_notes_the_choice_then_names_the_download(tmp_path: Path, monkeypatch, capsys):
    _cuda(monkeypatch, False)
    make_images(tmp_path / "photos", 2)
    idx = tmp_path / "idx"
    code, _, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(idx))
    assert code == 1 and not idx.exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("note: model coca-b32 (no CUDA GPU: ")
    assert lines[0].endswith("pass --model coca-l14 for the larger model")
    assert lines[1].startswith("error: weights for model coca-b32 (coca_ViT-B-32/laion2b_s13b_b90k) are not in")
    assert "`cocatk models --download coca-b32`" in lines[1]


def test_forced_cpu_on_a_gpu_machine_gets_coca_b32(tmp_path: Path, monkeypatch, capsys):
    _no_detection(monkeypatch)
    make_images(tmp_path / "photos", 2)
    code, _, err = _run(capsys, "index", str(tmp_path / "photos"), "--index", str(tmp_path / "idx"), "--device", "cpu")
    assert code == 1
    assert "note: model coca-b32 (device cpu asked for: coca-l14 is ~8x slower" in err
    assert "cocatk models --download coca-b32" in err


# ---- help -----------------------------------------------------------------------------------------------------------
def test_index_help_states_the_default_without_torch():
    code = (
        "import sys\nfrom cocatk.cli import main\n"
        "main(['index', '--help'])\n"
        "print('HEAVY', [m for m in ('torch', 'open_clip') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "300"}
    ).stdout
    assert "HEAVY []" in out
    assert "coca-l14 with a CUDA GPU, else coca-b32" in " ".join(out.split())
