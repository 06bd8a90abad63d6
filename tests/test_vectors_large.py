"""Large-collection FAISS factories (IVF-PQ + a refine stage) inside cocatk's IDMap2: add, remove, search with id
selectors and knobs, save/load, and the GPU path around a machine without a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cocatk.errors import UsageError
from cocatk.retrieval.vectors import (
    PARAMS_ENV,
    VectorIndex,
    default_search_params,
    min_training_points,
    parse_search_params,
)
from tests.test_index import assert_consistent, make_images, open_tiny

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    # k-means with OpenMP threads spinning on a busy 2-core machine was measured 10x slower than one thread.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


D = 32
REFINE = "IVF16,PQ8x4fs,RFlat"


def _data(n: int = 1200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, D)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(n, dtype=np.int64) * 7 + 3, x  # ids unlike positions


def _exact(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(q @ x.T), axis=1)[:, :k]]


def _recall(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth, strict=True)]))


@pytest.mark.parametrize("factory", [REFINE, "IVF16,PQ8x4fs,Refine(SQ8)"])
def test_refine_factories_search_near_exact_with_default_knobs(factory: str) -> None:
    ids, x = _data()
    vi = VectorIndex.build(D, factory, ids, x)
    assert vi.ntotal == len(ids) and set(vi.search_params) >= {"nprobe", "k_factor"}
    q = x[:50] + 0.05
    _, got = vi.search(q, 10)
    assert _recall(got, _exact(ids, x, q, 10)) >= 0.9
    vi.set_search_params("nprobe=1,k_factor=1")  # knobs reach the index: less recall
    _, worse = vi.search(q, 10)
    assert _recall(worse, _exact(ids, x, q, 10)) < _recall(got, _exact(ids, x, q, 10))


def test_refine_index_id_selectors_save_and_load(tmp_path: Path) -> None:
    ids, x = _data()
    vi = VectorIndex.build(D, REFINE, ids, x)
    allowed = ids[100:140]
    for sel in (allowed, faiss.IDSelectorBatch(allowed)):
        scores, got = vi.search(x[120], 5, id_selector=sel)
        assert got[0][0] == ids[120] and set(got[0]) <= set(allowed)
        assert np.isclose(scores[0][0], 1.0, atol=1e-4)  # the refine stage re-scores exactly
    vi.save(tmp_path / "v.faiss")
    back = VectorIndex.load(tmp_path / "v.faiss", REFINE)
    assert np.array_equal(back.ids(), vi.ids())
    assert np.array_equal(back.search(x[:5], 5)[1], vi.search(x[:5], 5)[1])


@pytest.mark.parametrize("factory", ["IVF16,Flat", REFINE])
def test_ivf_and_refine_refuse_in_place_removal(factory: str) -> None:
    # IndexIDMap2.remove_ids compacts its id map as if the inner index renumbered; IVF does not, so searches after a
    # removal returned other files' ids. remove() now says "rebuild me" instead.
    ids, x = _data(600)
    vi = VectorIndex.build(D, factory, ids, x)
    assert vi.remove(ids[:3]) is False
    assert vi.ntotal == 600
    assert VectorIndex.build(D, "Flat", ids, x).remove(ids[:3]) is True


def test_an_index_with_a_refine_factory_stays_right_through_deletes(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    files = make_images(photos, 40)
    ix = open_tiny(tmp_path / "idx")
    ix.update([photos], faiss_factory="IVF4,PQ8x4fs,RFlat")
    assert ix.manifest["factory"] == "IVF4,PQ8x4fs,RFlat"
    for p in files[:5]:
        p.unlink()
    r = ix.update([photos])
    assert r.removed == 5 and ix.ntotal == 35
    assert_consistent(ix)
    ids = ix.store.ids()
    emb = ix.store.embeddings(list(ids), ix.dim)
    _, got = ix.vectors.search(emb, 1)
    assert np.array_equal(got[:, 0], ids)  # every vector finds its own row: no shifted ids after the removal


def test_search_params_defaults_env_and_errors(monkeypatch) -> None:
    assert default_search_params("Flat") == {}
    assert default_search_params("IVF4096,PQ64x4fs,RFlat") == {"nprobe": 256.0, "k_factor": 128.0}
    assert default_search_params("IVF1024,PQ96x4fs,RFlat") == {"nprobe": 128.0, "k_factor": 128.0}
    assert default_search_params("IVF256,Flat") == {"nprobe": 32.0}
    assert default_search_params("HNSW32") == {"efSearch": 128.0}
    monkeypatch.setenv(PARAMS_ENV, "nprobe=8, k_factor=4")
    assert default_search_params("IVF4096,PQ64,RFlat") == {"nprobe": 8.0, "k_factor": 4.0}
    assert parse_search_params("") == {}
    for bad in ("nprobe", "nprobe=x", "foo=1"):
        with pytest.raises(UsageError, match="search parameter"):
            parse_search_params(bad)
    assert min_training_points("IVF1024,PQ96x4fs,RFlat") == 1024
    assert min_training_points("IVF64,PQ8x4fs,RFlat") == 64


def test_gpu_path_falls_back_to_the_cpu_when_the_clone_fails(monkeypatch) -> None:
    # No GPU here: pretend FAISS sees one whose cloner cannot take the index (as for a refine index on a GPU
    # build); training and search must still work, on the CPU.
    calls: list[str] = []

    def clone(index, *a, **k):
        calls.append(type(index).__name__)
        raise RuntimeError("not implemented for this type of index")

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", clone)
    ids, x = _data(800)
    vi = VectorIndex.build(D, REFINE, ids, x)
    _, got = vi.search(x[:3], 3)
    assert list(got[:, 0]) == list(ids[:3])
    assert calls and vi._gpu_failed  # k-means and search both tried the GPU first
