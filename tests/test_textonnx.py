"""The torch-free text query path (:mod:`cocatk.models.onnx`): the export reproduces open_clip's tokens and torch's fp32
embeddings, a search through it returns what the torch path returns, a cold text query imports no torch, and every
way the export can be missing or fail leaves the index whole and the query on the torch path."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cocatk import load_model
from cocatk.errors import ExportError, UsageError
from cocatk.models import onnx as textonnx
from cocatk.models.onnx import cache as export_cache
from cocatk.models.onnx import export as onnx_export
from cocatk.models.onnx.text import forget_open_engines
from cocatk.retrieval import Index

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _onnx_on(monkeypatch):
    monkeypatch.setenv("COCATK_TEXT_ONNX", "1")  # conftest turns it off for the rest of the suite


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """One cache folder for the module, so each model is exported once."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture
def cache(onnx_cache, monkeypatch):
    monkeypatch.setenv("COCATK_CACHE", str(onnx_cache))
    return onnx_cache


@pytest.fixture(scope="module")
def demo():
    return load_model("demo", device="cpu", precision="fp32")


def _corpus() -> list[str]:
    """Texts a tokenizer can get wrong: every ImageNet class in three templates, the export probes, and seeded random
    strings over ASCII, Latin accents, CJK, Cyrillic, Arabic, emoji, entities and whitespace."""
    from open_clip import IMAGENET_CLASSNAMES

    texts = [t.format(c) for c in IMAGENET_CLASSNAMES for t in ("a photo of a {}.", "{}", "a {}'s toy, isn't it?")]
    texts += list(textonnx.PROBES)
    rng = random.Random(0)
    pieces = [*"abcXYZ019 .,;:'!?-_/()[]&#\t\n", "&amp;", "&lt;", "é", "ñ", "ß", "İ", "東京", "ночь", "قطة", "🐕",
              "\u200d", "\xa0", "ﬁ", "Ａ", "'s", "'LL", "â€™", "<end_of_text>"]  # fmt: skip
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(400)]
    # what a shell hands over: bytes that are not UTF-8 (surrogate escapes), NUL, terminal escapes, Unicode newlines
    texts += [b"caf\xe9 \xff".decode("utf-8", "surrogateescape"), "\ud800 x", "a\x00b", "\x1b[31mred", "\u2028line", ""]
    return texts


def test_tokenizer_equals_open_clips(demo, cache):
    folder = textonnx.export_text_onnx(demo)
    assert folder is not None
    engine = textonnx.open_text_onnx(demo.spec.identity())
    texts = _corpus()
    ref = demo.tokenize(texts).numpy()
    got = engine.tokenize(texts)
    bad = [t for t, a, b in zip(texts, ref, got, strict=True) if not np.array_equal(a, b)]
    assert not bad, bad[:5]


@pytest.mark.parametrize("config", ["demo", "coca_tiny.json", "clip_tiny.json", "sigmoid_tiny.json"])
def test_embeddings_equal_torch_fp32(cache, config):
    """CoCa (its CLS-token text tower), CLIP (EOT pooling) and a sigmoid model (last-token pooling)."""
    model = load_model(config, device="cpu", precision="fp32") if config == "demo" else (
        load_model(str(DATA / config), "none", device="cpu", precision="fp32")
    )  # fmt: skip
    assert textonnx.export_text_onnx(model) is not None
    engine = textonnx.open_text_onnx(model.spec.identity())
    texts = ["a red bicycle", "two dogs on a beach at sunset", "!", "word " * 90, "Café 東京 🐕"]
    a, b = model.encode_texts(texts), engine.encode_texts(texts)
    assert a.shape == b.shape and b.dtype == np.float32 and b.flags.c_contiguous
    assert np.abs(a - b).max() <= 1e-5
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)
    assert engine.encode_texts([]).shape == (0, model.embed_dim)
    meta = textonnx.read_meta(model.spec.identity())
    assert meta["max_abs_diff"] <= textonnx.MAX_ABS_DIFF
    assert engine.info() == {**model.info(), "backend": "onnxruntime"}
    assert engine.notices() == model.notices()


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, onnx_cache):
    """A demo index built by Index.update with the export on (it exports at the end of the run)."""
    from cocatk.demo.scenes import generate_folder

    mp = pytest.MonkeyPatch()
    mp.setenv("COCATK_CACHE", str(onnx_cache))
    mp.setenv("COCATK_TEXT_ONNX", "1")
    try:
        root = tmp_path_factory.mktemp("demo-onnx")
        records = generate_folder(root / "photos", n=60, seed=5, min_size=96, max_size=160)
        ix = Index.open(root / "index", model="demo", device="cpu", precision="fp32", create=True)
        report = ix.update([root / "photos"], workers=0)
        ix.close()
    finally:
        mp.undo()
    assert not report.warnings and report.text_export in ("exported", None)  # None: an earlier test exported demo
    return root / "index", sorted({r["caption"] for r in records})[:10]


