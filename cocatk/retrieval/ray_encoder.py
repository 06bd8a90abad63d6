"""An :class:`~cocatk.retrieval.encoder.Encoder` on a Ray cluster: Ray Data decodes in CPU tasks, an actor pool encodes.

The updater stays on the driver and does what it does locally (scan, decide, commit checkpoints as the single
writer); only "file -> hash -> embedding" moves to the cluster. The pipeline is Ray Data's batch-inference pattern::

    from_items(jobs)                       # (position, path, need_decode): a few hundred bytes per job
      .map_batches(_decode_batch)          # CPU tasks: read, hash, skip known contents, decode, resize + crop
      .map_batches(_EmbedActor, concurrency=N, num_gpus=g)   # one model per actor, batches sized for the device
      .iter_batches()                      # streams to the driver as blocks finish

The decode tasks import neither torch nor open_clip: the driver describes the model's preprocessing
(:mod:`cocatk.preprocess`), the tasks do its PIL half and ship (S, S, 3) uint8 pixels, and the actor does its torch
half (``/ 255``, mean, std) on the batch, bit for bit open_clip's transform. On 2 cores a cold run's first result
came 5 s sooner (the decode task's own torch + open_clip import had been on the critical path, competing with the
actor's). A transform of another shape goes to the tasks as is (float32 pixels, torch in the tasks).

Order: Ray Data's default execution lets blocks finish out of order (``preserve_order=False``), so a slow block
does not stall the others; the driver keeps a reorder buffer keyed by job position and yields in job order, as the
:class:`~cocatk.retrieval.encoder.Encoder` contract requires. The buffer holds at most the blocks Ray Data has in
flight (its backpressure bounds them), not the whole run.

Files are read by the worker that decodes them: every node must see the files at the same path (a shared
filesystem). A file that a worker cannot find is a recorded failure whose detail says so, never a crash.

Fault tolerance: the actors are restartable (``max_restarts=-1``, Ray Data's default for actor pools) and their
batches are retried (``max_task_retries=-1``), so a killed actor costs a model load, not the run; a killed driver
is the updater's business (resume from the last checkpoint, as locally).

:class:`RayCaptioner` (``cocatk caption --ray``) is the same pipeline with CoCa's generator in the actors: captions
stream back in order to the caller, which writes them (the index's captions table or an output file) in its own
checkpoints.

ray is imported inside the functions: importing this module is cheap and does not need the ``ray`` extra.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CocatkError, MissingDependencyError
from ..images import DEFAULT_MAX_MEGAPIXELS, ImageDecodeError, load_image
from ..sources import MemberRef, read_source
from .encoder import Encoded, EncodeJob, StageTimer, hash_bytes

#: Files per decode task. Small enough that a few tasks per core keep the actors fed, large enough that the per-task
#: overhead (a few ms) stays small against decoding (1-100 ms per photo).
DECODE_BATCH = 16
#: Images per model call: on a GPU the H100 runs were fastest from 128 up (benchmarks/RESULTS.md); on a CPU 32 is
#: the model's own default.
GPU_BATCH = 128
#: Memory reserved per decode task (bytes).
DECODE_MEMORY = 512 << 20
#: CPUs per model actor when the cluster has no GPU ("one model per N CPUs"); the rest decode.
DEFAULT_CPUS_PER_ACTOR = 4
#: Test-only fault injection: when the file this names exists, the next actor batch removes it and kills its own
#: process (a crash in the middle of a run, as the OOM killer would do it).
FAULT_ENV = "COCATK_RAY_KILL_ACTOR_ONCE"

_SHARED_FS = "every node must see the files at the same path: index from a shared filesystem"


class RayEncoderError(CocatkError):
    """The Ray pipeline failed (a model that cannot load on the workers, a lost cluster)."""


def require_ray() -> None:
    """Raise MissingDependencyError (naming the ``ray`` extra) unless Ray Data is installed; imports nothing."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise MissingDependencyError("--ray needs Ray Data, which is not installed", hint="pip install 'cocatk[ray]'")


