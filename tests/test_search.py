"""Search: FAISS stage equals exact numpy top-k; rerank equals sorting by open_clip's caption loss; CLI outputs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG
from PIL import Image

from cocatk.cli import main
from cocatk.errors import EmptyIndexError, IndexMismatchError, UsageError
from cocatk.paths import file_url
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index

MODEL = str(TINY_CONFIG)


def _make_images(root: Path, n: int = 24) -> list[Path]:
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        folder = root / ("sub" if i % 3 == 0 else "top")
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40 + i, 56, 3), dtype=np.uint8)
        arr[: 10 + i % 20] = rng.integers(0, 255, 3)  # some structure, so images differ in more than noise
        path = folder / f"im{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(index dir, image root, files): an index over 24 images, decoder tokens cached."""
    root = tmp_path_factory.mktemp("search")
    files = _make_images(root / "photos")
    idx = Index.open(root / "idx", model=MODEL, pretrained="none", device="cpu", create=True)
    report = idx.update([root / "photos"], cache_tokens=True, workers=0)
    assert report.new == len(files)
    idx.close()
    return root / "idx", root / "photos", files


def _open(idx_dir: Path) -> Index:
    return Index.open(idx_dir, device="cpu")


def _numpy_topk(idx: Index, query: np.ndarray, n: int) -> tuple[list[int], np.ndarray]:
    ids = idx.store.ids()
    emb = idx.embeddings(ids)
    sims = emb @ query.ravel()
    order = np.argsort(-sims, kind="stable")[:n]
    return [int(ids[i]) for i in order], sims[order]


def test_first_stage_equals_numpy_topk(built):
    idx = _open(built[0])
    res = search_index(idx, text="a red bicycle", n=7, rerank=False)
    q = idx.model.encode_texts(["a red bicycle"])
    want_ids, want_sims = _numpy_topk(idx, q, 7)
    assert [h.id for h in res.hits] == want_ids
    np.testing.assert_allclose([h.similarity for h in res.hits], want_sims, atol=1e-5)
    assert all(h.loglik is None for h in res.hits) and not res.reranked
    assert [h.rank for h in res.hits] == list(range(1, 8))


def _loglik_via_open_clip(model, text: str, path: str) -> float:
    """Independent reference: open_clip's CoCa forward + CoCaLoss caption term on the decoded file."""
    from open_clip.loss import CoCaLoss

    from cocatk.images import load_image

    pixels = model.preprocess(load_image(path, draft_size=model.image_size))[None]
    ids = model.tokenize([text])
    count = len(model.tokenizer.encode(text)) + 1
    with torch.no_grad():
        out = model.model(pixels, ids)
        _, cap = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)(
            out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"]
        )
    return -cap.item() * count


@pytest.mark.parametrize("use_cache", [False, True])
def test_rerank_order_equals_sorting_by_open_clip_loglik(built, use_cache):
    idx = _open(built[0])
    text = "a photo of a dog"
    first = search_index(idx, text=text, n=8, rerank=False)
    res = search_index(idx, text=text, n=5, rerank=True, rerank_k=8, use_token_cache=use_cache)
    assert res.reranked and res.candidates == 8
    assert res.tokens_from == ("cache" if use_cache else "files")
    ref = {h.id: _loglik_via_open_clip(idx.model, text, h.path) for h in first.hits}
    want = sorted(ref, key=lambda i: -ref[i])[:5]
    assert [h.id for h in res.hits] == want
    tol = 0.05 if use_cache else 1e-3  # cached tokens are stored in fp16
    np.testing.assert_allclose([h.loglik for h in res.hits], [ref[i] for i in want], atol=tol)
    sims = {h.id: h.similarity for h in first.hits}
    assert all(abs(h.similarity - sims[h.id]) < 1e-6 for h in res.hits)  # both scores are reported


