"""The torch-free rerank (:mod:`cocatk.models.onnx.decoder`): the exported decoder reproduces open_clip's own
decoder and cocatk's torch rerank, a default search from cached tokens runs it without importing torch and orders the
hits as ``--backend torch`` does, and every way it cannot run leaves the search on torch, saying why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cocatk import load_model
from cocatk.models import onnx as textonnx
from cocatk.models.onnx import decoder as decoderonnx
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index

DATA = Path(__file__).parent / "data"
#: The issue's fidelity bound for a faster rerank: caption log-likelihood within this many nats per scored token.
NATS_PER_TOKEN = 0.05


@pytest.fixture(autouse=True)
def _onnx_on(monkeypatch, onnx_cache):
    monkeypatch.setenv("COCATK_TEXT_ONNX", "1")  # conftest turns it off for the rest of the suite
    monkeypatch.setenv("COCATK_CACHE", str(onnx_cache))


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


def _queries() -> list[str]:
    """20 queries: the demo's caption grammar, near misses, one word, a long one, odd characters."""
    from cocatk.demo.scenes import COLOURS, SHAPES

    colours, shapes = list(COLOURS)[:4], list(SHAPES)[:3]
    texts = [f"a {c} {s}" for c in colours for s in shapes][:12]
    texts += [f"a {colours[0]} {shapes[0]} left of a {colours[1]} {shapes[1]}", "a photo", "circle", "x"]
    texts += ["two small blue squares next to a big red circle on a plain background", "Café 🐕 &amp; 東京"]
    texts += [f"a {colours[2]} {shapes[2]} above a {colours[3]} {shapes[0]}", "nothing at all"]
    return texts[:20]


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, onnx_cache):
    """A demo index built by a plain Index.update (the default: tokens cached, text tower and decoder exported)."""
    from cocatk.demo.scenes import generate_folder

    mp = pytest.MonkeyPatch()
    mp.setenv("COCATK_CACHE", str(onnx_cache))
    mp.setenv("COCATK_TEXT_ONNX", "1")
    try:
        root = tmp_path_factory.mktemp("demo-rerank-onnx")
        generate_folder(root / "photos", n=80, seed=7, min_size=96, max_size=160)
        with Index.open(root / "index", model="demo", device="cpu", precision="fp32", create=True) as ix:
            report = ix.update([root / "photos"], workers=0)
            assert report.text_export in ("exported", None) and not report.warnings
            assert ix.manifest["cache_tokens"] is True and report.token_cache_bytes > 0
    finally:
        mp.undo()
    return root


@pytest.mark.parametrize("config", ["demo", "coca_tiny.json"])
def test_decoder_equals_open_clips_decoder_and_the_torch_rerank(config):
    """Through the whole ONNX path (tokenizer, text graph, decoder graph) against open_clip's own unfolded decoder
    forward and against cocatk's torch rerank, on 20 texts over real image tokens."""
    from PIL import Image

    model = load_model(config, device="cpu", precision="fp32") if config == "demo" else (
        load_model(str(DATA / config), "none", device="cpu", precision="fp32")
    )  # fmt: skip
    assert textonnx.export_text_onnx(model) is not None
    engine = textonnx.open_text_onnx(model.spec.identity())
    assert engine.can_rerank
    meta = textonnx.read_meta(model.spec.identity())
    assert meta["decoder"]["max_nats_per_token"] <= decoderonnx.MAX_NATS_PER_TOKEN
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)) for _ in range(7)]
    tokens = model.image_tokens(images).half()
    oc = model.model
    for text in _queries():
        ids = model._caption_ids(text)
        with torch.inference_mode():
            embs = oc.text(ids)[1][:, :-1]
        ref = decoderonnx.reference_loglik(oc.text_decoder, embs, ids[:, 1:], tokens)  # open_clip's forward
        mine = model.caption_loglik(text, tokens)  # cocatk's torch rerank (folded)
        got = engine.caption_loglik(text, tokens.numpy())
        steps = engine.caption_token_count(text)
        assert steps == model.caption_token_count(text)
        assert got.dtype == np.float64 and got.shape == (7,)
        assert np.abs(got - ref).max() / steps <= 1e-3, text
        assert np.abs(got - mine).max() / steps <= 1e-3, text
        assert list(np.argsort(-got, kind="stable")) == list(np.argsort(-mine, kind="stable")), text
    assert engine.caption_loglik("a red circle", tokens[:0].numpy()).shape == (0,)


