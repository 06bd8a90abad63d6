"""The rerank as its own model: a CoCa reranking a CLIP index (from files or a token cache built for it), the
manifest's rerank model and its mismatch, and BLIP-ITM against transformers' own forward. Offline, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, TINY_CONFIG
from PIL import Image

from cocatk.cli import main
from cocatk.errors import DecoderRequiredError, IndexMismatchError, RerankerError, UsageError
from cocatk.models import load_model
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index

transformers = pytest.importorskip("transformers")

CLIP_TINY = str(DATA / "clip_tiny.json")
COCA_TINY = str(TINY_CONFIG)


def _make_images(folder: Path, n: int = 12) -> list[Path]:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (36 + i, 52, 3), dtype=np.uint8)
        arr[: 8 + i] = rng.integers(0, 255, 3)
        path = folder / f"im{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def clip_index(tmp_path_factory):
    """(index dir, files): a CLIP-tiny index without tokens."""
    root = tmp_path_factory.mktemp("clipidx")
    files = _make_images(root / "photos")
    with Index.open(root / "idx", model=CLIP_TINY, pretrained="none", device="cpu", create=True) as idx:
        idx.update([root / "photos"], workers=0)
    return root / "idx", files


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    """A tiny random BLIP-ITM saved like a hub snapshot: config, weights, a BERT tokenizer, the image processor."""
    from cocatk.models.blip import stand_in_tokenizer

    folder = tmp_path_factory.mktemp("blip")
    tok = stand_in_tokenizer(128, folder / "vocab")
    config = transformers.BlipConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=2,
            sep_token_id=3,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    torch.manual_seed(0)
    model = transformers.BlipForImageTextRetrieval(config)
    with torch.no_grad():  # BLIP's init leaves the ITM score nearly image-independent: spread the weights
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(std=0.2)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _open(idx_dir: Path, **kw) -> Index:
    return Index.open(idx_dir, device="cpu", **kw)


# ---- CoCa reranks a CLIP index ---------------------------------------------------------------------------------
def test_clip_index_without_rerank_model_is_not_reranked_and_says_what_to_pass(clip_index):
    with _open(clip_index[0]) as idx:
        res = search_index(idx, "a red bicycle", n=3, rerank_k=6)
    assert not res.reranked and all(h.loglik is None for h in res.hits)
    assert any("--rerank-model" in w for w in res.warnings)


def test_rerank_model_scores_equal_its_own_loglik(clip_index):
    idx_dir, files = clip_index
    coca = load_model(COCA_TINY, "none", device="cpu")
    with _open(idx_dir) as idx:
        base = search_index(idx, "a red bicycle", n=6, rerank=False)
        res = search_index(idx, "a red bicycle", n=6, rerank_k=6, rerank_model=COCA_TINY, rerank_pretrained="none")
    assert res.reranked and res.reranker == "coca" and res.tokens_from == "files"
    assert res.rerank_model["model"].endswith("coca_tiny.json")
    assert {h.id for h in res.hits} == {h.id for h in base.hits}  # the same candidates, reordered
    images = [Image.open(h.path) for h in res.hits]
    ref = coca.caption_loglik("a red bicycle", coca.image_tokens(images))
    np.testing.assert_allclose([h.loglik for h in res.hits], ref, rtol=1e-5, atol=1e-4)
    assert all(a.loglik >= b.loglik for a, b in zip(res.hits, res.hits[1:], strict=False))


def test_token_cache_for_the_rerank_model(tmp_path):
    files = _make_images(tmp_path / "photos", n=6)
    coca = load_model(COCA_TINY, "none", device="cpu")
    with Index.open(
        tmp_path / "idx",
        model=CLIP_TINY,
        pretrained="none",
        device="cpu",
        create=True,
        rerank_model=COCA_TINY,
        rerank_pretrained="none",
    ) as idx:
        idx.update([tmp_path / "photos"], workers=0, cache_tokens=True)
        m = idx.manifest
        assert m["rerank_model"]["identity"] == coca.spec.identity()
        assert m["identity"]["arch"].startswith("clip_tiny")  # the first stage is recorded as before
        ids = idx.store.ids()
        cached = idx.get_tokens(ids)
        paths = idx.store.paths_for_ids(list(ids))
    ref = coca.image_tokens([Image.open(p).convert("RGB") for p in paths])
    torch.testing.assert_close(cached.float(), ref, atol=2e-2, rtol=2e-2)  # fp16 cache
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["rerank_model"]["model"] == COCA_TINY
    with _open(tmp_path / "idx") as idx:  # the recorded rerank model is used without being named
        cached_res = search_index(idx, "a cat", n=4, rerank_k=6)
        files_res = search_index(idx, "a cat", n=4, rerank_k=6, use_token_cache=False)
    assert cached_res.tokens_from == "cache" and files_res.tokens_from == "files"
    assert [h.id for h in cached_res.hits] == [h.id for h in files_res.hits]
    np.testing.assert_allclose(
        [h.loglik for h in cached_res.hits], [h.loglik for h in files_res.hits], rtol=1e-2, atol=0.05
    )
    assert len(files) == 6


def test_rerank_model_mismatch_is_refused_then_switched(tmp_path):
    _make_images(tmp_path / "photos", n=3)
    with Index.open(
        tmp_path / "idx", model=CLIP_TINY, pretrained="none", device="cpu", create=True,
        rerank_model=COCA_TINY, rerank_pretrained="none",
    ) as idx:  # fmt: skip
        idx.update([tmp_path / "photos"], workers=0, cache_tokens=True)
    with _open(tmp_path / "idx") as idx, pytest.raises(IndexMismatchError) as e:
        search_index(idx, "a cat", rerank_model="demo")
    assert "--rerank-model" in e.value.hint and "--rebuild" in e.value.hint
    with pytest.raises(IndexMismatchError):
        _open(tmp_path / "idx", lock=True, rerank_model="demo")
    with _open(tmp_path / "idx", lock=True, rebuild=True, rerank_model="demo") as idx:
        assert idx.manifest["rerank_model"]["model"] == "demo"
        assert idx.manifest["token_shape"] is None and idx.store.token_ids() == set()  # other model's tokens dropped
        assert idx.store.count() == 3  # the first stage is not re-encoded
        idx.update(workers=0)
        assert len(idx.store.token_ids()) == 3  # backfilled with demo's tokens
        assert idx.tokens_cached_for(idx.rerank_spec)


def test_dual_encoder_as_rerank_model_is_refused(clip_index):
    with _open(clip_index[0]) as idx, pytest.raises(DecoderRequiredError):
        search_index(idx, "a cat", rerank_model=CLIP_TINY, rerank_pretrained="none")


def test_unknown_reranker(clip_index):
    with _open(clip_index[0]) as idx, pytest.raises(UsageError, match="unknown reranker"):
        search_index(idx, "a cat", reranker="bm25")


# ---- BLIP-ITM ---------------------------------------------------------------------------------------------------
def test_blip_itm_equals_transformers_forward(blip_dir):
    from cocatk.models.blip import load_blip_itm

    blip = load_blip_itm(str(blip_dir), device="cpu")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 30, 3), dtype=np.uint8)) for i in range(5)]
    text = "a red bicycle"
    got = blip.score(text, images, batch_size=2)
    # transformers' own processor and forward, per pair
    proc = transformers.BlipImageProcessor.from_pretrained(blip_dir)
    tok = transformers.AutoTokenizer.from_pretrained(blip_dir)
    model = transformers.BlipForImageTextRetrieval.from_pretrained(blip_dir).eval()
    px = proc(images=images, return_tensors="pt")["pixel_values"]
    enc = tok([text] * len(images), return_tensors="pt")
    with torch.no_grad():
        itm = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px).itm_score
    ref = torch.softmax(itm, dim=-1)[:, 1].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert np.ptp(ref) > 0  # the images matter
    embeds = blip.image_embeds(images)
    np.testing.assert_allclose(blip.score_embeds(text, embeds), ref, atol=1e-6)


def test_blip_offline_and_missing_are_one_line(tmp_path):
    from cocatk.models.blip import load_blip_itm

    with pytest.raises(RerankerError) as e:
        load_blip_itm("Salesforce/blip-itm-base-coco", device="cpu")
    assert "not in the local Hugging Face cache" in e.value.message and "\n" not in e.value.one_line()
    with pytest.raises(RerankerError, match="not found"):
        load_blip_itm(str(tmp_path / "nope" / "blip"), device="cpu")


def test_blip_reranks_the_same_candidates(clip_index, blip_dir):
    from cocatk.models.blip import load_blip_itm

    with _open(clip_index[0]) as idx:
        base = search_index(idx, "a red bicycle", n=5, rerank=False)
        res = search_index(idx, "a red bicycle", n=5, rerank_k=5, reranker="blip-itm", rerank_model=str(blip_dir))
    assert res.reranked and res.reranker == "blip-itm"
    assert {h.id for h in res.hits} == {h.id for h in base.hits}
    assert all(h.loglik is None and h.match is not None for h in res.hits)
    ref = load_blip_itm(str(blip_dir), device="cpu").score("a red bicycle", [Image.open(h.path) for h in res.hits])
    np.testing.assert_allclose([h.match for h in res.hits], ref, atol=1e-6)
    assert "match" in res.hits[0].to_dict() and "match" not in base.hits[0].to_dict()


# ---- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_clip_index_then_coca_and_blip_rerank(tmp_path, capsys, blip_dir):
    _make_images(tmp_path / "photos", n=5)
    ix = str(tmp_path / "idx")
    assert main(["index", str(tmp_path / "photos"), "--index", ix, "--model", CLIP_TINY, "--pretrained", "none"]) == 0
    capsys.readouterr()
    args = ["search", "a cat", "--index", ix, "-n", "3", "--rerank-k", "5", "--json"]
    assert main([*args, "--rerank-model", COCA_TINY, "--rerank-pretrained", "none"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reranked"] and data["reranker"] == "coca" and data["model"]["kind"] == "clip"
    assert all(h["loglik"] is not None for h in data["hits"])
    assert main([*args, "--reranker", "blip-itm", "--rerank-model", str(blip_dir)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reranker"] == "blip-itm" and all(0 <= h["match"] <= 1 for h in data["hits"])
    assert main(["search", "a cat", "--index", ix, "--rerank-model", CLIP_TINY, "--rerank-pretrained", "none"]) == 2
    assert "--rerank-model" in capsys.readouterr().err


def test_cli_eval_side_by_side(tmp_path, capsys, blip_dir):
    from cocatk.demo.scenes import write_captioned_folder

    folder = write_captioned_folder(tmp_path / "shapes", n=8, seed=1)
    code = main(
        [
            "eval-retrieval", str(folder), "--split", "all", "--model", CLIP_TINY, "--pretrained", "none",
            "--rerank", "3", "--reranker", "coca,blip-itm", "--rerank-model", COCA_TINY, "--rerank-pretrained",
            "none", "--blip-model", str(blip_dir), "--costs", "2", "--json",
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    t2i = data["metrics"]["text_to_image"]
    assert {"contrastive", "rerank@3", "blip-itm@3"} <= set(t2i)
    assert data["rerank_models"]["coca"]["model"] == COCA_TINY
    assert set(data["costs_ms"]) == {
        "contrastive",
        "coca likelihood (cached tokens)",
        "coca likelihood (from images)",
        "blip-itm (from images)",
    }
    assert len(data["load_average"]) == 3
    code = main(["eval-retrieval", str(folder), "--split", "all", "--model", CLIP_TINY, "--pretrained", "none"])
    assert code == 2 and "--rerank-model" in capsys.readouterr().err
