"""Shared fixtures. Tests never touch the network: the hub is forced offline before anything imports it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# huggingface_hub reads these at import time, so set them before any test module imports open_clip.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Tests use tiny models: one thread avoids OpenMP oversubscription stalls (10x slower decoder passes were measured
# on this 2-core machine with other processes busy) and changes no result.
os.environ.setdefault("OMP_NUM_THREADS", "1")
for _var in ("COCATK_MODEL", "COCATK_PRETRAINED", "COCATK_DEVICE", "COCATK_INDEX", "COCATK_DEBUG", "COCATK_BACKEND"):
    os.environ.pop(_var, None)

DATA = Path(__file__).parent / "data"
#: A 64-wide, 2-layer, 32 px CoCa (vocab and context of the real tokenizer): builds in a fraction of a second.
TINY_CONFIG = DATA / "coca_tiny.json"


def unshare_works() -> bool:
    """Whether this process can make a folder read-only for a child as root: a user and mount namespace
    (``unshare -rm``) in which a bind mount can be made (tests/test_read_only_index.py, tests/test_sidecars.py)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount --bind / /mnt 2>/dev/null || mount --bind /tmp /tmp"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own COCATK_HOME and cache, and an empty Hugging Face cache."""
    root = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("COCATK_HOME", str(root / "cocatk"))
    monkeypatch.setenv("COCATK_CACHE", str(root / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(root / "hf"))
    # No ONNX text tower export at the end of every index run (seconds each): tests/test_textonnx.py turns it on.
    monkeypatch.setenv("COCATK_TEXT_ONNX", "0")
    return root


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny random-weight CoCa on the CPU (seeded: identical in every process)."""
    from cocatk import load_model

    return load_model(str(TINY_CONFIG), pretrained="none", device="cpu")