def test_default_search_reranks_in_onnx_and_orders_as_torch(demo_index):
    """The default search of an index that a plain `Index.update` built: ONNX Runtime for stage 1 and the rerank,
    the same top 10 as `--backend torch` (fp32), log-likelihoods within the bound."""
    diffs = []
    for q in _queries():
        with Index.open(demo_index / "index") as ix:
            fast = search_index(ix, q, n=10)
        with Index.open(demo_index / "index", precision="fp32") as ix:
            ref = search_index(ix, q, n=10, backend="torch")
            steps = ix.model.caption_token_count(q)
        assert fast.model["backend"] == "onnxruntime" and fast.reranked and fast.tokens_from == "cache", q
        assert ref.model.get("backend") is None and ref.reranked
        assert [h.id for h in fast.hits] == [h.id for h in ref.hits], q
        diffs += [abs(a.loglik - b.loglik) / steps for a, b in zip(fast.hits, ref.hits, strict=True)]
    assert max(diffs) <= NATS_PER_TOKEN


def test_cold_default_search_imports_no_torch(demo_index):
    """A whole `cocatk search TEXT` process (the default rerank): torch and open_clip never imported, the hits of
    the torch path."""
    q = _queries()[0]
    code = (
        "import sys\n"
        "from cocatk.cli import main\n"
        f"rc = main(['search', {q!r}, '--index', {str(demo_index / 'index')!r}, '--json', '-n', '5'])\n"
        "print('TORCH', 'torch' in sys.modules, 'open_clip' in sys.modules, rc, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert "TORCH False False 0" in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["reranked"] and out["tokens_from"] == "cache" and out["model"]["backend"] == "onnxruntime"
    with Index.open(demo_index / "index", precision="fp32") as ix:
        ref = search_index(ix, q, n=5, backend="torch")
    assert [h["id"] for h in out["hits"]] == [h.id for h in ref.hits]


def test_without_cached_tokens_torch_reranks_and_says_so_first(demo_index):
    """--no-cache-tokens at query time: the rerank computes tokens from the files (torch), told before the wait
    with the count and the fix, with progress; same hits as the cached path."""
    said, steps = [], []
    q = _queries()[1]
    with Index.open(demo_index / "index", precision="fp32") as ix:
        files = search_index(ix, q, n=5, use_token_cache=False, notify=said.append,
                             progress=lambda *a: steps.append(a))  # fmt: skip
        cached = search_index(ix, q, n=5, backend="torch")
    assert files.tokens_from == "files" and files.reranked
    assert len(said) == 1 and "50 candidates" in said[0] and "--no-cache-tokens" in said[0]
    assert steps[0] == ("rerank-tokens", 0, 50) and steps[-1] == ("rerank-tokens", 50, 50)
    assert [h.id for h in files.hits] == [h.id for h in cached.hits]


def test_index_without_tokens_is_told_the_fix(tmp_path):
    from cocatk.demo.scenes import generate_folder

    generate_folder(tmp_path / "photos", n=12, seed=2, min_size=64, max_size=96)
    said = []
    with Index.open(tmp_path / "index", model="demo", create=True) as ix:
        ix.update([tmp_path / "photos"], workers=0, cache_tokens=False)
        assert ix.manifest["cache_tokens"] is False and ix.store.token_bytes() == 0
        assert ix.manifest["max_megapixels"] == 100.0  # what the rerank re-decodes with
        r = search_index(ix, "a red circle", n=3, notify=said.append)
    assert r.tokens_from == "files" and r.model.get("backend") is None  # no tokens: the rerank is torch's
    assert "--cache-tokens" in said[0] and "this index stores no tokens" in said[0]
    with Index.open(tmp_path / "index") as ix:  # later default runs keep the choice; --cache-tokens backfills
        assert ix.update(workers=0).encoded == 0 and ix.manifest["cache_tokens"] is False
        told = []
        report = ix.update(workers=0, cache_tokens=True, notify=told.append)
        assert report.encoded == 12 and ix.store.token_bytes() == report.token_cache_bytes > 0
        assert "12 indexed images" in told[0] and "at this index's last rate" in told[0]


def test_a_dual_encoder_index_caches_nothing_and_a_big_default_cache_is_left_out(tmp_path):
    from cocatk.demo.scenes import generate_folder

    generate_folder(tmp_path / "photos", n=6, seed=2, min_size=64, max_size=96)
    with Index.open(tmp_path / "clip", model=str(DATA / "clip_tiny.json"), pretrained="none", create=True) as ix:
        ix.update([tmp_path / "photos"], workers=0)
        assert ix.manifest["cache_tokens"] is False
    with Index.open(tmp_path / "coca", model="demo", create=True) as ix:
        report = ix.update([tmp_path / "photos"], workers=0, token_cache_limit_gb=1e-6)
        assert report.encoded == 6 and ix.ntotal == 6  # indexed all the same
        assert ix.manifest["cache_tokens"] is False and ix.store.token_bytes() == 0
        assert any("not cached" in w and "--token-cache-limit" in w for w in report.warnings)


def test_a_new_export_removes_the_older_ones_of_the_same_model(onnx_cache):
    model = load_model(str(DATA / "coca_tiny.json"), "none", device="cpu", precision="fp32")
    identity = model.spec.identity()
    parent = textonnx.cache_folder(identity).parent
    old = parent / "older-format"
    other = parent / "another-model"
    for folder, ident in ((old, identity), (other, {**identity, "weights": "sha256:other"})):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(json.dumps({"format": 2, "identity": ident}))
        (folder / "text.onnx.data").write_bytes(b"0" * 1000)
    textonnx.remove_export(identity)
    assert textonnx.export_text_onnx(model) is not None
    assert not old.exists() and other.exists()


def test_a_decoder_that_cannot_be_exported_keeps_the_text_tower_and_a_torch_rerank(tmp_path, monkeypatch):
    from cocatk.demo.scenes import generate_folder

    def broken(*args, **kwargs):
        raise RuntimeError("no ONNX form for aten::something")

    monkeypatch.setenv("COCATK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(decoderonnx, "export_decoder", broken)
    generate_folder(tmp_path / "photos", n=6, seed=2, min_size=64, max_size=96)
    with Index.open(tmp_path / "index", model=str(DATA / "coca_tiny.json"), pretrained="none", create=True) as ix:
        assert ix.update([tmp_path / "photos"], workers=0).text_export == "exported"
        meta = textonnx.read_meta(ix.manifest["identity"])
        assert "decoder" not in meta and "aten::something" in meta["decoder_error"]
        assert not (textonnx.cache_folder(ix.manifest["identity"]) / decoderonnx.GRAPH).exists()
    with Index.open(tmp_path / "index") as ix:
        assert search_index(ix, "a red circle", n=3, rerank=False).model["backend"] == "onnxruntime"
    with Index.open(tmp_path / "index") as ix:
        r = search_index(ix, "a red circle", n=3)
        assert r.reranked and r.model.get("backend") is None and r.tokens_from == "cache"  # torch, from the cache


def test_a_damaged_decoder_graph_is_an_unreadable_export(demo_index, tmp_path):
    import shutil

    from cocatk.errors import ExportUnreadableError

    with Index.open(demo_index / "index") as ix:
        folder = textonnx.cache_folder(ix.manifest["identity"])
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / decoderonnx.GRAPH).write_bytes(b"half a graph")
    engine = textonnx.TextOnnx(copy, textonnx.read_meta(json.loads((copy / "meta.json").read_text())["identity"]))
    with pytest.raises(ExportUnreadableError, match="cocatk index"):
        engine.caption_loglik("a red circle", np.zeros((1, *engine.meta["decoder"]["token_shape"]), np.float16))


def test_a_damaged_decoder_found_by_a_search_is_removed_and_torch_reranks(tmp_path, monkeypatch):
    from cocatk.demo.scenes import generate_folder

    monkeypatch.setenv("COCATK_CACHE", str(tmp_path / "cache"))
    generate_folder(tmp_path / "photos", n=8, seed=4, min_size=64, max_size=96)
    with Index.open(tmp_path / "index", model=str(DATA / "coca_tiny.json"), pretrained="none", create=True) as ix:
        ix.update([tmp_path / "photos"], workers=0)
        folder = textonnx.cache_folder(ix.manifest["identity"])
    with Index.open(tmp_path / "index", precision="fp32") as ix:
        ref = search_index(ix, "a red circle", n=4, backend="torch")
    (folder / decoderonnx.GRAPH).write_bytes(b"half a graph")
    with Index.open(tmp_path / "index", precision="fp32") as ix:
        r = search_index(ix, "a red circle", n=4)
    assert r.reranked and any("cannot be loaded" in w and "removed" in w for w in r.warnings)
    assert [h.id for h in r.hits] == [h.id for h in ref.hits] and not folder.exists()


@pytest.mark.parametrize("config", ["demo", "clip_tiny.json"])
def test_image_tower_equals_torch_fp32(config, tmp_path):
    """The exported image tower (resize and crop in PIL, the arithmetic in the graph) against torch's float32
    encode_images of open_clip's own transform, on photos of several shapes and modes."""
    from PIL import Image

    model = load_model(config, device="cpu", precision="fp32") if config == "demo" else (
        load_model(str(DATA / config), "none", device="cpu", precision="fp32")
    )  # fmt: skip
    assert textonnx.export_text_onnx(model) is not None
    engine = textonnx.open_text_onnx(model.spec.identity())
    assert engine.can_embed_images
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((31, 200), (300, 97))]
    images += [
        Image.new("RGB", (model.image_size, model.image_size), (10, 200, 40)),
        images[0].convert("L").convert("RGB"),
    ]
    got, ref = engine.encode_images(images), model.encode_images(images)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5
    assert engine.encode_images([]).shape == (0, model.embed_dim)


