"""Dual encoders (CLIP, SigLIP) next to CoCa: random-weight tiny configs checked against open_clip's own functions,
and the one-line errors for what needs a decoder or a tokenizer from the hub."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from conftest import DATA, TINY_CONFIG
from PIL import Image

import cocatk
from cocatk.errors import DecoderRequiredError, UnknownModelError, WeightsNotFoundError
from cocatk.models import ClipModel, CocaModel, load_model, resolve_model

CLIP_TINY = DATA / "clip_tiny.json"
#: SigLIP-style (init_logit_bias, last-token pooling, no causal mask) with open_clip's bundled tokenizer
#: (``hf_tokenizer_name: null``; the file name holds no "siglip", which would select the hub-only SigLIP tokenizer).
SIGMOID_TINY = DATA / "sigmoid_tiny.json"


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (30 + i, 50, 3), dtype=np.uint8)) for i in range(n)]


TEXTS = ["a red bicycle", "two dogs on a beach at sunset", "!"]


@pytest.fixture(scope="module")
def clip():
    return load_model(str(CLIP_TINY), "none", device="cpu")


@pytest.fixture(scope="module")
def siglip():
    return load_model(str(SIGMOID_TINY), "none", device="cpu")


def test_kinds_come_from_the_config():
    assert resolve_model("ViT-B-32", "none").kind == "clip"
    assert resolve_model("ViT-B-16-SigLIP", "none").kind == "siglip"
    assert resolve_model("EVA02-B-16", "none").kind == "clip"
    assert resolve_model("coca_ViT-B-32", "none").kind == "coca"
    assert resolve_model(str(SIGMOID_TINY), "none").kind == "siglip"
    assert resolve_model(str(TINY_CONFIG), "none").has_decoder


def test_identity_of_coca_is_unchanged():
    # Manifests written before families existed must still match: the kind is not part of the identity.
    assert set(resolve_model("coca-b32").identity()) == {"model", "arch", "weights"}


@pytest.mark.parametrize("fixture", ["clip", "siglip"])
def test_encoders_equal_open_clip(request, fixture):
    m = request.getfixturevalue(fixture)
    assert isinstance(m, ClipModel) and not isinstance(m, CocaModel)
    assert not m.has_decoder
    images = _images(3)
    x = torch.stack([m.preprocess(im) for im in images])
    ids = open_clip.get_tokenizer(m.spec.arch)(TEXTS)
    with torch.no_grad():
        ref_img = m.model.encode_image(x, normalize=True).numpy()
        ref_txt = m.model.encode_text(ids, normalize=True).numpy()
    np.testing.assert_allclose(m.encode_images(images), ref_img, atol=1e-5)
    np.testing.assert_allclose(m.encode_texts(TEXTS), ref_txt, atol=1e-5)
    assert m.encode_images(images).dtype == np.float32


def test_siglip_rules(siglip, clip):
    assert siglip.kind == "siglip" and clip.kind == "clip"
    # Its own context length and image size, and open_clip's bundled tokenizer (works offline).
    assert siglip.context_length == 16 and siglip.tokenize(["a b"]).shape == (1, 16)
    assert siglip.image_size == 48 and siglip.preprocess_images(_images(1)).shape == (1, 3, 48, 48)
    assert siglip.logit_bias == pytest.approx(-10.0) and clip.logit_bias is None
    assert clip.match_probability(np.ones((1, 64)), np.ones((1, 64))) is None


def test_siglip_scores_equal_open_clip_logits(siglip):
    images = _images(4, seed=2)
    x = torch.stack([siglip.preprocess(im) for im in images])
    ids = open_clip.get_tokenizer(siglip.spec.arch)(TEXTS)
    with torch.no_grad():
        ref_logits, _ = siglip.model.get_logits(x, ids)
    img, txt = siglip.encode_images(images), siglip.encode_texts(TEXTS)
    np.testing.assert_allclose(siglip.match_logits(img, txt), ref_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(siglip.match_probability(img, txt), torch.sigmoid(ref_logits).numpy(), atol=1e-6)


def test_clip_logits_equal_open_clip(clip):
    images = _images(2, seed=4)
    x = torch.stack([clip.preprocess(im) for im in images])
    with torch.no_grad():
        ref, _ = clip.model.get_logits(x, open_clip.get_tokenizer(clip.spec.arch)(TEXTS))
    got = clip.match_logits(clip.encode_images(images), clip.encode_texts(TEXTS))
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)


def test_decoder_features_tell_what_to_pass(clip):
    for call in (
        lambda: clip.image_tokens(_images(1)),
        lambda: clip.caption_loglik("a cat", torch.zeros(1, 4, 64)),
        lambda: clip.encode_images_and_tokens(_images(1), tokens=True),
    ):
        with pytest.raises(DecoderRequiredError) as e:
            call()
        assert "--rerank-model" in e.value.hint
        assert "\n" not in e.value.one_line()
    assert clip.encode_images_and_tokens(_images(1), tokens=False)[1] is None


def test_vit_b_32_builds_offline_with_random_weights():
    m = load_model("ViT-B-32", "none", device="cpu")
    assert m.kind == "clip" and m.embed_dim == 512 and m.image_size == 224 and m.context_length == 77
    assert m.info()["kind"] == "clip"


def test_siglip_tokenizer_offline_is_one_line_error():
    # open_clip builds SigLIP offline, but its tokenizer comes from the hub through transformers.
    with pytest.raises(WeightsNotFoundError) as e:
        cocatk.load_model("ViT-B-16-SigLIP", "none", device="cpu")
    assert "tokenizer" in e.value.message and "timm/ViT-B-16-SigLIP" in e.value.message
    assert "\n" not in e.value.one_line()


def test_unknown_model_lists_presets_and_families():
    with pytest.raises(UnknownModelError) as e:
        resolve_model("ViT-Q-99", "none")
    for word in ("coca-l14", "demo", "ViT-B-32", "SigLIP", "EVA02-B-16"):
        assert word in e.value.hint


def test_classify_runs_with_a_dual_encoder(tmp_path, capsys):
    from cocatk.cli import main

    path = tmp_path / "a.png"
    _images(1)[0].save(path)
    args = ["classify", str(path), "--labels", "cat,dog,car", "--model", str(SIGMOID_TINY), "--pretrained", "none"]
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    assert "cat" in out and "dog" in out


def test_siglip_classify_probabilities_are_its_own_sigmoid(siglip):
    """A SigLIP model scores each label on its own: P = sigmoid(scale x cos + bias), checked against open_clip's
    own logits (get_logits) on the same image and label texts."""
    from cocatk.zeroshot import ZeroShotClassifier

    labels = ["cat", "dog", "car"]
    clf = ZeroShotClassifier.from_classnames(siglip, labels, ["{}"], cache=False)
    image = _images(1, seed=3)[0]
    probs = clf.probabilities([image])
    x = siglip.preprocess_images([image])
    ids = siglip.tokenize(labels)
    with torch.no_grad():
        logits, _ = siglip.model.get_logits(x, ids)
    np.testing.assert_allclose(probs, torch.sigmoid(logits).numpy(), atol=1e-4)
    assert not np.isclose(probs.sum(), 1.0)  # independent per label, not a softmax
