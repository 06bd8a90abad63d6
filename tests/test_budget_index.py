"""An index chosen by budget (``--max-index-memory``, cocatk.retrieval.budget): size texts, memory estimates against
the files FAISS writes, the choice (Flat when it fits, compressed when not, Flat below the training minimum), the
recorded recall@10 against an independent numpy recomputation, the updater recording and reusing the choice, and
the CLI on the shipped demo model."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from cocatk.errors import UsageError
from cocatk.retrieval import budget
from cocatk.retrieval.budget import (
    candidates,
    choose_index,
    estimate_bytes,
    format_size,
    held_out_queries,
    parse_size,
    rechoose_reason,
)
from cocatk.retrieval.encoder import Encoded, EncodeJob, hash_bytes
from cocatk.retrieval.report import StageTimer
from cocatk.retrieval.vectors import PARAMS_ENV, VectorIndex

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # k-means on a busy 2-core machine is faster on one thread (test_vectors_large)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int = 64, seed: int = 0, clusters: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered(20_000)
    return np.arange(len(x), dtype=np.int64) * 3 + 1, x  # ids unlike positions


# ---- sizes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "want"),
    [("4G", 4 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("800MB", 800 << 20), ("1024", 1024),
     ("2k", 2048), (" 3 t ", 3 << 40), ("64KiB", 64 << 10), (".5G", 1 << 29), ("7B", 7), (2048, 2048)],
)  # fmt: skip
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["lots", "-1G", "0", "4X", "", "G", "1.2.3M", "4 GB GB", "0.1"])
def test_parse_size_refuses_bad_text_with_a_hint(text: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_size(text)
    assert e.value.hint and ("4G" in e.value.hint or "e.g." in e.value.hint)


def test_format_size() -> None:
    assert [format_size(v) for v in (512, 12_800, 790 << 20, 1 << 30, 5 << 20)] == [
        "512 B", "12.5 KiB", "790 MiB", "1.0 GiB", "5.0 MiB",
    ]  # fmt: skip


# ---- estimates --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory", ["Flat", "IVF64,Flat", "IVF64,SQ8", "IVF64,SQfp16", "IVF64,SQ4", "IVF64,PQ16x4fs", "IVF64,PQ16np"]
)
def test_estimate_is_within_3_percent_of_the_file(factory: str, data, tmp_path: Path) -> None:
    ids, x = data
    ids, x = ids[:12_000], x[:12_000]
    vi = VectorIndex.build(64, factory, ids, x)
    vi.save(tmp_path / "v.faiss")
    size = (tmp_path / "v.faiss").stat().st_size
    est = estimate_bytes(factory, len(x), 64, in_memory=False)
    assert abs(est - size) <= 0.03 * size, (factory, est, size)
    # in RAM: the reverse id map of IDMap2 on top of the file
    assert estimate_bytes(factory, len(x), 64) - est == budget.IDMAP2_REV_BYTES * len(x)


def test_estimates_follow_the_factory_grammar() -> None:
    n, d = 1_000_000, 768
    assert estimate_bytes("Flat", n, d) == n * (4 * d + 8 + 48) + 1024
    sq8 = estimate_bytes("IVF1024,SQ8", n, d)
    assert format_size(sq8) == "796 MiB" and sq8 < estimate_bytes("IVF1024,SQfp16", n, d)
    assert estimate_bytes("IVF1024,PQ96x4fs,RFlat", n, d) > estimate_bytes("Flat", n, d)  # the refine keeps them
    assert estimate_bytes("HNSW32", n, d) - estimate_bytes("Flat", n, d) == pytest.approx(272 * n, rel=0.01)
    with pytest.raises(UsageError, match="cannot estimate"):
        estimate_bytes("LSH", n, d)


# ---- the choice -------------------------------------------------------------------------------------------------
def numpy_recall(vi: VectorIndex, ids: np.ndarray, x: np.ndarray, q: np.ndarray, src: np.ndarray) -> float:
    """recall@10 recomputed without the module's helpers: numpy exact search, the source dropped from both lists."""
    order = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :11]
    _, found = vi.search(q, 11)
    hits = []
    for t_row, f_row, s in zip(ids[order], found, ids[src], strict=True):
        truth = [i for i in t_row if i != s][:10]
        got = [i for i in f_row if i != s and i >= 0][:10]
        hits.append(len(set(truth) & set(got)) / 10)
    return float(np.mean(hits))


