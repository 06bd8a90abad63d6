"""The model layer against open_clip's own functions, on a tiny random-weight CoCa."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from PIL import Image

import cocatk
from cocatk.errors import ModelConfigError, UnknownModelError, UsageError, WeightsNotFoundError


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(40, 50), (64, 32), (33, 33), (120, 90)]
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        out.append(Image.fromarray(arr))
    return out


TEXTS = ["a photo of a dog", "a red bicycle leaning on a wall", "x", "two cats on a sofa, sleeping"]


def test_encode_texts_equals_open_clip(tiny_model):
    import open_clip

    tok = open_clip.get_tokenizer(tiny_model.spec.arch)
    with torch.no_grad():
        ref = tiny_model.model.encode_text(tok(TEXTS), normalize=True).numpy()
    got = tiny_model.encode_texts(TEXTS, batch_size=3)  # batching must not change anything
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (4, 64)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_encode_images_equals_open_clip(tiny_model):
    images = _images(5) + [Image.new("L", (30, 20), 77), Image.new("RGBA", (20, 30), (1, 2, 3, 4))]
    with torch.no_grad():
        ref = tiny_model.model.encode_image(torch.stack([tiny_model.preprocess(im) for im in images])).numpy()
    got = tiny_model.encode_images(images, batch_size=2)
    assert got.shape == (7, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # A preprocessed tensor gives the same result.
    np.testing.assert_allclose(tiny_model.encode_images(tiny_model.preprocess_images(images)), ref, atol=1e-5)
    # Different images, different embeddings (the test would pass vacuously on a constant model).
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_encode_empty_inputs(tiny_model):
    assert tiny_model.encode_images([]).shape == (0, 64)
    assert tiny_model.encode_texts([]).shape == (0, 64)


def test_bad_tensor_shape_is_a_usage_error(tiny_model):
    with pytest.raises(UsageError, match="expected a preprocessed image tensor"):
        tiny_model.encode_images(torch.zeros(2, 32, 32))


def test_image_tokens_shape_and_equal_to_open_clip(tiny_model):
    images = _images(3)
    tokens = tiny_model.image_tokens(images)
    assert tokens.shape == (3, 16, 64)  # attn_pooler_queries - 1 tokens
    with torch.no_grad():
        _, ref = tiny_model.model._encode_image(tiny_model.preprocess_images(images))
    torch.testing.assert_close(tokens, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("text", ["a photo of a dog", "a red bicycle leaning on a wall at night"])
def test_caption_loglik_equals_coca_loss(tiny_model, text):
    from open_clip.loss import CoCaLoss

    images = _images(4, seed=3)
    tokens = tiny_model.image_tokens(images)
    got = tiny_model.caption_loglik(text, tokens, chunk_size=3)  # chunking must not change anything
    count = tiny_model.caption_token_count(text)
    assert count == len(tiny_model.tokenizer.encode(text)) + 1  # words + EOT

    loss_fn = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)
    ids = tiny_model.tokenize([text])  # the 76-padded ids; pads are ignored by the loss
    pixels = tiny_model.preprocess_images(images)
    expected = []
    with torch.no_grad():
        for i in range(len(images)):
            out = tiny_model.model(pixels[i : i + 1], ids)
            _, caption_loss = loss_fn(
                out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
            )
            expected.append(-caption_loss.item() * count)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert got.shape == (4,) and np.ptp(got) > 1e-3, "different images must get different scores"


def test_caption_loglik_trims_at_eot_for_long_text(tiny_model):
    # Truncated to the context: SOT + 74 words + EOT, so 75 scored tokens, and the scores still match the count.
    text = " ".join(["dog"] * 200)
    assert tiny_model.caption_token_count(text) == tiny_model.context_length - 1
    assert np.isfinite(tiny_model.caption_loglik(text, tiny_model.image_tokens(_images(2)))).all()


def test_caption_loglik_rejects_empty_text(tiny_model):
    with pytest.raises(UsageError, match="empty"):
        tiny_model.caption_loglik("  ", tiny_model.image_tokens(_images(1)))


def test_random_model_decoder_projection_is_initialised(tiny_model):
    proj = tiny_model.model.text_decoder.text_projection.detach()
    assert torch.isfinite(proj).all()
    assert 0.5 * 64**-0.5 < proj.std().item() < 1.5 * 64**-0.5
    assert tiny_model.is_random and tiny_model.info()["random_weights"] is True


def test_random_weights_identical_across_processes(tiny_model):
    code = (
        f"import json, cocatk; m = cocatk.load_model({str(TINY_CONFIG)!r}, pretrained='none', device='cpu'); "
        "print(json.dumps(m.encode_texts(['a dog'])[0].tolist()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    np.testing.assert_array_equal(np.array(json.loads(out), np.float32), tiny_model.encode_texts(["a dog"])[0])


def test_load_model_is_cached_per_process(tiny_model):
    assert cocatk.load_model(str(TINY_CONFIG), pretrained="none", device="cpu") is tiny_model


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_round_trip(tiny_model, tmp_path, suffix):
    state = {k: v.clone() + 0.01 for k, v in tiny_model.model.state_dict().items()}  # weights unlike the seed's
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = cocatk.load_model(str(TINY_CONFIG), pretrained=str(path), device="cpu")
    assert loaded.spec.weights_kind == "file" and not loaded.is_random
    assert loaded.spec.identity()["weights"].startswith("sha256:")
    assert np.abs(loaded.encode_texts(["a dog"]) - tiny_model.encode_texts(["a dog"])).max() > 1e-4


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelConfigError, match="does not fit"):
        cocatk.load_model(str(TINY_CONFIG), pretrained=str(path), device="cpu")


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError) as e:
        cocatk.resolve_model("coca-huge")
    assert "coca-l14" in e.value.hint and "coca_ViT-B-32" in e.value.hint


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(UnknownModelError, match="unknown pretrained tag") as e:
        cocatk.resolve_model("coca-b32", pretrained="openai")
    assert "laion2b_s13b_b90k" in e.value.hint


def test_missing_checkpoint_file():
    with pytest.raises(WeightsNotFoundError, match="not found"):
        cocatk.resolve_model("coca-b32", pretrained="/nonexistent/model.bin")


def test_config_without_weights_needs_pretrained(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        cocatk.resolve_model(str(TINY_CONFIG))
    assert "--pretrained" in e.value.hint


def test_non_open_clip_config_is_refused(tmp_path):
    path = tmp_path / "vision_only.json"
    path.write_text(json.dumps({"embed_dim": 64, "vision_cfg": {}}))
    with pytest.raises(ModelConfigError, match="not an open_clip model config"):
        cocatk.resolve_model(str(path), pretrained="none")


def test_missing_weights_offline_gives_the_file_to_fetch():
    with pytest.raises(WeightsNotFoundError) as e:
        cocatk.load_model("coca-b32", device="cpu")
    assert "open_clip_pytorch_model.bin" in e.value.hint
    assert "--pretrained" in e.value.hint
    assert "laion/CoCa-ViT-B-32-laion2B-s13B-b90k" in e.value.hint


def test_default_model_comes_from_environment(monkeypatch):
    monkeypatch.setenv("COCATK_MODEL", "coca-b32")
    monkeypatch.setattr("cocatk.config.cuda_available", lambda: True)  # $COCATK_MODEL beats the machine
    assert cocatk.resolve_model().arch == "coca_ViT-B-32"
    monkeypatch.delenv("COCATK_MODEL")
    assert cocatk.resolve_model().preset == "coca-l14"  # the machine's default (tests/test_default_model.py)


@pytest.mark.parametrize("text", ["a dog", "a red bicycle leaning on a wall at night in the rain"])
def test_folded_decoder_equals_open_clip_decoder(tiny_model, text):
    from cocatk.models import decoder_logits

    tokens = tiny_model.image_tokens(_images(3, seed=5))
    ids = tiny_model._caption_ids(text)
    with torch.no_grad():
        _, token_embs = tiny_model.model._encode_text(ids)
        inputs = token_embs[:, :-1]
        ref = tiny_model.model.text_decoder(tokens, inputs.expand(3, -1, -1))
        folded = decoder_logits(tiny_model.model.text_decoder, tokens, inputs, fold=True)
    torch.testing.assert_close(folded, ref, atol=1e-4, rtol=1e-4)
    assert (ref[0] - ref[1]).abs().max() > 1e-4  # the images matter, so equality is not vacuous