def test_negative_text_is_subtracted(built):
    idx = _open(built[0])
    res = search_index(idx, text="a red bicycle", negative=("a blue car", "noise"), n=5, rerank=False)
    m = idx.model
    q = m.encode_texts(["a red bicycle"])[0] - m.encode_texts(["a blue car", "noise"]).sum(0)
    q /= np.linalg.norm(q)
    assert [h.id for h in res.hits] == _numpy_topk(idx, q, 5)[0]


def test_image_query_finds_itself_and_skips_rerank(built):
    idx = _open(built[0])
    target = built[2][5]
    res = search_index(idx, image=target, n=3, rerank=True)
    assert not res.reranked and res.hits[0].path == str(target.resolve())
    assert res.hits[0].similarity == pytest.approx(1.0, abs=1e-4)


def test_text_plus_image_is_the_mean(built):
    idx = _open(built[0])
    target = built[2][4]
    res = search_index(idx, text="a cat", image=target, n=4, rerank=False)
    m = idx.model
    from cocatk.images import load_image

    t = m.encode_texts(["a cat"])[0]
    v = m.encode_images([load_image(target, draft_size=m.image_size)])[0]
    q = (t + v) / 2
    q /= np.linalg.norm(q)
    assert [h.id for h in res.hits] == _numpy_topk(idx, q, 4)[0]


def test_under_filters_and_still_returns_n(built):
    idx = _open(built[0])
    sub = built[1] / "sub"
    res = search_index(idx, text="a red bicycle", n=6, rerank=False, under=sub)
    assert len(res.hits) == 6  # 8 files live under sub/
    assert all(h.path.startswith(str(sub.resolve()) + "/") for h in res.hits)
    sub_ids = [i for i in idx.store.ids() if idx.store.paths_for_ids([i])[0].startswith(str(sub.resolve()))]
    q = idx.model.encode_texts(["a red bicycle"])[0]
    sims = idx.embeddings(sub_ids) @ q
    want = [int(sub_ids[i]) for i in np.argsort(-sims, kind="stable")[:6]]
    assert [h.id for h in res.hits] == want


def test_bad_arguments(built):
    idx = _open(built[0])
    with pytest.raises(UsageError, match="empty query"):
        search_index(idx, text="   ")
    with pytest.raises(UsageError, match="-n must be"):
        search_index(idx, text="dog", n=0)
    with pytest.raises(UsageError, match="no query"):
        search_index(idx)
    with pytest.raises(UsageError, match="no such folder"):
        search_index(idx, text="dog", under="/nonexistent/folder")


def test_empty_index(tmp_path):
    idx = Index.open(tmp_path / "empty", model=MODEL, pretrained="none", device="cpu", create=True)
    with pytest.raises(EmptyIndexError):
        search_index(idx, text="dog")


def test_other_model_is_refused(built, tmp_path):
    other = tmp_path / "coca_tiny_other.json"
    cfg = json.loads(TINY_CONFIG.read_text())
    cfg["vision_cfg"]["layers"] = 1
    other.write_text(json.dumps(cfg))
    with pytest.raises(IndexMismatchError) as e:
        Index.open(built[0], model=str(other), pretrained="none")
    assert "--rebuild" in e.value.hint


# ---- CLI ----------------------------------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_json_schema(built, capsys):
    code, out, _ = _cli(
        capsys,
        "search",
        "a red bicycle",
        "--index",
        str(built[0]),
        "-n",
        "4",
        "--rerank-k",
        "6",
        "--json",
        "--device",
        "cpu",
    )
    assert code == 0
    doc = json.loads(out)
    assert set(doc) >= {"query", "model", "timings_ms", "hits", "reranked"}
    assert doc["query"]["text"] == "a red bicycle" and doc["reranked"] is True
    assert set(doc["timings_ms"]) >= {"embed", "search", "rerank"}
    assert len(doc["hits"]) == 4
    for h in doc["hits"]:
        assert set(h) == {"rank", "id", "path", "similarity", "loglik", "caption"}
        assert isinstance(h["loglik"], float)
    assert [h["loglik"] for h in doc["hits"]] == sorted((h["loglik"] for h in doc["hits"]), reverse=True)