def test_flat_is_kept_when_it_fits(data) -> None:
    ids, x = data
    choice, vi = choose_index(ids, x, parse_size("64M"))
    assert choice.factory == "Flat" and choice.search_params == {} and choice.fits and choice.why is None
    assert choice.recall_at_10 == 1.0 and choice.queries == 1000 and choice.estimated_bytes <= choice.budget_bytes
    assert vi.factory == "Flat" and vi.ntotal == len(x)


def test_a_tiny_budget_compresses_and_records_a_recall_numpy_confirms(data, tmp_path: Path) -> None:
    ids, x = data
    want = parse_size("3M")  # Flat is 6 MiB here, IVF128,SQfp16 3.7 MiB, IVF128,SQ8 2.5 MiB
    choice, vi = choose_index(ids, x, want)
    assert choice.factory == "IVF128,SQ8" and set(choice.search_params) == {"nprobe"}
    assert choice.estimated_bytes <= want and choice.fits
    # the most accurate that fits: every candidate before it is over the budget
    order = candidates(len(x), 64)
    assert all(estimate_bytes(f, len(x), 64) > want for f in order[: order.index(choice.factory)])
    vi.save(tmp_path / "v.faiss")
    size = (tmp_path / "v.faiss").stat().st_size
    assert abs(size - estimate_bytes(choice.factory, len(x), 64, in_memory=False)) <= 0.03 * size

    q, src = held_out_queries(x, 1000, seed=0)  # the documented rule, drawn again
    cos = np.sum(q * x[src], axis=1)
    np.testing.assert_allclose(cos, budget.QUERY_COSINE, atol=1e-5)  # text-like: not the source's own copy
    assert vi.search_params["nprobe"] == choice.search_params["nprobe"]
    recall = numpy_recall(vi, ids, x, q, src)
    assert recall == pytest.approx(choice.recall_at_10, abs=1e-9)
    assert recall >= budget.TARGET_RECALL  # SQ8 codes reach the target at some nprobe on this data
    # tuned upward: the curve rises to the chosen value and the one below it missed the target
    curve = choice.tried[0]["curve"]
    below = [p for p in curve if p[0] < choice.search_params["nprobe"]]
    assert below and all(p[1] < budget.TARGET_RECALL for p in below)
    vi.search_params = {"nprobe": 1.0}
    assert numpy_recall(vi, ids, x, q, src) < choice.recall_at_10  # the knob matters


def test_below_the_training_minimum_flat_and_why() -> None:
    x = clustered(500)
    choice, _ = choose_index(np.arange(500, dtype=np.int64), x, parse_size("10K"))
    assert choice.factory == "Flat" and not choice.fits
    assert "too few to train" in (choice.why or "") and "1,000" in (choice.why or "")
    assert choice.recall_at_10 == 1.0 and choice.queries == 500


def test_a_latency_limit_stops_tuning(data) -> None:
    ids, x = data
    choice, _ = choose_index(ids[:5000], x[:5000], parse_size("1M"), max_query_ms=1e-6)
    assert choice.max_query_ms == 1e-6
    assert all(t["stopped_by"] in ("latency", "exact") for t in choice.tried)
    assert "no setting answers within" in (choice.why or "")
    assert len(choice.tried) >= 2  # a candidate stopped by latency gives way to the next that fits


def test_check_budget_options_and_the_early_refusal() -> None:
    with pytest.raises(UsageError, match="give one of them"):
        budget.check_budget_options("4G", None, "IVF64,Flat")
    with pytest.raises(UsageError, match="needs --max-index-memory"):
        budget.check_budget_options(None, 10.0, None)
    assert budget.check_budget_options("1K", 5.0, None) == 1024
    budget.check_budget(500, 768, 1)  # below the training minimum: Flat, whatever the budget
    with pytest.raises(UsageError) as e:
        budget.check_budget(1_000_000, 768, parse_size("1M"))
    assert "raise --max-index-memory to at least" in (e.value.hint or "")


