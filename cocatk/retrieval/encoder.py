"""The encoder seam: where an index's embeddings (and decoder tokens) come from.

The updater (:mod:`cocatk.retrieval.updater`) decides which files need reading, hands them to an :class:`Encoder` as
:class:`EncodeJob` s, and commits the :class:`Encoded` results that come back; it owns scanning, moves, copies,
failures, checkpoints and resume. An encoder owns only "file -> content hash -> embedding": reading, hashing,
decoding, preprocessing and running the image tower, wherever that happens. :class:`LocalEncoder` (decode threads
plus the in-process model) is the first; a Ray Data actor pool or a faster CPU backend plug in here without touching
the commit logic.

The contract, which the updater relies on:

- Results come back in the order of the jobs (one per job), so a file whose content equals an earlier job's is
  committed after it.
- A job whose content hash is in ``known`` (already indexed) and that does not ask for ``need_decode`` comes back
  with its hash and no embedding: the updater reuses the stored vector (a move, a copy, a touched file).
- Within one call, identical contents are encoded once: a later job with the hash of an earlier one comes back
  without an embedding, like a known hash.
- A file that cannot be read or decoded comes back with ``error`` set (a recorded failure, never an exception).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..images import DEFAULT_MAX_MEGAPIXELS, ImageDecodeError, load_image
from ..sources import Member, read_source

if TYPE_CHECKING:  # pragma: no cover
    from ..models import CocaModel
    from .store import FileRow

#: ``timed(stage)``: a context manager that charges the time spent inside it to ``stage`` (see the updater's timings).
StageTimer = Callable[[str], AbstractContextManager[None]]


def hash_bytes(data: bytes) -> str:
    """The content hash stored for every file: blake2b-128, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class EncodeJob:
    """One file to read: its stat at scan time, the row it replaces (None for a new path), and whether it must be
    decoded even when its content is known (a token backfill)."""

    path: str
    size: int
    mtime_ns: int
    row: FileRow | None
    need_decode: bool = False
    #: (source, member) for an item of a dataset (a tar shard, a table; :mod:`cocatk.sources`): read from there.
    member: tuple[str, Member] | None = None

    def source(self) -> tuple[str, int, int, str]:
        """(file to read, offset, size, field) as :func:`cocatk.sources.read_source` takes them: the whole file
        (offset -1), the member's byte range in its tar shard, or its row and column in its table."""
        if self.member is None:
            return self.path, -1, -1, ""
        shard, m = self.member
        return shard, m.offset, m.size, m.field


@dataclass
class Encoded:
    """What an encoder returns for one job.

    ``embedding`` (D,) float32 L2-normalised and ``tokens`` (T, D) float16 are set when the file was encoded; both are
    None for a known or repeated content; ``error`` is set when the file could not be read or decoded.
    """

    job: EncodeJob
    hash: str | None = None
    embedding: np.ndarray | None = None
    tokens: np.ndarray | None = None
    error: ImageDecodeError | None = None
    read_s: float = 0.0  # reading and hashing the file
    decode_s: float = 0.0  # decoding and preprocessing
    #: The precision the embedding was computed at (``fp32``, ``bf16``: the model's), recorded in the manifest.
    precision: str | None = None


class Encoder(Protocol):
    """Turns files into content hashes and embeddings; see the module docstring for the contract."""

    #: Parallel decode workers (reported in the timings).
    workers: int

    def token_shape(self) -> tuple[int, int]:
        """(T, D) of the decoder tokens this encoder returns with ``tokens=True``."""
        ...

    def encode(
        self, jobs: Sequence[EncodeJob], *, known: Collection[str], tokens: bool, timed: StageTimer
    ) -> Iterator[Encoded]:
        """One :class:`Encoded` per job, in order (a generator: the caller commits as results arrive)."""
        ...


