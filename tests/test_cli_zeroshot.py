"""`cocatk zeroshot` and `cocatk classify` end to end on generated data (tiny random CoCa, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG
from PIL import Image
from test_zeroshot import COLOURS, make_folder

from cocatk.cli import main

TINY = ["--model", str(TINY_CONFIG), "--pretrained", "none", "--device", "cpu"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "photos")


def run_json(capsys, args: list[str]) -> dict:
    capsys.readouterr()
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def check_record(rec: dict, n: int, num_classes: int) -> None:
    assert set(rec) >= {"model", "data", "templates", "metrics", "reference", "timings", "cocatk_version", "scorer"}
    m = rec["metrics"]
    assert m["n"] == n and set(m) >= {"top1", "mean_per_class_recall", "n"}
    for key in ("top1", "top5", "mean_per_class_recall"):
        if key in m:
            assert 0.0 <= m[key] <= 1.0
    assert rec["data"]["num_classes"] == num_classes
    assert rec["model"]["random_weights"] is True
    assert rec["timings"]["images_per_s"] > 0


def test_zeroshot_image_folder_table_json_and_output(folder, tmp_path, capsys):
    capsys.readouterr()
    assert main(["zeroshot", str(folder), *TINY, "--templates", "simple"]) == 0
    cap = capsys.readouterr()
    assert "top-1 %" in cap.out and "mean per-class recall %" in cap.out and "contrastive" in cap.out
    assert "random weights" in cap.err

    out_file = tmp_path / "res" / "r.json"
    rec = run_json(capsys, ["zeroshot", str(folder), *TINY, "--templates", "simple", "--json", "-o", str(out_file)])
    check_record(rec, n=9, num_classes=3)
    assert "top5" not in rec["metrics"]  # 3 classes
    assert json.loads(out_file.read_text())["metrics"] == rec["metrics"]
    assert rec["templates"]["name"] == "simple" and rec["templates"]["count"] == 7
    assert rec["timings"]["classifier_cached"] is True  # the first run filled the cache


def test_second_run_skips_the_text_encoder(folder, tiny_model, capsys, monkeypatch):
    first = run_json(capsys, ["zeroshot", str(folder), *TINY, "--templates", "cifar", "--json"])
    assert first["timings"]["classifier_cached"] is False
    cache_file = Path(first["timings"]["classifier_cache"])
    assert cache_file.is_file()

    def boom(*a, **k):
        raise AssertionError("text encoder called")

    monkeypatch.setattr(tiny_model, "encode_texts", boom)  # the CLI gets this same model object from load_model
    second = run_json(capsys, ["zeroshot", str(folder), *TINY, "--templates", "cifar", "--json"])
    assert second["timings"]["classifier_cached"] is True
    assert second["timings"]["classifier_cache"] == str(cache_file)
    assert second["metrics"] == first["metrics"]


def test_zeroshot_hf_dataset_saved_to_disk(tmp_path, capsys):
    import datasets

    rng = np.random.default_rng(0)
    names = ["red_apple", "green_leaf", "blue_sea", "white_snow", "black_cat", "grey_rock"]
    images, labels = [], []
    for label in range(len(names)):
        for _ in range(2):
            images.append(Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)))
            labels.append(label)
    feats = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"img": images, "fine": labels}, features=feats)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "saved"))

    capsys.readouterr()
    assert main(["zeroshot", f"hf:{tmp_path / 'saved'}", *TINY, "--templates", "simple"]) == 0
    assert "top-5 %" in capsys.readouterr().out
    rec = run_json(capsys, ["zeroshot", f"hf:{tmp_path / 'saved'}", *TINY, "--templates", "simple", "--json"])
    check_record(rec, n=12, num_classes=6)
    assert "top5" in rec["metrics"] and rec["metrics"]["top5"] >= rec["metrics"]["top1"]
    assert rec["data"]["source"].endswith("[validation]")


def test_zeroshot_rerank_reports_both(folder, capsys):
    rec = run_json(capsys, ["zeroshot", str(folder), *TINY, "--templates", "simple", "--scorer", "rerank", "--json"])
    assert set(rec["by_scorer"]) == {"contrastive", "rerank"} and rec["metrics"] == rec["by_scorer"]["rerank"]
    assert rec["likelihood"]["prompt"] == "a photo of a {}."


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [("imagenet", "--data DIR"), ("cifar10", "uoft-cs/cifar10"), ("cifar100", "save_to_disk")],
)
def test_missing_data_gives_hint_and_nonzero_exit(dataset, expected, capsys):
    capsys.readouterr()
    code = main(["zeroshot", dataset, *TINY])
    err = capsys.readouterr().err
    assert code == 1
    assert "error:" in err and "Fix:" in err and expected in " ".join(err.split())


def test_bad_arguments_exit_2(folder, capsys):
    assert main(["zeroshot", str(folder), *TINY, "--scorer", "magic"]) == 2
    assert main(["zeroshot", str(folder), *TINY, "--templates", "nonexistent-set"]) == 2
    assert "neither a template set nor a file" in " ".join(capsys.readouterr().err.split())


def test_classify(tmp_path, tiny_model, capsys):
    paths = []
    for name, colour in list(COLOURS.items())[:2]:
        p = tmp_path / f"{name}.png"
        Image.new("RGB", (30, 30), colour).save(p)
        paths.append(str(p))
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    rec = run_json(
        capsys, ["classify", *paths, str(tmp_path / "bad.jpg"), "--labels", "cat, dog,car", *TINY, "-n", "3", "--json"]
    )
    assert rec["labels"] == ["cat", "dog", "car"] and len(rec["results"]) == 2
    assert rec["skipped"][0]["image"].endswith("bad.jpg")
    from cocatk.zeroshot import ZeroShotClassifier
    from cocatk.zeroshot.templates import named_templates

    clf = ZeroShotClassifier.from_classnames(tiny_model, ["cat", "dog", "car"], named_templates("simple"))
    probs = clf.probabilities([Image.open(p).convert("RGB") for p in paths])
    for row, item in zip(probs, rec["results"], strict=True):
        got = [p["probability"] for p in item["predictions"]]
        assert got == sorted(got, reverse=True) and sum(got) == pytest.approx(1.0, abs=1e-6)
        assert {p["label"]: p["probability"] for p in item["predictions"]} == pytest.approx(
            dict(zip(["cat", "dog", "car"], row.tolist(), strict=True)), abs=1e-6
        )
    capsys.readouterr()
    assert main(["classify", paths[0], "--labels", "cat,dog", *TINY, "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "probability" in out and ("cat" in out or "dog" in out)