def test_index_exports_and_search_matches_torch(demo_index, cache):
    from cocatk.retrieval.search import search_index

    folder, queries = demo_index
    identity = json.loads((folder / "manifest.json").read_text())["identity"]
    assert textonnx.read_meta(identity)["identity"] == identity
    for q in queries:
        with Index.open(folder, precision="fp32") as ix:
            auto = search_index(ix, q, n=10, rerank=False)
        with Index.open(folder, precision="fp32") as ix:
            torch_ = ix.search(q, n=10, rerank=False, backend="torch")
        assert auto.model["backend"] == "onnxruntime"
        assert [h.id for h in auto.hits] == [h.id for h in torch_]
        assert np.allclose([h.similarity for h in auto.hits], [h.similarity for h in torch_], atol=1e-5)


def test_auto_keeps_torch_where_torch_loads_anyway(demo_index, cache):
    from cocatk.retrieval.search import search_index

    folder, queries = demo_index
    with Index.open(folder) as ix:
        # a rerank that needs torch (tokens from the files) loads it, and then torch answers this process's queries
        assert search_index(ix, queries[0], n=3, use_token_cache=False).model.get("backend") is None
        assert search_index(ix, queries[0], n=3, rerank=False).model.get("backend") is None  # torch is loaded now
    with Index.open(folder) as ix:  # from the cached tokens (the default), the rerank is ONNX Runtime's too
        r = search_index(ix, queries[0], n=3)
        assert r.model["backend"] == "onnxruntime" and r.reranked and r.tokens_from == "cache"
    with Index.open(folder, precision="bf16") as ix:  # a precision asked for by name is torch's
        assert search_index(ix, queries[0], n=3, rerank=False).model.get("backend") is None
    for var, value in (("COCATK_PRECISION", "bf16"), ("COCATK_DEVICE", "cuda")):  # or named in the environment
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(var, value)
            with Index.open(folder) as ix:
                engine = textonnx.open_text_onnx(ix.manifest["identity"])
                from cocatk.retrieval.search import _onnx_saves_torch

                assert engine is not None and not _onnx_saves_torch(ix, engine, False, "coca", None, None)
    with Index.open(folder) as ix:  # backend onnx with a rerank from files: stage 1 through ONNX, the rerank torch
        r = search_index(ix, queries[0], n=3, rerank=True, backend="onnx", use_token_cache=False)
        assert r.reranked and r.model["backend"] == "onnxruntime" and r.rerank_model is None
        assert r.tokens_from == "files"


def test_backend_errors(demo_index, cache, tmp_path, monkeypatch):
    from cocatk.retrieval.search import search_index

    folder, queries = demo_index
    with Index.open(folder) as ix:
        with pytest.raises(UsageError, match="unknown backend"):
            search_index(ix, queries[0], backend="tensorrt")
        # the backend is about text alone: a stored-vector query ignores it ($COCATK_BACKEND=onnx must not break it)
        assert search_index(ix, like_id=1, n=2, backend="onnx").model.get("backend") is None
    monkeypatch.setenv("COCATK_CACHE", str(tmp_path / "empty-cache"))
    with Index.open(folder) as ix, pytest.raises(UsageError, match="cocatk index"):
        search_index(ix, queries[0], rerank=False, backend="onnx")