def test_image_tower_of_a_bf16_model_exports_in_fp32(tmp_path, monkeypatch):
    """A model loaded in bf16 (the CPU default where AMX is) still exports its image tower: it is exported and checked
    in float32 (ONNX Runtime's CPU Conv takes no bfloat16; this export once failed to load for that reason), and the
    model's own tower stays bf16."""
    import torch
    from PIL import Image

    monkeypatch.setenv("COCATK_CACHE", str(tmp_path / "cache"))
    model = load_model(str(DATA / "clip_tiny.json"), "none", device="cpu", precision="bf16")
    model.encode_images([Image.new("RGB", (40, 40))])  # the image tower becomes bf16 at its first use
    assert next(model.model.visual.parameters()).dtype == torch.bfloat16
    assert textonnx.export_text_onnx(model) is not None
    meta = textonnx.read_meta(model.spec.identity())
    assert "image_error" not in meta and meta["image"]["max_abs_diff"] <= 1e-4
    assert next(model.model.visual.parameters()).dtype == torch.bfloat16
    images = [Image.new("RGB", (50, 70), (10, 200, 40)), Image.new("RGB", (90, 40), (200, 20, 40))]
    got = textonnx.open_text_onnx(model.spec.identity()).encode_images(images)
    # The graph holds the bf16-rounded weights in float32: the same as the bf16 tower within bf16's arithmetic.
    cosine = (got * model.encode_images(images)).sum(axis=1)
    assert cosine.min() >= 0.999, cosine


def test_cold_image_query_imports_no_torch_and_finds_torchs_hits(demo_index):
    photo = sorted((demo_index / "photos").glob("*.jpg"))[3]
    code = (
        "import sys\n"
        "from cocatk.cli import main\n"
        f"rc = main(['search', '--image', {str(photo)!r}, '--index', {str(demo_index / 'index')!r}, '--json'])\n"
        "print('TORCH', 'torch' in sys.modules, 'open_clip' in sys.modules, rc, file=sys.stderr)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert "TORCH False False 0" in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["model"]["backend"] == "onnxruntime" and not out["reranked"]
    with Index.open(demo_index / "index", precision="fp32") as ix:
        ref = search_index(ix, image=str(photo), n=10, backend="torch")
    assert [h["id"] for h in out["hits"]] == [h.id for h in ref.hits]
    assert np.allclose([h["similarity"] for h in out["hits"]], [h.similarity for h in ref.hits], atol=1e-5)
    with Index.open(demo_index / "index") as ix:  # a loaded torch model answers the process's later queries
        ix.model  # noqa: B018
        assert search_index(ix, image=str(photo), n=3).model.get("backend") is None
