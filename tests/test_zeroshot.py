"""Zero-shot library: classifier == open_clip, metrics == numpy, cache, templates, datasets, likelihood scorer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cocatk.errors import DatasetError, UsageError
from cocatk.evaluation.labelled import ZeroShotDataset
from cocatk.evaluation.zeroshot import (
    likelihood_scores,
    null_images,
    rank_classes,
    ranking_metrics,
    rerank_scores,
    text_priors,
)
from cocatk.zeroshot import ZeroShotClassifier, evaluate_zeroshot, open_dataset, parse_templates
from cocatk.zeroshot.templates import load_templates, named_templates

TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{} in the wild"]
COLOURS = {"red_apple": (210, 30, 30), "green_leaf": (30, 170, 40), "blue_sea": (30, 60, 220)}


def make_folder(root: Path, per_class: int = 3, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(1)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(colour) + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def reference_weights(model, classnames, templates) -> np.ndarray:
    import open_clip
    import torch

    with torch.no_grad():
        w = open_clip.build_zero_shot_classifier(
            model.model, model.tokenizer, classnames, templates, num_classes_per_batch=2, device="cpu"
        )
    return w.T.numpy()


def numpy_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """Independent: rank of the true class = how many classes score strictly higher."""
    true = scores[np.arange(len(labels)), labels]
    rank = (scores > true[:, None]).sum(axis=1)
    pred = scores.argmax(axis=1)
    c = scores.shape[1]
    confusion = np.zeros((c, c), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    recall = np.diag(confusion)[support > 0] / support[support > 0]
    out = {"top1": float((rank == 0).mean()), "mean_per_class_recall": float(recall.mean()), "n": len(labels)}
    if c >= 5:
        out["top5"] = float((rank < 5).mean())
    return out


# ---- classifier --------------------------------------------------------------------------------------------
def test_classifier_equals_open_clip(tiny_model):
    names = ["cat", "dog", "red car", "tree", "aquarium fish"]
    ours = ZeroShotClassifier.from_classnames(tiny_model, names, TEMPLATES, cache=False)
    ref = reference_weights(tiny_model, names, TEMPLATES)
    assert ours.weights.shape == (5, tiny_model.embed_dim) and ours.weights.dtype == np.float32
    np.testing.assert_allclose(ours.weights, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours.weights, axis=1), 1.0, atol=1e-5)
    # and the classes really differ (a degenerate model would make the comparison meaningless)
    assert np.abs(ours.weights[0] - ours.weights[1]).max() > 1e-3


def test_openai_templates_equal_open_clip_callables():
    import open_clip

    ours = named_templates("openai")
    assert len(ours) == 80 and len(named_templates("simple")) == 7 and len(named_templates("cifar")) == 18
    assert [t.replace("{}", "goldfish") for t in ours] == [t("goldfish") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]


def test_cache_is_hit_on_second_build(tiny_model, monkeypatch):
    names = ["cat", "dog"]
    first = ZeroShotClassifier.from_classnames(tiny_model, names, TEMPLATES)
    assert not first.from_cache and first.cache_path is not None
    assert first.cache_path.is_file() and first.cache_path.with_suffix(".json").is_file()
    assert first.cache_path.parent == Path(os.environ["COCATK_CACHE"]) / "zeroshot"
    manifest = json.loads(first.cache_path.with_suffix(".json").read_text())
    assert manifest["model"] == tiny_model.spec.identity() and manifest["classnames"] == names

    def boom(*args, **kwargs):
        raise AssertionError("text encoder called on a cache hit")

    monkeypatch.setattr(tiny_model, "encode_texts", boom)
    second = ZeroShotClassifier.from_classnames(tiny_model, names, TEMPLATES)
    assert second.from_cache and second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.weights, first.weights)
    # other templates are another key: the text tower must run (and here it is patched to fail)
    with pytest.raises(AssertionError, match="text encoder called"):
        ZeroShotClassifier.from_classnames(tiny_model, names, TEMPLATES[:1])


def test_predict_probabilities_use_logit_scale(tiny_model):
    clf = ZeroShotClassifier.from_classnames(tiny_model, ["red", "green", "blue"], TEMPLATES, cache=False)
    images = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 255, 0)]]
    emb = tiny_model.encode_images(images)
    z = float(tiny_model.model.logit_scale.detach().exp()) * emb @ clf.weights.T
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(clf.probabilities(images), expected, atol=1e-6)
    top = clf.predict(images, top_n=2)
    assert [len(t) for t in top] == [2, 2]
    for row, preds in zip(expected, top, strict=True):
        assert preds[0] == (clf.classnames[int(row.argmax())], pytest.approx(float(row.max()), abs=1e-6))


# ---- metrics -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [3, 12])
def test_metrics_equal_numpy(classes):
    rng = np.random.default_rng(classes)
    scores = rng.normal(size=(300, classes))
    labels = rng.integers(0, classes, 300)
    labels[labels == 1] = 0  # a class with no images must not count in the mean per-class recall
    scores[labels == 2, 2] += 1.5  # make some classes easier so recall differs from accuracy
    ours = ranking_metrics(rank_classes(scores, 5), labels, classes)
    assert ours == pytest.approx(numpy_metrics(scores, labels))
    assert ("top5" in ours) == (classes >= 5)


def test_metrics_small_hand_example():
    # labels 0,0,1 ; predictions 0,1,1 -> top1 2/3, recall class0 1/2, class1 1/1 -> mean 0.75
    ranked = np.array([[0, 1], [1, 0], [1, 0]])
    m = ranking_metrics(ranked, np.array([0, 0, 1]), 2)
    assert m == {"top1": pytest.approx(2 / 3), "mean_per_class_recall": pytest.approx(0.75), "n": 3}


# ---- templates ---------------------------------------------------------------------------------------------
def test_templates_file_parsing(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# prompts for birds\n\n  a photo of a {}, a type of bird.  \n# another\nart of the {}\n")
    label, templates = load_templates(str(f))
    assert label == "file:prompts.txt"
    assert templates == ["a photo of a {}, a type of bird.", "art of the {}"]
    with pytest.raises(UsageError, match="line 2"):
        parse_templates("a photo of a {}\nno placeholder here\n")
    with pytest.raises(UsageError, match="no template"):
        parse_templates("# only a comment\n\n")
    with pytest.raises(UsageError, match="neither a template set nor a file"):
        load_templates(str(tmp_path / "missing.txt"))


# ---- datasets ----------------------------------------------------------------------------------------------
def test_image_folder_dataset(tmp_path):
    ds = open_dataset(str(make_folder(tmp_path / "f", per_class=2)))
    assert ds.classnames == ["blue sea", "green leaf", "red apple"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    img = ds.decode(ds.fetch([3])[0])
    assert img.mode == "RGB" and img.size == (40, 30)


def test_imagenet_synset_folders(tmp_path):
    for syn in ("n01440764", "n15075141"):
        (tmp_path / "val" / syn).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "val" / syn / "x.JPEG")
    ds = open_dataset("imagenet", data_dir=tmp_path)
    import open_clip

    assert ds.labels.tolist() == [0, 999] and ds.classnames == list(open_clip.IMAGENET_CLASSNAMES)
    assert ds.benchmark == "imagenet1k" and ds.default_templates == "openai"


def test_imagenet_flat_folder_labels(tmp_path):
    for i in (1, 2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"ILSVRC2012_val_{i:08d}.JPEG")
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("65\n970\n")
    with pytest.raises(DatasetError, match="meta.mat"):
        open_dataset("imagenet", data_dir=tmp_path)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000001,n01751748 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n09193705 5 6 7 8 n09193705 1 1 1 1\n"
    )
    ds = open_dataset("imagenet", data_dir=tmp_path)
    from cocatk.zeroshot._data import IMAGENET_SYNSETS

    assert ds.labels.tolist() == [IMAGENET_SYNSETS.index("n01751748"), IMAGENET_SYNSETS.index("n09193705")]


def test_missing_data_errors_say_how_to_fix(tmp_path):
    with pytest.raises(DatasetError) as e:
        open_dataset("imagenet")
    assert "--data DIR" in e.value.hint and "ILSVRC/imagenet-1k" in e.value.hint
    with pytest.raises(DatasetError) as e:
        open_dataset("cifar10")
    assert "uoft-cs/cifar10" in e.value.hint and "save_to_disk" in e.value.hint
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_dataset(str(tmp_path / "nope"))


def test_hf_dataset_columns_and_splits(tmp_path):
    import datasets

    feats = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["a_b", "c"])})
    ims = [Image.new("RGB", (10, 10), (i * 40, 0, 0)) for i in range(4)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"picture": ims[:1], "kind": [0]}, features=feats),
            "test": datasets.Dataset.from_dict({"picture": ims, "kind": [0, 1, 1, 0]}, features=feats),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = open_dataset(f"hf:{tmp_path / 'dd'}")
    assert ds.classnames == ["a b", "c"] and ds.labels.tolist() == [0, 1, 1, 0]  # default split: test
    assert ds.decode(ds.fetch([2])[0]).getpixel((0, 0)) == (80, 0, 0)
    assert len(open_dataset(f"hf:{tmp_path / 'dd'}", split="train")) == 1
    with pytest.raises(UsageError, match="no split 'nope'"):
        open_dataset(f"hf:{tmp_path / 'dd'}", split="nope")
    with pytest.raises(UsageError, match="no column 'img'"):
        open_dataset(f"hf:{tmp_path / 'dd'}", image_column="img")


# ---- evaluation --------------------------------------------------------------------------------------------
def test_contrastive_evaluation_equals_independent_computation(tiny_model, tmp_path):
    root = make_folder(tmp_path / "f")
    result = evaluate_zeroshot(str(root), tiny_model, templates=TEMPLATES, workers=2, batch_size=4, cache=False)
    # independent: PIL decode, the model's own preprocessing, open_clip's classifier, numpy metrics
    paths = sorted(root.glob("*/*.png"))
    labels = np.array([sorted(COLOURS).index(p.parent.name) for p in paths])
    emb = tiny_model.encode_images([Image.open(p).convert("RGB") for p in paths])
    names = [n.replace("_", " ") for n in sorted(COLOURS)]
    scores = 100 * emb @ reference_weights(tiny_model, names, TEMPLATES).T
    assert result.metrics == pytest.approx(numpy_metrics(scores, labels), abs=1e-9)
    assert result.metrics["n"] == 9 and result.scorer == "contrastive" and result.reference is None
    assert result.templates == {"name": "custom", "count": 3, "first": TEMPLATES[0]}


def test_limit_takes_an_even_spread(tiny_model, tmp_path):
    root = make_folder(tmp_path / "f")
    r = evaluate_zeroshot(str(root), tiny_model, templates=TEMPLATES[:1], limit=3, workers=0)
    assert r.metrics["n"] == 3 and r.data["limit"] == 3
    # one image from each of the 3 sorted classes: every class present, so recall is over 3 classes
    assert r.metrics["mean_per_class_recall"] == pytest.approx(r.metrics["top1"])


def test_likelihood_scorer_equals_direct_caption_loglik(tiny_model, tmp_path):
    root = make_folder(tmp_path / "f", per_class=2)
    names = [n.replace("_", " ") for n in sorted(COLOURS)]
    prompts = [f"a photo of a {n}." for n in names]
    paths = sorted(root.glob("*/*.png"))
    labels = np.array([sorted(COLOURS).index(p.parent.name) for p in paths])
    tokens = tiny_model.image_tokens([Image.open(p).convert("RGB") for p in paths])
    null_tokens = tiny_model.image_tokens(null_images(tiny_model.image_size))
    alpha = 0.7
    direct = np.array(
        [
            [
                tiny_model.caption_loglik(p, tokens[i : i + 1])[0]
                - alpha * tiny_model.caption_loglik(p, null_tokens).mean()
                for p in prompts
            ]
            for i in range(len(paths))
        ]
    )
    ours = likelihood_scores(tiny_model, prompts, tokens) - alpha * text_priors(tiny_model, prompts)
    np.testing.assert_allclose(ours, direct, rtol=1e-6, atol=1e-4)
    assert np.ptp(direct[:, 0]) > 1e-3  # the scores depend on the image: the comparison can fail

    result = evaluate_zeroshot(str(root), tiny_model, templates=TEMPLATES, scorer="likelihood", alpha=alpha)
    assert result.by_scorer["likelihood"] == pytest.approx(numpy_metrics(direct, labels), abs=1e-9)
    assert set(result.by_scorer) == {"contrastive", "likelihood"}
    assert result.likelihood["prompt"] == "a photo of a {}."
    # with 3 classes the contrastive top-5 holds every class, so rerank == likelihood
    rr = evaluate_zeroshot(str(root), tiny_model, templates=TEMPLATES, scorer="rerank", alpha=alpha)
    assert rr.by_scorer["rerank"] == result.by_scorer["likelihood"]
    # rerank scores are the same numbers, gathered at the candidates
    cand = np.array([[2, 0], [1, 2], [0, 1], [0, 2], [1, 0], [2, 1]])
    gathered = rerank_scores(tiny_model, prompts, tokens, cand)
    raw = likelihood_scores(tiny_model, prompts, tokens)
    np.testing.assert_allclose(gathered, np.take_along_axis(raw, cand, axis=1), rtol=1e-6, atol=1e-4)


def test_likelihood_refuses_many_classes(tiny_model):
    ds = ZeroShotDataset("x", "x", [f"c{i}" for i in range(101)], np.zeros(1, np.int64), "simple")
    with pytest.raises(UsageError, match="rerank"):
        evaluate_zeroshot(ds, tiny_model, scorer="likelihood")
    with pytest.raises(UsageError, match="unknown scorer"):
        evaluate_zeroshot(ds, tiny_model, scorer="best")


def test_bad_image_is_skipped_and_counted(tiny_model, tmp_path):
    root = make_folder(tmp_path / "f", per_class=2)
    (root / "blue_sea" / "broken.png").write_bytes(b"not an image")
    r = evaluate_zeroshot(str(root), tiny_model, templates=TEMPLATES[:1])
    assert r.metrics["n"] == 6 and r.skipped["count"] == 1 and "broken.png" in r.skipped["examples"][0]


@pytest.mark.weights
def test_imagenet_reproduction_coca_l14():
    """Real ImageNet-1k val with coca-l14: 75.61 % top-1 published (open_clip results table)."""
    from cocatk.models import cached_weights_path

    if not cached_weights_path("laion/CoCa-ViT-L-14-laion2B-s13B-b90k"):
        pytest.skip("coca-l14 weights are not in the Hugging Face cache")
    data = os.environ.get("COCATK_IMAGENET_DIR")
    try:
        ds = open_dataset("imagenet", data_dir=data)
    except DatasetError as e:
        pytest.skip(f"ImageNet val not available (set COCATK_IMAGENET_DIR): {e.message}")
    r = evaluate_zeroshot(ds, "coca-l14")
    assert r.metrics["n"] == 50000
    assert r.metrics["top1"] == pytest.approx(0.7561, abs=0.003)
    assert r.reference is not None and r.reference["comparable"]