def test_cold_text_query_imports_no_torch(demo_index, cache):
    """A whole `cocatk search --no-rerank` process: the hits of the torch path, and torch never imported."""
    folder, queries = demo_index
    code = (
        "import sys, json\n"
        "from cocatk.cli import main\n"
        f"rc = main(['search', {queries[0]!r}, '--index', {str(folder)!r}, '--no-rerank', '--json', '-n', '5'])\n"
        "print('TORCH', 'torch' in sys.modules, 'open_clip' in sys.modules, rc, file=sys.stderr)\n"
    )
    env = {**os.environ, "COCATK_CACHE": str(cache), "COCATK_PRECISION": "fp32"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "TORCH False False 0" in r.stderr, r.stderr
    out = json.loads(r.stdout)
    assert out["model"]["backend"] == "onnxruntime"
    with Index.open(folder, precision="fp32") as ix:
        ref = ix.search(queries[0], n=5, rerank=False, backend="torch")
    assert [h["id"] for h in out["hits"]] == [h.id for h in ref]


def test_unsupported_tokenizer_is_recorded_and_skipped(cache, monkeypatch):
    import open_clip.tokenizer as oct

    model = load_model(str(DATA / "clip_tiny.json"), "none", device="cpu")
    monkeypatch.setattr(model.tokenizer, "clean_fn", oct._clean_whitespace)
    monkeypatch.setattr(export_cache, "cache_folder", lambda identity: cache / "unsupported")
    assert textonnx.export_text_onnx(model) is None
    assert "tokenizer" in textonnx.read_meta(model.spec.identity())["error"]
    assert textonnx.open_text_onnx(model.spec.identity()) is None
    assert textonnx.export_text_onnx(model) is None  # recorded: not tried again


def test_failed_check_is_a_warning_and_the_index_is_whole(tmp_path, monkeypatch):
    """An export that does not match torch is refused (nothing kept but the record), the run's report says so in one
    line, the index is complete, and text queries keep the torch path."""
    from cocatk.demo.scenes import generate_folder

    monkeypatch.setattr(onnx_export, "MAX_ABS_DIFF", -1.0)
    generate_folder(tmp_path / "photos", n=6, seed=1, min_size=64, max_size=96)
    with Index.open(tmp_path / "index", model=str(DATA / "coca_tiny.json"), pretrained="none", create=True) as ix:
        report = ix.update([tmp_path / "photos"], workers=0)
        assert report.encoded == 6 and ix.ntotal == 6
        assert len(report.warnings) == 1 and "differs from torch" in report.warnings[0]
        assert report.text_export == "failed"
        identity = ix.manifest["identity"]
        folder = textonnx.cache_folder(identity)
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json"]
        assert ix.search("a red circle", n=3, rerank=False).__len__() == 3
    with Index.open(tmp_path / "index") as ix:
        report = ix.update(workers=0)  # recorded: no second try
        assert not report.warnings and "text_onnx" not in report.timings and report.text_export is None


def test_unwritable_cache_is_an_export_error_and_not_recorded(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        monkeypatch.setattr(onnx_export, "_write_graph", _raise_oserror)
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
    monkeypatch.setenv("COCATK_CACHE", str(tmp_path / "ro"))
    model = load_model(str(DATA / "coca_tiny.json"), "none", device="cpu")
    with pytest.raises(ExportError, match="COCATK_CACHE"):
        textonnx.export_text_onnx(model)
    assert textonnx.read_meta(model.spec.identity()) is None  # a full disk is not a verdict on the model


def _raise_oserror(*args):
    raise OSError(28, "No space left on device")


def test_corrupt_record_reads_as_none_and_is_redone(cache, monkeypatch, tmp_path):
    model = load_model(str(DATA / "coca_tiny.json"), "none", device="cpu")
    monkeypatch.setattr(export_cache, "cache_folder", lambda identity: tmp_path / "x")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "meta.json").write_text("{not json")
    (tmp_path / "x" / "text.onnx").write_text("half a file")
    assert textonnx.read_meta(model.spec.identity()) is None
    assert textonnx.open_text_onnx(model.spec.identity()) is None
    assert textonnx.export_text_onnx(model) == tmp_path / "x"
    engine = textonnx.open_text_onnx(model.spec.identity())
    assert np.abs(engine.encode_texts(["a cat"]) - model.encode_texts(["a cat"])).max() <= 1e-5


def test_switched_off(tmp_path, monkeypatch):
    from cocatk.demo.scenes import generate_folder

    monkeypatch.setenv("COCATK_TEXT_ONNX", "0")
    generate_folder(tmp_path / "photos", n=3, seed=1, min_size=64, max_size=96)
    with Index.open(tmp_path / "index", model=str(DATA / "coca_tiny.json"), pretrained="none", create=True) as ix:
        ix.update([tmp_path / "photos"], workers=0)
        assert textonnx.read_meta(ix.manifest["identity"]) is None


def test_cli_index_info_search(tmp_path, capsys):
    """`cocatk index` says it exported, `cocatk info` says which path text queries take, `cocatk search` reports
    the backend it ran."""
    from cocatk.cli import main
    from cocatk.demo.scenes import generate_folder

    generate_folder(tmp_path / "photos", n=4, seed=2, min_size=64, max_size=96)
    index = str(tmp_path / "index")
    model = ["--model", str(DATA / "coca_tiny.json"), "--pretrained", "none"]
    assert main(["index", str(tmp_path / "photos"), "--index", index, *model]) == 0
    assert "exported the model to ONNX for searches without torch" in capsys.readouterr().out
    assert main(["info", "--index", index]) == 0
    shown = capsys.readouterr().out
    assert "text queries  ONNX Runtime, without torch" in shown and "the rerank from cached tokens too" in shown
    assert main(["info", "--index", index, "--json"]) == 0
    text_queries = json.loads(capsys.readouterr().out)["text_queries"]
    assert text_queries["backend"] == "onnxruntime" and text_queries["rerank"]["backend"] == "onnxruntime"
    assert text_queries["images"]["backend"] == "onnxruntime"
    assert main(["search", "a red circle", "--index", index, "--json"]) == 0  # the default search: no torch either
    out = json.loads(capsys.readouterr().out)
    assert out["model"]["backend"] == "onnxruntime" and out["reranked"] and out["tokens_from"] == "cache"
    assert main(["search", "a red circle", "--index", index, "--no-rerank", "--json", "--backend", "onnx"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["backend"] == "onnxruntime"
    assert main(["search", "a red circle", "--index", index, "--json", "--backend", "bogus"]) == 2
    assert "unknown backend 'bogus'" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "photos"), "--index", index, *model]) == 0
    assert "exported" not in capsys.readouterr().out  # once per model