def _import_ray() -> Any:
    require_ray()
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"--ray needs Ray Data, which is not installed ({e})", hint="pip install 'cocatk[ray]'"
        ) from e
    return ray


# ---- worker side ---------------------------------------------------------------------------------------------------
#: Per worker process: the ``known`` hash sets by object ref.
_CACHE: dict[Any, Any] = {}


def _known(ref: Any) -> Collection[str]:
    if ref is None:
        return ()
    key = ("known", ref.hex())
    if key not in _CACHE:
        import ray

        for old in [k for k in _CACHE if k[0] == "known"]:  # one encode call at a time: drop the previous set
            del _CACHE[old]
        _CACHE[key] = ray.get(ref)
    return _CACHE[key]  # type: ignore[no-any-return]


def _decode_batch(
    batch: dict[str, np.ndarray], *, pixels: Any, draft: int | None, max_megapixels: float | None, known_ref: Any
) -> dict[str, Any]:
    """CPU task: read, hash and (unless the content is known) decode + preprocess each file of the batch.

    ``pixels`` is the model's preprocessing: a :func:`cocatk.preprocess.describe` dict (the usual case: PIL only,
    (S, S, 3) uint8 out, the actor normalises; no torch in this process) or the transform itself (float32 out).
    ``draft``: JPEG draft decoding near this size, as the local path that this run must equal does it (None: full).
    """
    from ..preprocess import resize_crop

    known = _known(known_ref)
    geometric = isinstance(pixels, dict)
    n = len(batch["pos"])
    hashes, reasons, details = [""] * n, [""] * n, [""] * n
    out = [b""] * n
    read_s, decode_s = np.zeros(n), np.zeros(n)
    queued: set[str] = set()  # contents decoded in this batch: a repeat is encoded once
    for i in range(n):
        path = os.fsdecode(batch["path"][i])  # a file, or the shard that holds an item (offset >= 0)
        t = time.perf_counter()
        try:
            data = read_source(path, int(batch["offset"][i]), int(batch["size"][i]), str(batch["field"][i]))
        except OSError as e:
            detail = e.strerror or type(e).__name__
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                detail += f" on worker {socket.gethostname()} ({_SHARED_FS})"
            reasons[i], details[i] = "unreadable", detail
            continue
        h = hashes[i] = hash_bytes(data)
        read_s[i] = time.perf_counter() - t
        if (not batch["need_decode"][i] and h in known) or h in queued:
            continue
        try:
            image = load_image(data, draft_size=draft, max_megapixels=max_megapixels)
            if geometric:
                out[i] = resize_crop(image, pixels).tobytes()
            else:
                out[i] = np.ascontiguousarray(pixels(image).numpy(), dtype=np.float32).tobytes()
            queued.add(h)
        except ImageDecodeError as e:
            reasons[i], details[i] = e.reason, e.detail
        except Exception as e:  # preprocessing failure on an odd image: as LocalEncoder, skip the file
            reasons[i], details[i] = "decode error", str(e)[:160]
        decode_s[i] = time.perf_counter() - t - read_s[i]
    return {
        "pos": np.asarray(batch["pos"], dtype=np.int64),
        "hash": np.array(hashes, dtype=object),
        "reason": np.array(reasons, dtype=object),
        "detail": np.array(details, dtype=object),
        "read_s": read_s,
        "decode_s": decode_s,
        "pixels": np.array(out, dtype=object),
    }


