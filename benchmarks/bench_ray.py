"""`cocatk index --ray` against the local encoder on the same folder and the same machine; and the single writer's
commit rate (how many vectors per second the driver can commit, whatever encodes them).

    python benchmarks/bench_ray.py --n 2000             # 2000 photos (640x480 JPEG), coca_ViT-B-32 random weights
    python benchmarks/bench_ray.py --n 60 --model tests/data/coca_tiny.json --reps 1
    python benchmarks/bench_ray.py --writer 20000       # only the writer: 20k files through a model-free encoder
    python benchmarks/bench_ray.py --n 2000 --pretrained weights.safetensors --cli   # whole `cocatk index` runs

- ``local``: ``Index.update`` with the default LocalEncoder (decode threads + the model in process), with no Ray
  process on the machine.
- ``ray_cold``: ``Index.update(encoder=RayEncoder(...))`` into a fresh index, Ray started by the run (``ray_start``
  is included in the total: it is what `cocatk index --ray local` pays); ``ray_warm``: a second run in the same Ray
  session (Ray already up, the actors start again); then Ray is shut down. ``--reps`` alternations, medians.
  ``ray_warm_1thread`` (last repetition): the actor's torch held to the one CPU it reserves, the behaviour before
  per-batch thread tuning. The model is loaded once in each actor (included), and once in the local process before
  the clock starts. The ONNX text export that follows a first index run is switched off (it is not encoding).
- ``--cli``: whole ``cocatk index PHOTOS --index NEW [--ray local]`` processes instead, as a user runs them: each
  pays its imports, the model load (the Ray driver loads it too: a new index records it) and, with ``--ray``, Ray's
  start, in its wall time; ``cli_local`` then ``cli_ray``, alternating.
- ``--pretrained``: ``none`` (seeded random weights, built by initialising every parameter: 2-3 s a load on 2 cores)
  or a weights file (memory-mapped, as for a user with real weights: 0.5 s).
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


def bench_cli(args: argparse.Namespace, photos: Path, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """Whole `cocatk index` processes, local then `--ray local`, alternating; wall time of each process."""
    import json
    import subprocess
    import sys

    cocatk = [sys.executable, "-m", "cocatk"]
    runs: dict[str, list[dict[str, Any]]] = {"cli_local": [], "cli_ray": []}
    for rep in range(args.reps):
        for name, extra in (("cli_local", []), ("cli_ray", ["--ray", "local"])):
            folder = tmp / f"{name}-{rep}"
            cmd = [*cocatk, "index", str(photos), "--index", str(folder), "--model", args.model]
            cmd += ["--pretrained", args.pretrained, "--json", *extra]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr[-2000:]}")
            report = json.loads(proc.stdout)
            out = {"seconds": seconds, "encoded": report["encoded"], "timings": report["timings"]}
            out["load"] = os.getloadavg()
            runs[name].append(out)
            shutil.rmtree(folder, ignore_errors=True)
            t_ = report["timings"]
            print(name, f"{seconds:.1f} s", {k: round(t_.get(k, 0), 1) for k in ("ray_start", "ray_first_result")})
    local = median([r["seconds"] for r in runs["cli_local"]])
    ray = median([r["seconds"] for r in runs["cli_ray"]])
    print_table(
        f"whole `cocatk index` processes: {args.n} photos 640x480, {args.model} ({args.pretrained}); "
        f"medians of {args.reps}",
        ["run", "seconds (each)", "median s", "vs local"],
        [
            [k, " / ".join(f"{r['seconds']:.1f}" for r in rs), f"{m:.1f}", f"{100 * (m - local) / local:+.0f} %"]
            for k, rs, m in (("cli_local", runs["cli_local"], local), ("cli_ray", runs["cli_ray"], ray))
        ],
    )
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--writer", type=int, default=0, help="only the writer benchmark, with this many files")
    ap.add_argument("--reps", type=int, default=3, help="alternating repetitions of local / Ray (medians)")
    ap.add_argument("--pretrained", default="none", help="'none' (random weights) or a weights file")
    ap.add_argument("--cli", action="store_true", help="time whole `cocatk index` processes (local, --ray local)")
    ap.add_argument("--tag", default="", help="record name suffix (ray-TAG-<machine>.json)")
    args = ap.parse_args()
    record_name = "ray" + (f"-{args.tag}" if args.tag else "")
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
        if Path(args.pretrained).is_file():
            with open(args.pretrained, "rb") as f:  # into the page cache, for every run alike
                while f.read(1 << 24):
                    pass
        if args.cli:
            runs_cli = bench_cli(args, photos, tmp)
            record.update({"n": args.n, "model": args.model, "pretrained": args.pretrained, "reps": args.reps})
            record.update({"mode": "cli", "runs": runs_cli})
            print("record:", write_record(record_name, record))
            return
        load_model(args.model, args.pretrained, device="cpu")
        runs: dict[str, list[dict[str, Any]]] = {}

        def run(name: str, encoder: Any = None) -> None:
            folder = tmp / f"{name}-{len(runs.get(name, []))}"
            ix = Index.open(folder, model=args.model, pretrained=args.pretrained, device="cpu", create=True)
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
            run("ray_cold", lambda ix: RayEncoder(args.model, args.pretrained))
            run("ray_warm", lambda ix: RayEncoder(args.model, args.pretrained))
            if rep == args.reps - 1:  # the actor's torch held to its one reserved CPU (before per-batch tuning)
                run("ray_warm_1thread", lambda ix: RayEncoder(args.model, args.pretrained, thread_cap=1))
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
            f"{args.n} photos 640x480, {args.model} ({args.pretrained}) on the CPU; medians of {args.reps}",
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
        record.update({"n": args.n, "model": args.model, "pretrained": args.pretrained, "reps": args.reps})
        record.update({"runs": runs, "local_median_s": local})
        print("record:", write_record(record_name, record))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
