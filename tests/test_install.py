"""Install extras: FAISS is an extra, a missing one is a one-line error, and no CPU install names a CUDA package."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cocatk.cli import main
from cocatk.errors import CocatkError, MissingDependencyError
from cocatk.retrieval.vectors import VectorIndex
from tests.conftest import TINY_CONFIG
from tests.test_index import make_images

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: Distribution names that bring CUDA libraries (or are GPU builds that do).
CUDA_NAME = re.compile(r"nvidia|cuda|cuvs|cupy|gpu|triton|tensorrt", re.IGNORECASE)


@pytest.fixture
def no_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    """`import faiss` raises ImportError, as in an install without the cpu or cuda12 extra."""
    monkeypatch.setitem(sys.modules, "faiss", None)


def test_missing_faiss_is_a_typed_error_naming_the_extras(no_faiss: None) -> None:
    with pytest.raises(MissingDependencyError) as exc:
        VectorIndex.create(8)
    err = exc.value
    assert isinstance(err, CocatkError) and err.exit_code == 1
    line = err.one_line()
    assert "\n" not in line and "FAISS is not installed" in line
    assert "cocatk[cpu]" in line and "cocatk[cuda12]" in line


def test_index_built_before_faiss_went_missing_fails_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    vi = VectorIndex.build(4, "Flat", np.arange(3), np.eye(3, 4, dtype=np.float32))
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingDependencyError, match=r"cocatk\[cpu\]"):
        vi.search(np.eye(1, 4, dtype=np.float32), 2)
    with pytest.raises(MissingDependencyError):
        vi.ids()


def test_cli_without_faiss_exits_1_with_one_line(
    tmp_path: Path, no_faiss: None, capsys: pytest.CaptureFixture[str]
) -> None:
    photos = tmp_path / "photos"
    make_images(photos, 2)
    assert main(["index", str(photos), "--index", str(tmp_path / "idx"), *TINY]) == 1
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.splitlines() if ln.strip()]
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error:") and "FAISS is not installed" in lines[0]
    assert "Fix:" in lines[0] and "cocatk[cpu]" in lines[0]


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0] for r in requirements]


def test_no_cpu_install_names_a_cuda_package() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    for group, reqs in [("dependencies", project["dependencies"]), ("cpu", extras["cpu"]), ("dev", extras["dev"])]:
        bad = [n for n in _names(reqs) if CUDA_NAME.search(n)]
        assert not bad, f"{group} names CUDA/GPU packages: {bad}"
    assert not any(n.startswith("faiss") for n in _names(project["dependencies"])), "faiss belongs in the extras"
    assert _names(extras["cpu"]) == ["faiss-cpu"]
    # the GPU extra names Meta's GPU build (it falls back to faiss-cpu where no GPU wheel exists)
    assert "faiss-gpu" in _names(extras["cuda12"])
