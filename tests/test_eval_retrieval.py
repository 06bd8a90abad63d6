"""Retrieval evaluation: recall against an independent numpy computation, the rerank against sorting by
caption_loglik, the data formats, and the `cocatk eval-retrieval` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG

from cocatk.demo.scenes import write_captioned_folder
from cocatk.errors import DatasetError, UsageError
from cocatk.evaluation import open_captioned_dataset
from cocatk.evaluation.retrieval import (
    image_to_text_ranks,
    recall_from_ranks,
    reference_for,
    rerank_ranks,
    text_to_image_ranks,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a loaded 2-core machine, two spinning threads make the tiny model up to 30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_captioned_folder(tmp_path_factory.mktemp("shapes"), n=8, seed=1)


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- metrics -------------------------------------------------------------------------------------------------
def test_recall_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    n_img, per, d = 40, 3, 16
    img = _normed(rng, n_img, d)
    owner = np.repeat(np.arange(n_img), per)
    txt = img[owner] + 0.9 * _normed(rng, len(owner), d)  # noisy copies: some right, some wrong
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)

    t2i, _ = text_to_image_ranks(txt, img, owner, chunk=7)
    i2t, _ = image_to_text_ranks(img, txt, owner, chunk=5)

    sims = txt @ img.T
    ref_t2i = np.array([int(np.where(np.argsort(-sims[q]) == owner[q])[0][0]) for q in range(len(owner))])
    ref_i2t = np.array([int(np.flatnonzero(owner[np.argsort(-sims[:, i])] == i)[0]) for i in range(n_img)])
    np.testing.assert_array_equal(t2i, ref_t2i)
    np.testing.assert_array_equal(i2t, ref_i2t)
    for k in (1, 5, 10):
        assert recall_from_ranks(t2i)[f"R@{k}"] == pytest.approx(100 * np.mean(ref_t2i < k))
        assert recall_from_ranks(i2t)[f"R@{k}"] == pytest.approx(100 * np.mean(ref_i2t < k))
    assert 0 < recall_from_ranks(t2i)["R@1"] < 100  # the case is not trivial


def test_candidates_are_the_contrastive_top_k():
    rng = np.random.default_rng(1)
    img, txt = _normed(rng, 30, 8), _normed(rng, 12, 8)
    owner = rng.integers(0, 30, 12)
    _, cands = text_to_image_ranks(txt, img, owner, k=5)
    np.testing.assert_array_equal(cands, np.argsort(-(txt @ img.T), axis=1)[:, :5])


def test_rerank_ranks_hand_example():
    ranks = np.array([2, 7])
    cands = np.array([[4, 9, 1], [3, 5, 6]])
    scores = np.array([[-5.0, -9.0, -1.0], [0.0, 1.0, 2.0]])
    match = np.array([[False, False, True], [False, False, False]])
    # Row 0: image 1 (rank 2) has the best likelihood -> rank 0. Row 1: no match in the top-3 -> unchanged.
    np.testing.assert_array_equal(rerank_ranks(ranks, cands, scores, match), [0, 7])


# ---- the run on the tiny model -------------------------------------------------------------------------------
def test_rerank_orders_exactly_by_caption_loglik(tiny_model, shapes):
    from cocatk.evaluation import evaluate_retrieval

    data = open_captioned_dataset(shapes)
    k = 4
    result = evaluate_retrieval(tiny_model, data, rerank_ks=(k,), workers=1)

    # Independent computation: contrastive top-k per caption, sorted by caption_loglik, position of the image.
    images = [data.load(i) for i in range(len(data))]
    img = tiny_model.encode_images(images)
    tokens = tiny_model.image_tokens(images)
    txt = tiny_model.encode_texts(data.captions)
    top = np.argsort(-(txt @ img.T), axis=1, kind="stable")[:, :k]
    new_ranks = []
    for q, caption in enumerate(data.captions):
        ll = tiny_model.caption_loglik(caption, tokens[top[q]])
        order = top[q][np.argsort(-ll, kind="stable")]
        hit = np.flatnonzero(order == data.caption_image[q])
        full = np.argsort(-(txt[q] @ img.T), kind="stable")
        new_ranks.append(int(hit[0]) if len(hit) else int(np.flatnonzero(full == data.caption_image[q])[0]))
    expected = recall_from_ranks(np.array(new_ranks))
    got = result.metrics["text_to_image"][f"rerank@{k}"]
    for key in ("R@1", "R@5", "R@10"):
        assert got[key] == pytest.approx(expected[key])
    # R@k cannot move under a rerank of the top-k; the contrastive figures are the plain ones.
    assert got["R@10"] == result.metrics["text_to_image"]["contrastive"]["R@10"]
    assert set(result.metrics["image_to_text"]) == {"contrastive", f"rerank@{k}", f"rerank@{k} no prior"}
    assert result.n_images == 8 and result.n_captions == 16 and result.reference is None


def test_bad_arguments(tiny_model, shapes):
    from cocatk.evaluation import evaluate_retrieval

    data = open_captioned_dataset(shapes)
    with pytest.raises(UsageError):
        evaluate_retrieval(tiny_model, data, rerank_ks=(1,))
    with pytest.raises(UsageError):
        evaluate_retrieval(tiny_model, data, alpha=float("nan"))


# ---- data formats --------------------------------------------------------------------------------------------
def test_karpathy_json_split_and_image_root(tmp_path, shapes):
    simple = json.loads(shapes.read_text())
    names = sorted(simple)
    karpathy = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014" if i % 2 else "",
                "filename": n,
                "split": "test" if i < 5 else "train",
                "sentences": [{"raw": c} for c in simple[n]],
            }
            for i, n in enumerate(names)
        ],
    }
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for i, n in enumerate(names):
        (root / ("val2014" if i % 2 else "") / n).write_bytes((shapes.parent / n).read_bytes())
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))

    data = open_captioned_dataset(path, split="test", images_dir=root)
    assert len(data) == 5 and len(data.captions) == 10
    assert data.benchmark is None  # 5 images is not the 5k test set
    assert data.load(1).mode == "RGB"
    assert len(open_captioned_dataset(path, split=None, images_dir=root)) == 8
    with pytest.raises(UsageError, match="split"):
        open_captioned_dataset(path, split="val", images_dir=root)
    with pytest.raises(DatasetError, match="--images"):
        open_captioned_dataset(path, split="test")  # images are not beside the JSON


def test_hf_saved_dataset(tmp_path, shapes):
    datasets = pytest.importorskip("datasets")

    simple = json.loads(shapes.read_text())
    ds = datasets.Dataset.from_dict(
        {"image": [str(shapes.parent / n) for n in simple], "sentences": list(simple.values())}
    ).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    data = open_captioned_dataset(f"hf:{tmp_path / 'hf'}", caption_column="sentences")
    assert len(data) == 8 and len(data.captions) == 16
    assert data.load(3).size == (64, 64)
    with pytest.raises(UsageError, match="--caption-column"):
        open_captioned_dataset(f"hf:{tmp_path / 'hf'}", caption_column="nope")


def test_missing_data_gives_a_hint(tmp_path):
    with pytest.raises(DatasetError) as e:
        open_captioned_dataset(tmp_path / "nowhere.json")
    assert "dataset_coco.json" in e.value.hint and "hf:PATH" in e.value.hint
    with pytest.raises(DatasetError, match="captions.json"):
        open_captioned_dataset(tmp_path)  # a folder without captions


def test_reference_numbers():
    ref = reference_for("coca_ViT-L-14", "laion2b_s13b_b90k", "coco5k")
    assert ref["text_to_image"] == {"R@1": 45.65, "R@5": 70.42, "R@10": 79.21}
    assert reference_for("coca_ViT-B-32", "laion2b_s13b_b90k", "flickr1k")["text_to_image"]["R@1"] == 63.36
    assert reference_for("coca_ViT-B-32", "laion2b_s13b_b90k", None) is None


# ---- CLI -----------------------------------------------------------------------------------------------------
def test_cli_json_schema(shapes, capsys):
    from cocatk.cli import main

    code = main(
        [
            "eval-retrieval",
            str(shapes.parent),
            "--model",
            str(TINY_CONFIG),
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--rerank",
            "3",
            "--limit",
            "6",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads(captured.out)
    assert {"dataset", "n_images", "n_captions", "metrics", "reference", "alpha", "rerank_ks", "model"} <= set(doc)
    assert doc["n_images"] == 6 and doc["n_captions"] == 12 and doc["rerank_ks"] == [3]
    for direction in ("text_to_image", "image_to_text"):
        for method in ("contrastive", "rerank@3"):
            assert set(doc["metrics"][direction][method]) == {"R@1", "R@5", "R@10"}
    assert doc["model"]["random_weights"] is True


def test_cli_missing_data_exits_with_hint(tmp_path, capsys):
    from cocatk.cli import main

    code = main(["eval-retrieval", str(tmp_path / "coco"), "--pretrained", "none"])
    err = capsys.readouterr().err
    assert code == 1
    assert "not found" in err and "Fix:" in err and "--images" in err
