"""`cocatk index --ray` against the local encoder on the same folder and the same machine; and the single writer's
commit rate (how many vectors per second the driver can commit, whatever encodes them).

    python benchmarks/bench_ray.py --n 2000             # 2000 photos (640x480 JPEG), coca_ViT-B-32 random weights
    python benchmarks/bench_ray.py --n 60 --model tests/data/coca_tiny.json --reps 1
    python benchmarks/bench_ray.py --writer 20000       # only the writer: 20k files through a model-free encoder

- ``local``: ``Index.update`` with the default LocalEncoder (decode threads + the model in process), with no Ray
  process on the machine.
- ``ray_cold``: ``Index.update(encoder=RayEncoder(...))`` into a fresh index, Ray started by the run (``ray_start``
  is included in the total: it is what `cocatk index --ray local` pays); ``ray_warm``: a second run in the same Ray
  session (Ray already up, the actors start again); then Ray is shut down. ``--reps`` alternations, medians.
  ``ray_warm_1thread`` (last repetition): the actor's torch held to the one CPU it reserves, the behaviour before
  per-batch thread tuning. The model is loaded once in each actor (included), and once in the local process before
  the clock starts. The ONNX text export that follows a first index run is switched off (it is not encoding).
- ``writer``: an encoder that returns a seeded random unit vector per file without decoding anything, so the
  figure is scan + hash + SQLite rows + FAISS adds + checkpoints: the ceiling of one driver.

Overhead = (ray - local) / local. Ratios are measured within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine_info, median, print_table, write_record


def make_photos(folder: Path, n: int, size: tuple[int, int] = (640, 480)) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = (rng.random((size[1] // 16, size[0] // 16, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"p{i:05d}.jpg", quality=90)


class RandomEncoder:
    """No model, no decode: a seeded unit vector per content (the writer benchmark)."""

    workers = 0

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def token_shape(self) -> tuple[int, int]:
        return (1, self.dim)

    def encode(self, jobs: Sequence[Any], *, known: Collection[str], tokens: bool, timed: Any) -> Iterator[Any]:
        from cocatk.retrieval.encoder import Encoded, hash_bytes

        rng = np.random.default_rng(0)
        for job in jobs:
            h = hash_bytes(Path(job.path).read_bytes())
            v = rng.standard_normal(self.dim).astype(np.float32)
            yield Encoded(job, hash=h, embedding=v / np.linalg.norm(v))


def bench_writer(n: int, dim: int, tmp: Path) -> dict[str, Any]:
    from cocatk.retrieval import Index

    folder = tmp / "writer"
    folder.mkdir()
    for i in range(n):  # distinct tiny files; the encoder never decodes them
        (folder / f"f{i:06d}.jpg").write_bytes(i.to_bytes(8, "little"))
    # The manifest of coca_ViT-L-14 (768-d) without loading its weights: the encoder never calls the model.
    ix = Index.open(tmp / "writer-idx", model="coca_ViT-L-14", pretrained="none", device="cpu", create=True)
    t = time.perf_counter()
    r = ix.update([folder], encoder=RandomEncoder(ix.dim))
    dt = time.perf_counter() - t
    assert r.new == n
    return {"files": n, "dim": ix.dim, "seconds": dt, "vectors_per_s": n / dt, "timings": r.timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--writer", type=int, default=0, help="only the writer benchmark, with this many files")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions of local / Ray (medians)")
    args = ap.parse_args()
    # The one-time ONNX text export after a first index run is not encoding: keep it out of every run.
    os.environ["COCATK_TEXT_ONNX"] = "0"

    from cocatk.models import load_model
    from cocatk.retrieval import Index
    from cocatk.retrieval.ray_encoder import RayEncoder

    os.chdir(Path(__file__).resolve().parent.parent)  # tests/data paths
    tmp = Path(tempfile.mkdtemp(prefix="cocatk-bench-ray-"))
    record: dict[str, Any] = {"machine": machine_info()}
    try:
        if args.writer:
            w = bench_writer(args.writer, 768, tmp)
            rate = f"{w['vectors_per_s']:.0f} vectors/s ({w['dim']}-d)"
            print(f"writer: {w['files']} files in {w['seconds']:.1f} s = {rate}; {w['timings']}")
            record["writer"] = w
            print("record:", write_record("writer", record))
            return
        photos = tmp / "photos"
        make_photos(photos, args.n)
        load_model(args.model, "none", device="cpu")
        runs: dict[str, list[dict[str, Any]]] = {}

        def run(name: str, encoder: Any = None) -> None:
            folder = tmp / f"{name}-{len(runs.get(name, []))}"
            ix = Index.open(folder, model=args.model, pretrained="none", device="cpu", create=True)
            enc = encoder(ix) if encoder else None
            t = time.perf_counter()
            r = ix.update([photos], encoder=enc)
            out = {
                "seconds": time.perf_counter() - t,
                "encoded": r.encoded,
                "timings": r.timings,
                "load": os.getloadavg(),
            }
            if enc is not None:
                out["plan"] = enc.plan
            runs.setdefault(name, []).append(out)
            ix.close()
            shutil.rmtree(folder, ignore_errors=True)
            print(name, {k: v for k, v in out.items() if k != "timings"}, flush=True)

        import ray

        # Alternating, so a change of load hits both: local (no Ray process on the machine), then a Ray session
        # started by the run (`--ray local` as a user runs it: Ray's start included), a second run in the same
        # session (Ray already up; the actors start again), and Ray shut down before the next local run.
        for rep in range(args.reps):
            run("local")
            run("ray_cold", lambda ix: RayEncoder(args.model, "none"))
            run("ray_warm", lambda ix: RayEncoder(args.model, "none"))
            if rep == args.reps - 1:  # the actor's torch held to its one reserved CPU (before per-batch tuning)
                run("ray_warm_1thread", lambda ix: RayEncoder(args.model, "none", thread_cap=1))
            ray.shutdown()
        local = median([r["seconds"] for r in runs["local"]])
        rows = []
        for name, rs in runs.items():
            s = median([r["seconds"] for r in rs])
            t = rs[0]["timings"]
            rows.append(
                [
                    name,
                    len(rs),
                    " / ".join(f"{r['seconds']:.1f}" for r in rs),
                    f"{s:.1f}",
                    f"{args.n / s:.1f}",
                    f"{100 * (s - local) / local:+.0f} %",
                    f"{median([r['timings'].get('ray_start', 0) for r in rs]):.1f}",
                    f"{median([r['timings'].get('ray_first_result', 0) for r in rs]):.1f}",
                    f"{t.get('ray', t.get('model', 0) + t.get('wait_decode', 0)) + t.get('ray_first_result', 0):.1f}",
                ]
            )
        print_table(
            f"{args.n} photos 640x480, {args.model} (random weights) on the CPU; medians of {args.reps}",
            [
                "run",
                "n",
                "seconds (each)",
                "median s",
                "images/s",
                "vs local",
                "ray start s",
                "first result s",
                "encode wait s",
            ],  # fmt: skip
            rows,
        )
        record.update({"n": args.n, "model": args.model, "reps": args.reps, "runs": runs, "local_median_s": local})
        print("record:", write_record("ray", record))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