class LocalEncoder:
    """Decode threads feeding the in-process model, overlapped: ``workers`` threads read, hash, decode (JPEG draft
    mode, EXIF orientation) and preprocess about two batches ahead of the batch the model is encoding.

    On the CPU, torch gets the cores the decode threads leave free, re-balanced before every batch (see
    :meth:`_model_threads`): while decoding runs ahead of the model, the decode threads sleep and torch gets every
    core; while the model waits for decoding, torch keeps the cores the busy decode threads do not use.
    """

    def __init__(
        self,
        model: CocaModel,
        *,
        workers: int | None = None,
        batch_size: int | None = None,
        max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
        token_model: CocaModel | None = None,
        model_threads: int | None = None,
    ) -> None:
        self.model = model
        #: torch threads on the CPU: None re-balances before every batch; a number fixes it (benchmarks compare).
        self.model_threads = model_threads
        self._pending: deque[Future[tuple[Encoded, Any]]] = deque()  # the decode window, for the re-balancing
        self.thread_log: list[int] = []  # torch threads of each batch of the last encode
        self._tuner = ThreadTuner()
        #: The CoCa whose decoder tokens are cached when it is not ``model`` (a separate rerank model, with its own
        #: preprocessing); None: ``model`` gives both.
        self.token_model = token_model if token_model is not None and token_model is not model else None
        self._tokens = False
        self.workers = min(8, os.cpu_count() or 1) if workers is None else int(workers)
        self.batch_size = batch_size or model.image_batch_size
        self.max_megapixels = max_megapixels

    def token_shape(self) -> tuple[int, int]:
        import torch

        model = self.token_model or self.model
        s = model.image_size
        t, d = model.image_tokens(torch.zeros(1, 3, s, s)).shape[1:]
        return int(t), int(d)

    # -- decode threads --
    def _prepare(self, job: EncodeJob, known: Collection[str]) -> tuple[Encoded, Any]:
        """Worker thread: read once, hash, and decode + preprocess only when the content is not indexed yet."""
        out = Encoded(job)
        t = time.perf_counter()
        try:
            data = read_source(*job.source())
        except OSError as e:
            out.error = ImageDecodeError("unreadable", e.strerror or type(e).__name__, job.path)
            return out, None
        out.hash = hash_bytes(data)
        out.read_s = time.perf_counter() - t
        if not job.need_decode and out.hash in known:
            return out, None  # a move, a duplicate or a touch: the embedding is reused
        tensor = None
        try:
            second = self.token_model if self._tokens else None
            draft = max(self.model.image_size, second.image_size if second is not None else 0)
            image = load_image(data, draft_size=draft, max_megapixels=self.max_megapixels)
            tensor = self.model.preprocess(image)
            if second is not None:
                tensor = (tensor, second.preprocess(image))
        except ImageDecodeError as e:
            e.path = job.path
            out.error = e
        except Exception as e:  # preprocessing failure on an odd image: skip the file, never the run
            out.error = ImageDecodeError("decode error", str(e)[:160], job.path)
        out.decode_s = time.perf_counter() - t - out.read_s
        return out, tensor

    def _prepared(self, jobs: Sequence[EncodeJob], known: Collection[str]) -> Iterator[tuple[Encoded, Any]]:
        """Prepared jobs in order, from a thread pool that runs ahead of the model (bounded prefetch)."""
        if self.workers == 0:
            for job in jobs:
                yield self._prepare(job, known)
            return
        window = max(2 * self.batch_size, 4 * self.workers)  # about two batches decoded ahead of the one encoding
        pending: deque[Future[tuple[Encoded, Any]]] = deque()
        self._pending = pending
        with ThreadPoolExecutor(self.workers, thread_name_prefix="cocatk-decode") as pool:
            try:
                for job in jobs:
                    pending.append(pool.submit(self._prepare, job, known))
                    if len(pending) >= window:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for fut in pending:
                    fut.cancel()

    # -- the model --
    def encode(
        self, jobs: Sequence[EncodeJob], *, known: Collection[str], tokens: bool, timed: StageTimer
    ) -> Iterator[Encoded]:
        import torch

        from ..models import torch_threads

        self._tokens = tokens
        started: set[str] = set()  # contents queued for the model in this call: encoded once
        order: deque[Encoded] = deque()  # results not yielded yet, in job order
        batch: list[tuple[Encoded, Any]] = []
        waiting: set[int] = set()  # id() of results still waiting for their batch

        def run_batch() -> None:
            threads = 0
            if cpu:
                threads = self._model_threads()
                if threads != torch.get_num_threads():
                    torch.set_num_threads(threads)
                self.thread_log.append(threads)
            started_at = time.perf_counter()
            with timed("model"):
                if tokens and self.token_model is not None:
                    x = torch.stack([t[0] for _, t in batch])
                    emb = self.model.encode_images(x, batch_size=len(batch))
                    x2 = torch.stack([t[1] for _, t in batch])
                    toks = self.token_model.image_tokens(x2, batch_size=len(batch))
                else:
                    x = torch.stack([t for _, t in batch])
                    emb, toks = self.model.encode_images_and_tokens(x, batch_size=len(batch), tokens=tokens)
                tok_np = toks.to(torch.float16).cpu().numpy() if toks is not None else None
            if threads:
                self._tuner.observe(threads, (time.perf_counter() - started_at) / len(batch))
            for i, (res, _) in enumerate(batch):
                res.precision = self.model.precision
                res.embedding = emb[i]
                res.tokens = tok_np[i] if tok_np is not None else None
                waiting.discard(id(res))
            batch.clear()

        cpu = self.model.device.startswith("cpu")
        self.thread_log: list[int] = []  # torch threads of each batch (benchmarks report them)
        self._tuner = ThreadTuner()
        with torch_threads() if cpu else contextlib.nullcontext():
            prepared = self._prepared(jobs, known)
            while True:
                with timed("wait_decode"):
                    item = next(prepared, None)
                if item is None:
                    break
                res, tensor = item
                if tensor is not None and res.hash not in started:
                    started.add(res.hash or "")
                    batch.append((res, tensor))
                    waiting.add(id(res))
                order.append(res)
                if len(batch) >= self.batch_size:
                    run_batch()
                while order and id(order[0]) not in waiting:
                    yield order.popleft()
            if batch:
                run_batch()
            yield from order

    def _model_threads(self) -> int:
        """torch threads for the next batch on the CPU.

        The cap: the usable cores minus the decode threads that still have work (files of the decode window not
        decoded yet), at least 1. torch's OpenMP threads spin while they wait, so threads that share cores with busy
        decode threads fight them (on 2 cores the tiny test model ran at ~50 images/s with two torch threads against
        ~500 with one); threads on cores whose decode threads sleep (the window is full and decoded: the model is the
        bottleneck) are free speed: coca_ViT-B-32 in fp32 ran 24 images/s on two threads against 12 on one here.

        Under the cap, :class:`ThreadTuner` picks the count that measured fastest in this run: other processes on
        the machine make the extra threads lose (coca_ViT-B-32 in bf16 on 2 cores with another job running: 29.5
        images/s on one thread, 5.5 on two).
        """
        if self.model_threads is not None:
            return max(1, self.model_threads)
        cores = _usable_cores()
        if self.workers == 0:
            cap = cores
        else:
            busy = sum(1 for f in list(self._pending) if not f.done())
            cap = max(1, cores - min(self.workers, busy))
        return self._tuner.pick(cap)


