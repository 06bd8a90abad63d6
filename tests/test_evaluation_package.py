"""The evaluation package's surface: light to import, no demo dependency, the documented old names still resolve."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cocatk

# The subprocess imports this checkout's cocatk, whatever else is installed.
_ROOT = str(Path(cocatk.__file__).resolve().parents[1])


def _imported_after(statement: str) -> list[str]:
    code = (
        "import sys\n"
        f"{statement}\n"
        "import json\n"
        "tops = ('cocatk', 'torch', 'open_clip', 'datasets')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in tops)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_evaluation_loads_neither_the_demo_nor_heavy_modules():
    mods = _imported_after("import cocatk.evaluation")
    assert "cocatk.evaluation" in mods
    assert not [m for m in mods if m.startswith("cocatk.demo")], mods
    assert not [m for m in mods if m.split(".")[0] in ("torch", "open_clip", "datasets")], mods


def test_evaluation_modules_do_not_import_the_demo():
    # Every evaluation module loaded, still no demo package: only the deprecated accessor reaches it.
    mods = _imported_after(
        "import cocatk.evaluation.retrieval, cocatk.evaluation.zeroshot, cocatk.evaluation.captioned, "
        "cocatk.evaluation.labelled, cocatk.evaluation.data"
    )
    assert not [m for m in mods if m.startswith("cocatk.demo")], mods


def test_zeroshot_package_does_not_import_evaluation():
    # One direction only: cocatk.evaluation uses cocatk.zeroshot, whose re-exports load on first access.
    mods = _imported_after("import cocatk.zeroshot")
    assert not [m for m in mods if m.startswith("cocatk.evaluation")], mods


def test_write_captioned_folder_moved_to_the_demo_with_a_message_that_names_it(tmp_path):
    """The deprecated spelling is gone (the evaluation never imports the demo); the error says where it went."""
    import cocatk.demo.scenes
    import cocatk.evaluation

    with pytest.raises(AttributeError, match=r"from cocatk\.demo\.scenes import write_captioned_folder"):
        cocatk.evaluation.write_captioned_folder  # noqa: B018
    with pytest.raises(ImportError):
        from cocatk.evaluation import write_captioned_folder  # noqa: F401
    path = cocatk.demo.scenes.write_captioned_folder(tmp_path / "shapes", n=3, seed=2)
    captions = json.loads(path.read_text())
    assert sorted(captions) == ["scene_000.png", "scene_001.png", "scene_002.png"]
    assert all(len(c) == 2 for c in captions.values())
    assert all((tmp_path / "shapes" / name).is_file() for name in captions)


def test_old_public_names_resolve():
    import cocatk.evaluation
    import cocatk.zeroshot
    from cocatk.evaluation import captioned, labelled, retrieval, zeroshot

    assert cocatk.evaluate_retrieval is retrieval.evaluate_retrieval
    assert cocatk.evaluate_zeroshot is zeroshot.evaluate_zeroshot
    assert cocatk.ZeroShotResult is zeroshot.ZeroShotResult
    assert cocatk.zeroshot.evaluate_zeroshot is zeroshot.evaluate_zeroshot
    assert cocatk.zeroshot.classify_images is zeroshot.classify_images
    assert cocatk.zeroshot.ZeroShotResult is zeroshot.ZeroShotResult
    assert cocatk.zeroshot.open_dataset is labelled.open_dataset
    assert cocatk.zeroshot.ZeroShotDataset is labelled.ZeroShotDataset
    assert cocatk.evaluation.open_captioned_dataset is captioned.open_captioned_dataset
    assert cocatk.evaluation.evaluate_retrieval is retrieval.evaluate_retrieval
    assert cocatk.evaluation.classify_images is zeroshot.classify_images
    for module in (cocatk, cocatk.evaluation, cocatk.zeroshot):
        assert set(module.__all__) <= set(dir(module))
        for name in module.__all__:
            assert getattr(module, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cocatk.evaluation.nope  # noqa: B018
