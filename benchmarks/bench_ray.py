"""`cocatk index --ray` against the local encoder on the same folder and the same machine; and the single writer's
commit rate (how many vectors per second the driver can commit, whatever encodes them).

    python benchmarks/bench_ray.py                      # 200 photos (640x480 JPEG), coca_ViT-B-32 random weights
    python benchmarks/bench_ray.py --n 60 --model tests/data/coca_tiny.json
    python benchmarks/bench_ray.py --writer 20000       # only the writer: 20k files through a model-free encoder

- ``local``: ``Index.update`` with the default LocalEncoder (decode threads + the model in process).
- ``ray``: ``Index.update(encoder=RayEncoder(...))`` into a fresh index, Ray started by the run (``ray_start`` is
  included in the total: it is what `cocatk index --ray local` pays) and, separately, the time with Ray already up.
  The model is loaded once in each actor (included), and once in the local process before the clock starts.
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
from _common import machine_info, print_table, write_record


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
    args = ap.parse_args()

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
        runs: dict[str, dict[str, Any]] = {}

        def run(name: str, encoder: Any = None) -> None:
            ix = Index.open(tmp / name, model=args.model, pretrained="none", device="cpu", create=True)
            enc = encoder(ix) if encoder else None
            t = time.perf_counter()
            r = ix.update([photos], encoder=enc)
            runs[name] = {"seconds": time.perf_counter() - t, "encoded": r.encoded, "timings": r.timings}
            if enc is not None:
                runs[name]["plan"] = enc.plan
            print(name, runs[name], flush=True)

        run("local")
        run("ray_cold", lambda ix: RayEncoder(args.model, "none"))  # starts Ray: what `--ray local` pays
        run("ray_warm", lambda ix: RayEncoder(args.model, "none"))  # Ray already up, actors start again
        run("local_again")
        local = (runs["local"]["seconds"] + runs["local_again"]["seconds"]) / 2
        rows = []
        for name in ("local", "local_again", "ray_cold", "ray_warm"):
            s = runs[name]["seconds"]
            t = runs[name]["timings"]
            rows.append(
                [
                    name,
                    f"{s:.1f}",
                    f"{args.n / s:.1f}",
                    f"{100 * (s - local) / local:+.0f} %",
                    f"{t.get('ray_start', 0):.1f}",
                    f"{t.get('ray', t.get('model', 0) + t.get('wait_decode', 0)):.1f}",
                ]
            )
        print_table(
            f"{args.n} photos 640x480, {args.model} (random weights) on the CPU",
            ["run", "seconds", "images/s", "vs local", "ray start s", "encode wait s"],
            rows,
        )
        record.update({"n": args.n, "model": args.model, "runs": runs, "local_mean_s": local})
        print("record:", write_record("ray", record))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
