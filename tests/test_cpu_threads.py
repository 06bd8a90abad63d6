"""The CPU encoder gives torch the cores the decode threads leave free, re-balanced before every batch."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import pytest

from cocatk.retrieval import encoder as enc
from cocatk.retrieval.encoder import LocalEncoder


def _futures(done: int, running: int) -> deque:
    out: deque = deque()
    for i in range(done + running):
        f: Future = Future()
        if i < done:
            f.set_result(None)
        out.append(f)
    return out


@pytest.mark.parametrize(
    ("workers", "done", "running", "expected"),
    [
        (2, 64, 0, 4),  # decoding is ahead: the decode threads sleep, torch gets every core
        (2, 60, 4, 2),  # both decode threads busy: torch keeps the other two cores
        (2, 63, 1, 3),  # one busy
        (8, 0, 64, 1),  # more decode threads than cores: at least one torch thread
        (0, 0, 0, 4),  # decoding in the calling thread: between batches nothing else runs
    ],
)
def test_model_threads_follow_the_decode_window(monkeypatch, tiny_model, workers, done, running, expected):
    monkeypatch.setattr(enc, "_usable_cores", lambda: 4)
    e = LocalEncoder(tiny_model, workers=workers)
    e._pending = _futures(done, running)
    assert e._model_threads() == expected
    assert LocalEncoder(tiny_model, workers=workers, model_threads=3)._model_threads() == 3


def test_encode_rebalances_and_restores_torch_threads(tmp_path, tiny_model):
    import torch
    from PIL import Image

    from cocatk.retrieval.encoder import EncodeJob

    paths = []
    for i in range(10):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 30), (i * 20, 0, 0)).save(p)
        paths.append(p)
    before = torch.get_num_threads()
    e = LocalEncoder(tiny_model, workers=1, batch_size=4)
    jobs = [EncodeJob(str(p), p.stat().st_size, p.stat().st_mtime_ns, None) for p in paths]
    out = list(e.encode(jobs, known=(), tokens=False, timed=lambda stage: _null()))
    assert len(out) == 10 and all(r.embedding is not None and r.precision == tiny_model.precision for r in out)
    assert len(e.thread_log) == 3 and all(1 <= t <= enc._usable_cores() for t in e.thread_log)
    assert torch.get_num_threads() == before


def _null():
    import contextlib

    return contextlib.nullcontext()


def test_thread_tuner_keeps_the_faster_count_and_follows_a_change_of_load():
    from cocatk.retrieval.encoder import ThreadTuner

    speed = {2: 0.20, 1: 0.05}  # seconds per image: two threads lose (another job holds a core)
    tuner = ThreadTuner(explore_every=6)
    picks = []
    for _ in range(30):
        n = tuner.pick(2)
        picks.append(n)
        tuner.observe(n, speed[n])
    assert picks[:4] == [2, 2, 1, 1]  # each count: a warm-up batch, then a measured one
    steady = picks[4:]
    assert steady.count(1) > 3 * steady.count(2) and 2 in steady  # mostly the faster, still re-measuring the other
    speed = {2: 0.03, 1: 0.05}  # the other job ended: two threads win now
    picks = []
    for _ in range(20):
        n = tuner.pick(2)
        picks.append(n)
        tuner.observe(n, speed[n])
    assert picks[-8:].count(2) >= 6


def test_thread_tuner_options_under_the_cap():
    from cocatk.retrieval.encoder import ThreadTuner

    tuner = ThreadTuner()
    seen = set()
    for _ in range(8):
        n = tuner.pick(8)
        seen.add(n)
        tuner.observe(n, 1.0 / n)
    assert seen == {8, 4, 1}
    assert tuner.pick(1) == 1


def test_a_text_query_runs_on_one_thread_and_restores(monkeypatch, tiny_model):
    import numpy as np
    import torch

    seen = []
    real = type(tiny_model)._encode_text_latent

    def spy(self, ids):
        seen.append(torch.get_num_threads())
        return real(self, ids)

    monkeypatch.setattr(type(tiny_model), "_encode_text_latent", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        one = tiny_model.encode_texts(["a red circle"])
        many = tiny_model.encode_texts(["a red circle"] + [f"thing {i}" for i in range(9)])
        assert seen == [1, 2] and torch.get_num_threads() == 2
        assert np.allclose(one[0], many[0], atol=1e-5)
    finally:
        torch.set_num_threads(before)