class _ModelActor:
    """One model per actor (loaded once, in ``__init__``); turns the decode tasks' pixels into the model's input."""

    def __init__(
        self,
        model: str,
        pretrained: str,
        device: str,
        precision: str | None,
        threads: int,
        thread_cap: int | None = None,
        norm: dict[str, Any] | None = None,
    ):
        from .._imports import defer_optional_imports

        # This process is the actor's own: open_clip without transformers and timm unless the model needs them
        # (load_model gives them back), ~1 s of a cold start on 2 cores.
        defer_optional_imports()
        import torch

        from ..models import load_model
        from .encoder import ThreadTuner

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        # torch threads per batch on a CPU: tuned by measuring, as the local encoder does, between `threads` (the
        # CPUs Ray reserved) and `thread_cap` (a local Ray: every core, since its decode tasks leave cores idle while
        # they wait on the model; on 2 cores one thread ran the model at half the local rate).
        self.thread_cap = max(1, thread_cap or threads) if device == "cpu" else 0
        self.tuner = ThreadTuner()
        self.model = load_model(model, pretrained, device=device, precision=precision)
        self.size = self.model.image_size
        #: The decode tasks' preprocessing description: their pixels are (S, S, 3) uint8 to normalise here; None:
        #: float32 (3, S, S), already normalised.
        self.norm = norm

    def _inputs(self, batch: dict[str, np.ndarray]) -> tuple[Any, list[int], int]:
        """Pop the batch's pixels: (the model's input for the rows that have pixels, those rows, the batch size)."""
        import torch

        marker = os.environ.get(FAULT_ENV)
        if marker:
            with contextlib.suppress(OSError):
                os.rename(marker, marker + ".fired")  # atomic: exactly one actor batch claims it
                os._exit(1)
        pixels = batch.pop("pixels")
        n = len(pixels)
        todo = [i for i in range(n) if len(pixels[i])]
        if not todo:
            return None, todo, n
        s = self.size
        if self.norm is not None:
            from ..preprocess import normalize

            x = normalize(np.stack([np.frombuffer(pixels[i], np.uint8).reshape(s, s, 3) for i in todo]), self.norm)
        else:
            x = torch.from_numpy(np.stack([np.frombuffer(pixels[i], np.float32).reshape(3, s, s) for i in todo]))
        return x, todo, n

    def _tuned(self, run: Any, n: int) -> Any:
        """``run()`` with the torch threads the tuner picks (CPU), observing its seconds per image."""
        import torch

        threads = self.tuner.pick(self.thread_cap) if self.thread_cap else 0
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        started = time.perf_counter()
        out = run()
        if threads:
            self.tuner.observe(threads, (time.perf_counter() - started) / max(1, n))
        return out