class ThreadTuner:
    """Picks torch's thread count batch by batch from the model seconds per image measured at each count.

    The options under a cap are the cap, half of it and 1 (a few: each costs a probe). An option never measured is
    tried first (the larger first); then the fastest (moving average) runs, and every ``explore_every``-th batch
    re-measures the stalest other option (that measurement replaces its old figure), so a change of load (another job
    starting or ending) is followed within ``explore_every`` batches. The first batch at each count is a warm-up
    (oneDNN builds its kernels) and is not counted.
    """

    def __init__(self, explore_every: int = 6, alpha: float = 0.5) -> None:
        self.explore_every = explore_every
        self.alpha = alpha
        self.cost: dict[int, float] = {}  # seconds per image, moving average
        self.last_seen: dict[int, int] = {}  # batch number of the last measurement
        self._warm: set[int] = set()
        self._batches = 0

    def pick(self, cap: int) -> int:
        self._batches += 1
        options = sorted({cap, max(1, cap // 2), 1}, reverse=True)
        for n in options:
            if n not in self.cost:
                return n
        best = min(options, key=lambda n: self.cost[n])
        if len(options) > 1 and self._batches % self.explore_every == 0:
            return min((n for n in options if n != best), key=lambda n: self.last_seen.get(n, 0))
        return best

    def observe(self, threads: int, seconds_per_image: float) -> None:
        if threads not in self._warm:
            self._warm.add(threads)
            return
        old = self.cost.get(threads)
        stale = self._batches - self.last_seen.get(threads, self._batches) > 1  # a re-measure after a pause
        a = self.alpha
        self.cost[threads] = seconds_per_image if old is None or stale else a * seconds_per_image + (1 - a) * old
        self.last_seen[threads] = self._batches


def _usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or `taskset`'s), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


__all__ = ["EncodeJob", "Encoded", "Encoder", "LocalEncoder", "StageTimer", "hash_bytes"]