def test_broken_export_falls_back_to_torch_and_is_removed(tmp_path, monkeypatch):
    """A truncated weights file: auto answers through torch with a one-line warning and removes the export (the next
    index run makes it again); --backend onnx fails with the fix."""
    from cocatk.demo.scenes import generate_folder
    from cocatk.retrieval.search import search_index

    generate_folder(tmp_path / "photos", n=4, seed=3, min_size=64, max_size=96)
    with Index.open(tmp_path / "index", model=str(DATA / "coca_tiny.json"), pretrained="none", create=True) as ix:
        assert ix.update([tmp_path / "photos"], workers=0).text_export == "exported"
        identity = ix.manifest["identity"]
    weights = textonnx.cache_folder(identity) / export_cache.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with Index.open(tmp_path / "index") as ix, pytest.raises(ExportError, match="cannot be loaded"):
        search_index(ix, "a red circle", rerank=False, backend="onnx")
    with Index.open(tmp_path / "index") as ix:
        r = search_index(ix, "a red circle", n=2, rerank=False)
        assert r.model.get("backend") is None and len(r.hits) == 2
        assert any("cannot be loaded" in w and "exports it again" in w for w in r.warnings)
    assert textonnx.read_meta(identity) is None
    with Index.open(tmp_path / "index") as ix:
        assert ix.update(workers=0).text_export == "exported"