def test_rechoose_rules() -> None:
    b = {"factory": "IVF128,SQ8", "budget_bytes": 3 << 20, "max_query_ms": None, "items": 20_000, "dim": 64,
         "fits": True}  # fmt: skip
    m = {"factory": "IVF128,SQ8", "budget": b}
    assert rechoose_reason({"factory": "Flat"}, 10, 1 << 20, None) == "no index chosen yet"
    assert rechoose_reason(m, 0, 3 << 20, None) is None
    assert rechoose_reason(m, 21_000, 3 << 20, None) is None  # grew a little and still fits: keep
    assert "no longer fits" in (rechoose_reason(m, 30_000, 3 << 20, None) or "")
    assert "grew from 20,000 to 45,000" in (rechoose_reason({**m, "budget": {**b, "budget_bytes": 1 << 30}}, 45_000,
                                                            1 << 30, None) or "")  # fmt: skip
    assert "shrank" in (rechoose_reason(m, 9_000, 3 << 20, None) or "")
    assert rechoose_reason(m, 20_000, 4 << 20, None) == "the budget changed"
    assert rechoose_reason(m, 20_000, 3 << 20, 5.0) == "the budget changed"
    assert (
        rechoose_reason({**m, "factory": "Flat"}, 20_000, 3 << 20, None) == "the factory was changed since the choice"
    )
    over = {**m, "budget": {**b, "fits": False}}
    assert rechoose_reason(over, 20_000, 3 << 20, None) is None
    assert rechoose_reason(over, 20_100, 3 << 20, None) == "the last choice was over the budget"


def test_recorded_params_yield_to_the_environment(monkeypatch) -> None:
    m = {"factory": "IVF64,SQ8", "budget": {"factory": "IVF64,SQ8", "search_params": {"nprobe": 24.0}}}
    assert budget.recorded_search_params(m) == {"nprobe": 24.0}
    assert budget.recorded_search_params({**m, "factory": "Flat"}) == {}
    monkeypatch.setenv(PARAMS_ENV, "nprobe=3")
    assert budget.recorded_search_params(m) == {}


# ---- through the updater ----------------------------------------------------------------------------------------
class ClusterEncoder:
    """No model: each content's embedding is a clustered unit vector seeded by its hash (an encoder per the contract
    of cocatk.retrieval.encoder, as tests/test_house.py's HashEncoder)."""

    workers = 0

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.centres = np.random.default_rng(1).standard_normal((40, dim)).astype(np.float32)

    def token_shape(self) -> tuple[int, int]:
        return (3, self.dim)

    def encode(
        self, jobs: Sequence[EncodeJob], *, known: Collection[str], tokens: bool, timed: StageTimer
    ) -> Iterator[Encoded]:
        for job in jobs:
            h = hash_bytes(Path(job.path).read_bytes())
            rng = np.random.default_rng(int(h[:8], 16))
            v = self.centres[rng.integers(0, 40)] + 0.5 * rng.standard_normal(self.dim).astype(np.float32)
            yield Encoded(job, hash=h, embedding=(v / np.linalg.norm(v)).astype(np.float32))