class _EmbedActor(_ModelActor):
    """Pixels to embeddings (+ decoder tokens)."""

    def __init__(self, *args: Any, tokens: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tokens = tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        x, todo, n = self._inputs(batch)
        emb_out, tok_out = [b""] * n, [b""] * n
        tok_d = np.zeros(n, dtype=np.int64)
        if todo:
            emb, toks = self._tuned(
                lambda: self.model.encode_images_and_tokens(x, batch_size=len(todo), tokens=self.tokens), len(todo)
            )
            tok_np = toks.to(torch.float16).cpu().numpy() if toks is not None else None
            for j, i in enumerate(todo):
                emb_out[i] = emb[j].tobytes()
                if tok_np is not None:
                    tok_out[i] = tok_np[j].tobytes()
                    tok_d[i] = tok_np.shape[-1]
        batch["embedding"] = np.array(emb_out, dtype=object)
        batch["tokens"] = np.array(tok_out, dtype=object)
        batch["token_dim"] = tok_d
        batch["precision"] = np.array([self.model.precision] * n, dtype=object)  # what this node resolved
        return batch


class _CaptionActor(_ModelActor):
    """Pixels to captions with CoCa's generator (:func:`cocatk.captioning.generate_captions`)."""

    def __init__(self, *args: Any, config: dict[str, Any], **kwargs: Any):
        super().__init__(*args, **kwargs)
        from ..captioning import make_config

        self.config = make_config(self.model, config)  # every field set by the driver: its settings, exactly

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from ..captioning import generate_captions

        x, todo, n = self._inputs(batch)
        text, logprob, done = [""] * n, np.full(n, np.nan), np.zeros(n, dtype=bool)
        if todo:
            caps = self._tuned(lambda: generate_captions(self.model, x, self.config, batch_size=len(todo)), len(todo))
            for i, cap in zip(todo, caps, strict=True):
                text[i], logprob[i], done[i] = cap.text, cap.logprob, True
        batch["caption"] = np.array(text, dtype=object)
        batch["logprob"] = logprob
        batch["captioned"] = done  # False with no reason: the content repeats an earlier file of its decode task
        return batch


# ---- driver side ---------------------------------------------------------------------------------------------------
class _RayRun:
    """What :class:`RayEncoder` and :class:`RayCaptioner` share: Ray's start, the layout of the actor pool, the
    decode stage, and the in-order stream of results (see the module docstring)."""

    #: Images per model call by default: (on a CPU, on a GPU).
    default_batch = (32, GPU_BATCH)
    actor: Any = None

    def __init__(
        self,
        model: str,
        pretrained: str,
        *,
        address: str | None = None,
        actors: int | None = None,
        gpus_per_actor: float | None = None,
        batch_size: int | None = None,
        max_megapixels: float | None = DEFAULT_MAX_MEGAPIXELS,
        precision: str | None = None,
        num_cpus: int | None = None,
        thread_cap: int | None = None,
    ) -> None:
        require_ray()
        self.model = model
        self.pretrained = pretrained
        self.address = address
        self.actors = actors
        self.gpus_per_actor = gpus_per_actor
        self.batch_size = batch_size
        self.max_megapixels = max_megapixels
        self.precision = precision
        self.num_cpus = num_cpus
        self.thread_cap = thread_cap
        self.workers = 0  # decode CPUs of the cluster, known once Ray is up
        self._started_ray = False
        self._pixels: tuple[Any, int] | None = None  # the decode tasks' preprocessing (see _preprocessing)
        #: How the last run was laid out (actors, GPUs/CPUs per actor, batch size), for reports and benchmarks.
        self.plan: dict[str, Any] = {}

    # -- Ray --
    def _ray(self) -> Any:
        ray = _import_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            kwargs["logging_level"] = logging.ERROR  # no banner, no advice on stderr
            # The C++ core logs an advisory about restartable actors on every run; keep stderr for cocatk's lines.
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
            # "local": always a new Ray in this process; a bare ray.init() would join whatever cluster `ray start`
            # left on this machine (found through /tmp/ray), which is not what `--ray local` asks for.
            kwargs["address"] = self.address or "local"
            if not self.address and self.num_cpus:
                kwargs["num_cpus"] = self.num_cpus
            try:
                ray.init(**kwargs)
            except Exception as e:
                if not self.address:  # a local Ray that failed half-way: stop whatever it started
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                raise RayEncoderError(
                    f"cannot start or join Ray ({self.address or 'local'}): {str(e).splitlines()[0][:200]}",
                    hint="check the address (`ray status` on the head node), or drop the address for a local Ray",
                ) from e
            self._started_ray = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the library never prints; the updater reports progress
        with contextlib.suppress(AttributeError):
            ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        return ray

    def close(self) -> None:
        """Shut down the local Ray this encoder started (a joined cluster keeps running)."""
        if self._started_ray:
            ray = _import_ray()
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _layout(self, ray: Any) -> dict[str, Any]:
        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
        gpa = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
        if gpa > 0:
            actors = self.actors or max(1, int(gpus / gpa))
            cpus_per_actor = 1
        else:
            actors = self.actors or max(1, cpus // DEFAULT_CPUS_PER_ACTOR)
            # Half the CPUs to the models, the rest to decoding (on 2 cores: one each).
            cpus_per_actor = max(1, cpus // (2 * actors))
        return {
            "actors": actors,
            "gpus_per_actor": gpa,
            "cpus_per_actor": cpus_per_actor,
            # A local Ray (one machine): an actor's torch may use every core between its batches' decoding (tuned
            # per batch); on a cluster it keeps to the CPUs it reserved, which other actors' decoding may need.
            "thread_cap": self.thread_cap
            or (max(cpus_per_actor, cpus // actors) if not self.address else cpus_per_actor),
            "device": "cuda" if gpa > 0 else "cpu",
            "batch_size": self.batch_size or self.default_batch[gpa > 0],
            "cluster_cpus": cpus,
            "cluster_gpus": gpus,
        }

    def _preprocessing(self) -> tuple[Any, int]:
        """What the decode tasks apply, and the image size (draft decoding): the description of the model's
        transform (torch-free tasks) when it has the standard shape, else the transform itself."""
        from ..models import meta_model
        from ..preprocess import describe

        if self._pixels is None:
            _, transform, size = meta_model(self.model, self.pretrained)
            spec = describe(transform)
            self._pixels = ((spec if spec is not None else transform), size)
        return self._pixels

    def _dataset(self, ray: Any, items: list[dict[str, Any]], *, draft: bool, known_ref: Any, **actor: Any) -> Any:
        """``items`` (``pos``, ``path``, ``need_decode``) through the decode tasks and the pool of ``self.actor``
        (constructed with ``actor`` besides the model's arguments)."""
        plan = self.plan = self._layout(ray)
        self.workers = max(1, plan["cluster_cpus"] - plan["actors"] * plan["cpus_per_actor"])
        pixels, size = self._preprocessing()
        # Enough blocks that every decode CPU has work and results stream back in small steps.
        blocks = max(1, min(len(items), -(-len(items) // DECODE_BATCH)))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode_batch,
            batch_size=DECODE_BATCH,
            num_cpus=1,
            # A decode holds up to a 100 MP RGB image (300 MB) plus the file. Declaring it also keeps decoding in
            # its own CPU tasks: Ray Data fuses a task stage into the actor stage when their resources match (CPU
            # actors), and the actor would then decode and encode in turn on one core while the others idle.
            memory=DECODE_MEMORY,
            fn_kwargs={
                "pixels": pixels,
                "draft": size if draft else None,
                "max_megapixels": self.max_megapixels,
                "known_ref": known_ref,
            },
        )
        return ds.map_batches(
            self.actor,
            batch_size=plan["batch_size"],
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_gpus=plan["gpus_per_actor"] or None,
            num_cpus=plan["cpus_per_actor"],
            fn_constructor_kwargs={
                "model": self.model,
                "pretrained": self.pretrained,
                "device": plan["device"],
                "precision": self.precision,
                "threads": plan["cpus_per_actor"],
                "thread_cap": plan["thread_cap"] if plan["device"] == "cpu" else None,
                "norm": pixels if isinstance(pixels, dict) else None,
                **actor,
            },
            # Fault tolerance: Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1 (its
            # actor_pool_map_operator.py, Ray 2.60): a killed actor is restarted (a model load) and its batch
            # retried; the driver keys results by job position and yields each once, so nothing is lost or doubled.
        )

    def _ordered(self, ds: Any, n: int, timed: StageTimer, kept: str) -> Iterator[tuple[int, dict[str, Any], int]]:
        """(position, batch, row) for positions 0..n-1 in order, each once, as the cluster finishes blocks. ``kept``
        says what a failure leaves (the start of the errors' hints)."""
        buffer: dict[int, tuple[dict[str, Any], int]] = {}
        nxt = 0
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        first = True
        while nxt < n:
            # The wait for the first block is start-up (worker processes, the actors' model loads): its own figure.
            with timed("ray_first_result" if first else "ray"):
                first = False
                try:
                    batch = next(batches, None)
                except Exception as e:
                    raise RayEncoderError(
                        f"the Ray pipeline failed: {str(e).splitlines()[0][:300]}",
                        hint=f"{kept}; fix the cause and run again (COCATK_DEBUG=1 shows the workers' traceback)",
                    ) from e
            if batch is None:
                missing = n - nxt - len(buffer)
                raise RayEncoderError(
                    f"the Ray pipeline ended with {missing} results missing", hint=f"{kept}; run again to resume"
                )
            for i in range(len(batch["pos"])):
                pos = int(batch["pos"][i])
                if pos < nxt or pos in buffer:
                    continue  # a retried block delivered twice: each job is yielded once
                buffer[pos] = (batch, i)
            while nxt in buffer:
                batch_i, i = buffer.pop(nxt)
                yield nxt, batch_i, i
                nxt += 1


class RayEncoder(_RayRun):
    """Encode on a Ray cluster (see the module docstring). Ray starts on the first :meth:`encode`, not before.

    Args:
        model, pretrained: the index's model (its manifest's ``model`` and ``pretrained``).
        address: None starts a local Ray in this process; ``auto`` or ``ray://host:port`` joins a cluster.
        actors: model actors (default: one per GPU / ``gpus_per_actor``, or one per 4 CPUs without GPUs).
        gpus_per_actor: GPUs per actor (default 1 when the cluster has GPUs, else 0: CPU actors). Fractions share
            a GPU between actors.
        batch_size: images per model call (default 128 on a GPU, 32 on a CPU).
        max_megapixels: as locally, larger images are recorded as ``too large``.
        precision: ``auto`` (default), ``fp32``, ``bf16``: resolved by each actor for its own device and CPU (see
            :func:`cocatk.models.resolve_precision`); each embedding's is recorded in the manifest.
        num_cpus: CPUs of the local Ray this starts (default all); ignored when joining a cluster.
        thread_cap: the most torch threads a CPU actor may use, tuned per batch from its reserved CPUs up (default:
            a local Ray's cores per actor; on a cluster the reserved CPUs, i.e. no tuning).

    Example:
        >>> enc = RayEncoder(ix.manifest["model"], ix.manifest["pretrained"])  # doctest: +SKIP
        >>> ix.update(["/shared/photos"], encoder=enc)  # doctest: +SKIP
    """

    actor = _EmbedActor

    def token_shape(self) -> tuple[int, int]:
        """(T, D) of the decoder tokens, from the model built on the meta device (no weights, no Ray)."""
        import torch

        from ..models import meta_model

        m, _, size = meta_model(self.model, self.pretrained)
        _, toks = m._encode_image(torch.zeros(1, 3, size, size, device="meta"), normalize=False)
        t, d = toks.shape[1:]
        return int(t), int(d)

    def encode(
        self, jobs: Sequence[EncodeJob], *, known: Collection[str], tokens: bool, timed: StageTimer
    ) -> Iterator[Encoded]:
        """One :class:`Encoded` per job, in job order, streamed as the cluster finishes blocks."""
        if not jobs:
            return
        with timed("ray_start"):
            ray = self._ray()
            known_ref = ray.put(frozenset(known)) if known else None
            items = [_item(i, j) for i, j in enumerate(jobs)]
            ds = self._dataset(ray, items, draft=True, known_ref=known_ref, tokens=tokens)
        started: set[str] = set()  # contents given an embedding in this call: a later repeat reuses it
        for pos, batch, i in self._ordered(
            ds, len(jobs), timed, "the index keeps everything up to its last checkpoint"
        ):
            res = self._result(jobs[pos], batch, i, tokens)
            if res.embedding is not None:
                if res.hash in started:  # the same content in two blocks: committed as a copy of the first
                    res.embedding = res.tokens = None
                else:
                    started.add(res.hash or "")
            yield res

    def _result(self, job: EncodeJob, batch: dict[str, np.ndarray], i: int, tokens: bool) -> Encoded:
        out = Encoded(job, read_s=float(batch["read_s"][i]), decode_s=float(batch["decode_s"][i]))
        out.precision = str(batch["precision"][i]) if "precision" in batch else None
        out.hash = str(batch["hash"][i]) or None
        reason = str(batch["reason"][i])
        if reason:
            out.error = ImageDecodeError(reason, str(batch["detail"][i]), job.path)
            return out
        emb = batch["embedding"][i]
        if len(emb):
            out.embedding = np.frombuffer(emb, dtype=np.float32).copy()
            tok = batch["tokens"][i]
            if tokens and len(tok):
                out.tokens = np.frombuffer(tok, dtype=np.float16).reshape(-1, int(batch["token_dim"][i])).copy()
        return out


@dataclass
class RayCaption:
    """One file's result from :meth:`RayCaptioner.caption`: a caption, or why there is none."""

    hash: str | None  # of the bytes the worker read
    caption: str | None = None
    logprob: float | None = None
    reason: str = ""  # "" when captioned, else as locally ("unreadable", "truncated", ...)
    detail: str = ""


class RayCaptioner(_RayRun):
    """Caption files on a Ray cluster: the decode tasks of :class:`RayEncoder`, then an actor pool running CoCa's
    generator (:func:`cocatk.captioning.generate_captions`); the captions stream back in order to the caller, who
    writes them (``cocatk caption --ray``: the index's captions table or the output file, checkpointed as locally).

    Arguments as :class:`RayEncoder`'s; ``batch_size`` is images per generator call (default 16, 64 on a GPU).

    Example:
        >>> with RayCaptioner("coca-l14", "laion2b_s13b_b90k", address="auto") as rc:  # doctest: +SKIP
        ...     for res in rc.caption(["/shared/a.jpg"], {"strategy": "beam", "num_beams": 3}):
        ...         print(res.caption)
    """

    actor = _CaptionActor
    default_batch = (16, 64)

    def caption(
        self,
        paths: Sequence[str | MemberRef],
        config: Any,
        *,
        draft: bool = True,
        timed: StageTimer | None = None,
    ) -> Iterator[RayCaption]:
        """One :class:`RayCaption` per path, in order.

        Args:
            paths: files, or the places of indexed items (:meth:`IndexFolder.item_sources`: a shard's member, a
                table's row), as the workers read them.
            config: the generation settings (a :class:`~cocatk.captioning.GenerationConfig` or its fields); pass the
                driver's resolved config so that every actor runs exactly these settings.
            draft: JPEG draft decoding near the model's input size, as an index run and ``caption_index`` decode;
                False decodes at full size, as ``recaption`` does locally.
        """
        import dataclasses

        if not paths:
            return
        timed = timed or (lambda stage: contextlib.nullcontext())
        fields = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
        with timed("ray_start"):
            ray = self._ray()
            items = [_row(i, _source_of(p), True) for i, p in enumerate(paths)]
            ds = self._dataset(ray, items, draft=draft, known_ref=None, config=fields)
        # content hash -> caption of the recent files: a decode task sends a content once, so a repeat's first copy is
        # among the last DECODE_BATCH files (bounded: a 100M-file run must not keep every caption)
        made: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        for _, batch, i in self._ordered(ds, len(paths), timed, "the captions written so far are kept"):
            out = RayCaption(hash=str(batch["hash"][i]) or None)
            out.reason, out.detail = str(batch["reason"][i]), str(batch["detail"][i])
            if out.reason:
                yield out
                continue
            if batch["captioned"][i]:
                out.caption, out.logprob = str(batch["caption"][i]), float(batch["logprob"][i])
                made[out.hash or ""] = (out.caption, out.logprob)
                made.move_to_end(out.hash or "")
                if len(made) > DECODE_BATCH:
                    made.popitem(last=False)
            elif (out.hash or "") in made:  # the same bytes earlier in its decode task (so earlier in order)
                out.caption, out.logprob = made[out.hash or ""]
            else:  # not expected (a decode task's files are in order): recorded, and the next run captions it
                out.reason, out.detail = "not captioned", "a repeat of a file captioned after it; run again"
            yield out


def _source_of(source: str | MemberRef) -> tuple[str, int, int, str]:
    """What to read for a caption: a file's path, or an indexed item's place (:meth:`IndexFolder.item_sources`)."""
    if isinstance(source, MemberRef):
        return source.shard, source.offset, source.size, source.field
    return source, -1, -1, ""


def _item(pos: int, job: EncodeJob) -> dict[str, Any]:
    """A job as a row of the Ray dataset: what to read (a file, or a byte range of a shard) and whether to decode."""
    return _row(pos, job.source(), job.need_decode)


def _row(pos: int, source: tuple[str, int, int, str], need_decode: bool) -> dict[str, Any]:
    path, offset, size, field = source
    return {"pos": pos, "path": os.fsencode(path), "offset": offset, "size": size, "field": field,
            "need_decode": need_decode}  # fmt: skip


__all__ = ["FAULT_ENV", "RayCaption", "RayCaptioner", "RayEncoder", "RayEncoderError", "require_ray"]