def test_exporter_failure_is_recorded_with_versions_and_retried_when_they_change(cache, monkeypatch, tmp_path):
    """An error of the exporter itself (not an OSError) is an ExportError, recorded with the package versions: not
    tried again until one of them changes."""
    model = load_model(str(DATA / "clip_tiny.json"), "none", device="cpu")
    monkeypatch.setattr(export_cache, "cache_folder", lambda identity: tmp_path / "x")

    def boom(*args):
        raise RuntimeError("Exporting the operator 'aten::frobnicate' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(onnx_export, "_write_graph", boom)
    with pytest.raises(ExportError, match="aten::frobnicate"):
        textonnx.export_text_onnx(model)
    meta = textonnx.read_meta(model.spec.identity())
    assert "frobnicate" in meta["error"] and meta["versions"]["onnxruntime"] != "absent"
    assert not textonnx.needs_export(model.spec.identity())
    assert textonnx.export_text_onnx(model) is None  # recorded: not tried again
    monkeypatch.setattr(export_cache, "versions", lambda: {**meta["versions"], "torch": "9.9"})
    assert textonnx.needs_export(model.spec.identity())
    monkeypatch.undo()
    monkeypatch.setattr(export_cache, "cache_folder", lambda identity: tmp_path / "x")
    monkeypatch.setattr(export_cache, "versions", lambda: {**meta["versions"], "torch": "9.9"})
    assert textonnx.export_text_onnx(model) == tmp_path / "x"  # the newer versions export it


def test_weights_changed_since_indexing_is_not_exported(tmp_path, monkeypatch):
    monkeypatch.setenv("COCATK_CACHE", str(tmp_path))
    model = load_model(str(DATA / "coca_tiny.json"), "none", device="cpu")
    recorded = {**model.spec.identity(), "weights": "sha256:0000"}
    with pytest.raises(ExportError, match="changed since the index was built"):
        textonnx.export_text_onnx(model, recorded)
    assert textonnx.read_meta(model.spec.identity()) is None and textonnx.read_meta(recorded) is None


def test_a_gpu_model_is_exported_from_a_cpu_copy(cache, monkeypatch, tmp_path):
    """The export path for a model on a GPU traces a float32 CPU copy (here the model is on the CPU and only claims
    a GPU, which exercises the copy)."""
    model = load_model(str(DATA / "coca_tiny.json"), "none", device="cpu")
    monkeypatch.setattr(export_cache, "cache_folder", lambda identity: tmp_path / "gpu")
    monkeypatch.setattr(model, "device", "cuda:0")
    latent, module, device = onnx_export._fp32_cpu_text(model)
    assert device == "cuda:0" and module is not model.model
    assert textonnx.export_text_onnx(model) is not None
    meta = textonnx.read_meta(model.spec.identity())
    assert meta["traced_on"] == "cuda:0" and meta["max_abs_diff"] <= 1e-5


def test_broken_onnxruntime_install_keeps_torch_and_the_export(demo_index, cache, monkeypatch, tmp_path):
    from cocatk.retrieval.search import search_index

    folder, queries = demo_index
    forget_open_engines()  # a fresh process: no session of an earlier test's query is held
    # An installed onnxruntime whose import fails (as with a missing shared library).
    (tmp_path / "onnxruntime").mkdir()
    (tmp_path / "onnxruntime" / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "onnxruntime" or m.startswith("onnxruntime.")]:
        monkeypatch.delitem(sys.modules, name)
    with Index.open(folder) as ix:
        r = search_index(ix, queries[0], n=3, rerank=False)
        identity = ix.manifest["identity"]
    assert r.model.get("backend") is None and any("cannot be imported" in w for w in r.warnings)
    assert textonnx.read_meta(identity) is not None  # the files were fine: kept


def test_dual_encoder_index_with_default_rerank_takes_onnx(tmp_path):
    """A CLIP index has no decoder to rerank with: the default search only warns, so auto takes the export, and the
    hits equal torch's."""
    from cocatk.demo.scenes import generate_folder
    from cocatk.retrieval.search import search_index

    generate_folder(tmp_path / "photos", n=6, seed=4, min_size=64, max_size=96)
    with Index.open(tmp_path / "index", model=str(DATA / "clip_tiny.json"), pretrained="none", create=True) as ix:
        assert ix.update([tmp_path / "photos"], workers=0).text_export == "exported"
    with Index.open(tmp_path / "index") as ix:
        fast = search_index(ix, "a red circle", n=4)  # rerank=True by default
    with Index.open(tmp_path / "index") as ix:
        ref = search_index(ix, "a red circle", n=4, backend="torch")
    assert fast.model["backend"] == "onnxruntime" and not fast.reranked
    assert any(w.startswith("not reranked") for w in fast.warnings) and fast.warnings == ref.warnings
    assert [h.id for h in fast.hits] == [h.id for h in ref.hits]


def test_one_engine_per_export_answers_a_process(demo_index, cache):
    """A second query of a process reuses the loaded sessions; a new record (a re-export) opens a new engine."""
    folder, queries = demo_index
    with Index.open(folder) as ix:
        identity = ix.manifest["identity"]
    first = textonnx.open_text_onnx(identity)
    first.encode_texts(queries[:1])
    assert textonnx.open_text_onnx(identity) is first
    meta_file = textonnx.cache_folder(identity) / "meta.json"
    saved = meta_file.read_text()
    try:
        meta_file.write_text(json.dumps({**json.loads(saved), "created_at": "later"}))
        again = textonnx.open_text_onnx(identity)
        assert again is not first and again.meta["created_at"] == "later"
        np.testing.assert_array_equal(again.encode_texts(queries[:1]), first.encode_texts(queries[:1]))
    finally:
        meta_file.write_text(saved)


def test_older_exports_are_removed_but_never_one_being_written(demo, cache):
    """Issue 29: an exporter that finished first removed the temporary folder of another process exporting the same
    model (pathlib's ``*`` matches ``.<key>-*``), whose next write failed with 'No such file or directory'."""
    current = textonnx.export_text_onnx(demo)
    assert current is not None
    own = demo.spec.identity()
    record = json.loads((current / export_cache.META).read_text())
    older = current.parent / "0123456789abcdef01234567"  # an export made by an older open_clip or format
    being_written = current.parent / f".{current.name}-race"  # another process's, its record already written
    for folder in (older, being_written):
        folder.mkdir()
        (folder / export_cache.META).write_text(json.dumps({**record, "format": record["format"]}))
    assert export_cache.remove_older_exports(own) == [older]
    assert not older.exists() and being_written.is_dir() and current.is_dir()
    (being_written / export_cache.META).unlink()
    being_written.rmdir()


def test_two_processes_export_into_one_empty_cache(tmp_path):
    """Both finish, both get the export, and one valid folder is left (no temporary folder, no error)."""
    code = (
        "from cocatk import load_model\n"
        "from cocatk.models.onnx import export_text_onnx\n"
        "print(export_text_onnx(load_model('demo', device='cpu', precision='fp32')))\n"
    )
    env = {**os.environ, "COCATK_CACHE": str(tmp_path / "cache"), "COCATK_TEXT_ONNX": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    folders = {o[0].strip() for o in outs}
    assert len(folders) == 1 and Path(folders.pop()).is_dir()
    left = sorted(p.name for p in (tmp_path / "cache" / "text-onnx").iterdir())
    assert len(left) == 1 and not left[0].startswith("."), left