def test_the_updater_chooses_records_and_reuses(tmp_path: Path) -> None:
    from cocatk.retrieval.index import Index
    from tests.conftest import TINY_CONFIG
    from tests.test_index import assert_consistent

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2600):
        (photos / f"f{i:05d}.jpg").write_bytes(f"content {i}".encode())
    with Index.open(tmp_path / "idx", model=str(TINY_CONFIG), pretrained="none", device="cpu", create=True):
        pass
    notes: list[str] = []
    with Index.open(tmp_path / "idx") as ix:
        report = ix.update([photos], encoder=ClusterEncoder(64), max_index_memory="400K", checkpoint_every=5000,
                           notify=notes.append, cache_tokens=False)  # fmt: skip
        assert report.new == 2600
        b = ix.manifest["budget"]
        assert ix.manifest["factory"] == b["factory"] == "IVF64,SQ8" and b["items"] == 2600
        assert b["estimated_bytes"] <= 400 * 1024 == b["budget_bytes"] and 0.9 <= b["recall_at_10"] <= 1.0
        assert any("choosing the FAISS index of 2,600 vectors for 400 KiB" in n for n in notes)
        assert ix.vectors.factory == "IVF64,SQ8" and ix.vectors.search_params["nprobe"] == b["search_params"]["nprobe"]
        assert_consistent(ix)
        on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
        assert on_disk["budget"]["factory"] == "IVF64,SQ8"
    with Index.open(tmp_path / "idx") as ix:  # a reader gets the recorded knobs
        assert ix.vectors.search_params["nprobe"] == b["search_params"]["nprobe"]
        q = ix.embeddings([int(ix.store.ids()[7])])
        _, got = ix.vectors.search(q, 3)
        assert got[0][0] == ix.store.ids()[7]
    for i in range(2600, 2700):  # grows a little: kept, the new vectors are added to it
        (photos / f"f{i:05d}.jpg").write_bytes(f"content {i}".encode())
    with Index.open(tmp_path / "idx") as ix:
        ix.update(encoder=ClusterEncoder(64), cache_tokens=False)
        assert ix.manifest["budget"] == b and ix.vectors.ntotal == 2700
        assert_consistent(ix)
        ix.update(encoder=ClusterEncoder(64), faiss_factory="Flat", cache_tokens=False)  # --faiss takes over
        assert "budget" not in ix.manifest and ix.manifest["factory"] == "Flat"
        with pytest.raises(UsageError, match="give one of them"):
            ix.update(encoder=ClusterEncoder(64), faiss_factory="Flat", max_index_memory="4G")


# ---- the CLI on the shipped demo model --------------------------------------------------------------------------
def test_cli_budget_on_the_demo_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cocatk.cli import main

    demo = tmp_path / "demo"
    assert main(["demo", str(demo), "--photos", "8", "--queries", "1", "--json"]) == 0
    capsys.readouterr()
    idx, photos = str(demo / "index"), str(demo / "photos")
    assert main(["index", photos, "--index", idx, "--max-index-memory", "4G", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["budget"]["factory"] == "Flat" and run["budget"]["budget_bytes"] == 4 << 30

    assert main(["info", "--index", idx, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    b = info["manifest"]["budget"]
    assert info["manifest"]["factory"] == "Flat" and b["recall_at_10"] == 1.0 and b["items"] == info["files"] == 8
    assert b["queries"] == 8 and set(b) >= {"factory", "search_params", "recall_at_10", "queries", "query_ms",
                                             "estimated_bytes", "budget_bytes", "max_query_ms"}  # fmt: skip
    assert main(["info", "--index", idx]) == 0
    text = capsys.readouterr().out
    assert "faiss" in text and "chosen for 4.0 GiB" in text and "recall@10 1.00 on 8 held-out queries" in text

    # a budget the exact index is over: Flat below the training minimum, and a warning saying why
    assert main(["index", "--index", idx, "--max-index-memory", "1K", "--max-query-ms", "50"]) == 0
    cap = capsys.readouterr()
    assert "too few to train a compressed index" in cap.err and "faiss Flat" in cap.out

    assert main(["index", photos, "--index", idx, "--max-index-memory", "4G", "--faiss", "HNSW32"]) == 2
    err = capsys.readouterr().err
    assert "give one of them" in err and len(err.strip().splitlines()) <= 2
    assert main(["index", photos, "--index", idx, "--max-index-memory", "lots"]) == 2
    assert "cannot read 'lots' as a memory size" in capsys.readouterr().err
    assert main(["index", photos, "--index", idx, "--max-query-ms", "5"]) == 2
    assert "needs --max-index-memory" in capsys.readouterr().err
