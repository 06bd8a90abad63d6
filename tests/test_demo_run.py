"""`cocatk demo` end to end (tiny random model here; the shipped demo model's quality is in test_demo_quality)."""

from __future__ import annotations

import json

from conftest import TINY_CONFIG

from cocatk.cli import main
from cocatk.demo.run import run_demo
from cocatk.paths import file_url


def test_run_demo_end_to_end(tmp_path):
    report = run_demo(
        tmp_path / "demo",
        n_photos=16,
        n_queries=3,
        pool=8,
        zeroshot_per_class=1,
        model=str(TINY_CONFIG),
        pretrained="none",
        device="cpu",
    )
    idx = report.index
    assert idx["scanned"] == 16 + 3 and idx["encoded"] == 16
    assert sum(idx["failed"].values()) == 3  # the three broken files, each with a reason
    assert len(report.queries) == 3
    for q in report.queries:
        assert len(q.contrastive) == 5 and len(q.reranked) == 5
        sims = [h["similarity"] for h in q.contrastive]
        assert sims == sorted(sims, reverse=True)
        lls = [h["loglik"] for h in q.reranked]
        assert lls == sorted(lls, reverse=True)
        assert q.rank_contrastive is None or 1 <= q.rank_contrastive <= q.pool
    assert report.zeroshot["metrics"]["n"] == 18 and report.zeroshot["data"]["num_classes"] == 18
    page = (tmp_path / "demo" / "report.html").read_text()
    for q in report.queries:
        for h in q.reranked + q.contrastive:
            assert f'data-path="{h["path"]}"' in page and f'href="{file_url(h["path"])}"' in page
    # the true image of each query is marked wherever it is shown (and only there)
    photos = tmp_path / "demo" / "photos"
    shown = sum((q.rank_contrastive or 99) <= 5 for q in report.queries)
    shown += sum((q.rank_rerank or 99) <= 5 for q in report.queries)
    assert page.count("✓ true image") == shown
    marked = [f for f in page.split("<figure")[1:] if "✓ true image" in f]
    truths = {f'data-path="{(photos / q.truth).resolve()}"' for q in report.queries}
    assert all(any(t in f for t in truths) for f in marked) and len(marked) == shown
    assert "<dt>model</dt>" in page and "random weights" in page  # header and the warning of the random model
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["queries"][0]["text"] == report.queries[0].text


def test_demo_cli_json(tmp_path, capsys):
    code = main(
        [
            "demo",
            str(tmp_path / "d"),
            "--photos",
            "10",
            "--queries",
            "2",
            "--model",
            str(TINY_CONFIG),
            "--pretrained",
            "none",
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"directory", "model", "index", "queries", "zeroshot", "html"}
    assert len(doc["queries"]) == 2 and doc["model"]["random_weights"] is True


def test_demo_refuses_more_photos_than_distinct_scenes(tmp_path, capsys):
    import pytest

    from cocatk.errors import UsageError

    with pytest.raises(UsageError, match="at most 630"):
        run_demo(tmp_path / "lib", n_photos=631, model=str(TINY_CONFIG), pretrained="none", device="cpu")
    assert not (tmp_path / "lib").exists()  # refused before anything is written
    code = main(["demo", str(tmp_path / "cli"), "--photos", "631"])
    assert code != 0 and "less than or equal to 630" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()