def test_cli_paths_and_html(built, capsys, tmp_path):
    code, out, _ = _cli(capsys, "search", "a dog", "--index", str(built[0]), "-n", "5", "--no-rerank", "--json")
    want = [h["path"] for h in json.loads(out)["hits"]]
    page = tmp_path / "hits.html"
    code, out, err = _cli(
        capsys, "search", "a dog", "--index", str(built[0]), "-n", "5", "--no-rerank", "--paths", "--html", str(page)
    )
    assert code == 0
    assert out.splitlines() == want
    text = page.read_text()
    assert text.startswith("<!doctype html>") and text.count("data:image/jpeg;base64,") == 5
    for p in want:
        assert f'data-path="{p}"' in text and f'href="{file_url(p)}"' in text
    assert "<dt>query</dt><dd>a dog</dd>" in text and f"<dt>index</dt><dd>{built[0]}</dd>" in text
    assert "<dt>model</dt>" in text and "rerank off" in text and "<dt>date</dt>" in text
    assert "random weights (--pretrained none): the scores carry no meaning" in text  # tiny test model
    assert f"wrote {page}" in err


def test_cli_html_folder_is_a_one_line_error(built, capsys, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    code, out, err = _cli(capsys, "search", "a dog", "--index", str(built[0]), "-n", "2", "--html", str(folder))
    assert code == 2 and "Traceback" not in err
    assert f"--html {folder} is a folder" in err and f"{folder}/results.html" in err
    assert os.listdir(folder) == []  # no .tmp left behind


def test_cli_table(built, capsys):
    code, out, err = _cli(capsys, "search", "a dog", "--index", str(built[0]), "-n", "3", "--rerank-k", "5")
    assert code == 0 and "log-likelihood" in out and "rerank" in err
    assert "warning: random weights" in err  # the table's footer goes to stderr when stdout is a pipe
    assert out.splitlines()[0] == "#\tpath\tsimilarity\tlog-likelihood" and len(out.splitlines()) == 4


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["search", ""], 2, "empty query"),
        (["search", "dog", "-n", "0"], 2, "-n must be"),
        (["search", "dog", "--json", "--paths"], 2, "exclude each other"),
    ],
)
def test_cli_errors_are_one_line(built, capsys, args, code, needle):
    got, out, err = _cli(capsys, *args, "--index", str(built[0]))
    assert got == code and needle in err and "Traceback" not in err and "Fix:" in err


def test_cli_missing_index(capsys, tmp_path):
    got, _, err = _cli(capsys, "search", "dog", "--index", str(tmp_path / "nothing"))
    assert got == 1 and "cocatk index" in err


def test_deleted_candidate_is_dropped_and_reported(tmp_path, capsys):
    _make_images(tmp_path / "photos", n=10)
    idx = Index.open(tmp_path / "idx", model=MODEL, pretrained="none", device="cpu", create=True)
    idx.update([tmp_path / "photos"], workers=0)
    first = search_index(idx, text="a dog", n=10, rerank=False)
    gone = Path(first.hits[0].path)
    gone.unlink()
    res = search_index(idx, text="a dog", n=10, rerank_k=10)
    assert [p for p, _ in res.dropped] == [str(gone)] and "gone" in res.dropped[0][1]
    assert len(res.hits) == 9 and str(gone) not in [h.path for h in res.hits]
    idx.close()
    code, out, err = _cli(capsys, "search", "a dog", "--index", str(tmp_path / "idx"), "--json", "--device", "cpu")
    assert code == 0 and "1 candidate(s) skipped" in err and str(gone) in err
    assert len(json.loads(out)["hits"]) == 9
    shutil.rmtree(tmp_path / "photos")


def test_index_search_api_returns_hits(built):
    idx = _open(built[0])
    hits = idx.search("a red bicycle", n=3, rerank_k=5)
    assert [h.rank for h in hits] == [1, 2, 3] and all(h.loglik is not None for h in hits)
    full = search_index(idx, text="a red bicycle", n=3, rerank_k=5)
    assert [h.id for h in hits] == [h.id for h in full.hits]
