"""Indexing throughput: ``cocatk.retrieval.Index.update`` vs a plain open_clip loop over the same photo folders.

    python benchmarks/bench_index.py            # 300 photos at 4000x3000 (12 MP) and 300 at 1024x768
    python benchmarks/bench_index.py --quick    # 60 of each
    python benchmarks/bench_index.py --quick --load 1 --tag loaded   # with one busy process beside it

The photos are generated once into /tmp/cocatk-bench (``_photos.py``: photo-like content, camera EXIF, 2-4 MB per
12 MP JPEG) and reused by later runs; generation is not timed.

- ``baseline``: what a user writes with open_clip alone: for each batch of 32 paths, ``PIL.Image.open`` ->
  the model's preprocess -> ``model.encode_image`` under ``torch.no_grad()``, fp32, one thread decoding, torch with
  its default threads (every core).
- ``cocatk`` variants: ``Index.open(..., create=True).update([folder])`` into a fresh index folder: scan, content
  hash, threaded decode with JPEG draft mode and EXIF orientation, batched encoding overlapped with decoding, SQLite
  and FAISS writes, checkpoints. ``cocatk`` is the default (``--precision auto``: bf16 weights on a CPU with AMX;
  torch threads re-balanced before every batch), ``cocatk-fp32`` forces fp32, ``cocatk-fp32-1t`` also fixes one
  torch thread (the previous default on 2 cores). Models are loaded before the clock starts for every side.

Both encode ``coca_ViT-B-32`` with random weights on the CPU by default (the speed is the real model's). The figure
is images/s over the whole folder; the ratio cocatk / baseline is the headline (targets: >= 3x on 12 MP JPEGs and
>= 1.5x on 1024 px). ``--reps`` alternates the sides and reports medians; ``--load N`` runs N busy processes beside
(a loaded machine); the load average before each run is recorded.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, median, print_table, write_record
from _photos import CACHE_DIR, ensure_photo_set


def baseline_loop(m: Any, paths: list[Path], batch_size: int = 32) -> tuple[float, int, dict[str, float]]:
    """The plain open_clip loop (bf16 autocast on a GPU, like cocatk); returns (seconds, images encoded, stage
    seconds: ``decode_preprocess`` for open + convert + preprocess + stack, ``model`` for encode_image)."""
    import torch
    from PIL import Image

    cuda = m.device.startswith("cuda")
    t = time.perf_counter()
    n = 0
    stages = {"decode_preprocess": 0.0, "model": 0.0}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        for i in range(0, len(paths), batch_size):
            t1 = time.perf_counter()
            batch = torch.stack([m.preprocess(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]])
            t2 = time.perf_counter()
            feats = m.model.encode_image(batch.to(m.device)).float().cpu()
            n += feats.shape[0]
            stages["decode_preprocess"] += t2 - t1
            stages["model"] += time.perf_counter() - t2
    return time.perf_counter() - t, n, stages


def cocatk_index(
    model_name: str,
    folder: Path,
    batch_size: int,
    workers: int | None,
    device: str,
    precision: str | None = None,
    model_threads: int | None = None,
) -> tuple[float, int, dict]:
    """``Index.update`` into a fresh index folder; returns (seconds, images encoded, report + ``torch_threads``: the
    torch threads of each batch). ``model_threads`` None is cocatk's default (re-balanced per batch)."""
    from cocatk.retrieval import Index
    from cocatk.retrieval.encoder import LocalEncoder

    tmp = Path(tempfile.mkdtemp(prefix="cocatk-bench-index-"))
    try:
        index = Index.open(
            tmp / "index", model=model_name, pretrained="none", device=device, precision=precision, create=True
        )
        encoder = LocalEncoder(index.model, workers=workers, batch_size=batch_size, model_threads=model_threads)
        t = time.perf_counter()
        report = index.update([folder], batch_size=batch_size, workers=workers, encoder=encoder)
        seconds = time.perf_counter() - t
        index.close()
        return seconds, report.encoded, {**report.to_dict(), "torch_threads": encoder.thread_log}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


#: cocatk settings compared against the plain loop: (name, precision, torch threads or None for re-balanced).
VARIANTS = {
    "cocatk": ("auto", None),  # the default: bf16 weights where measured faster (AMX), threads re-balanced
    "cocatk-fp32": ("fp32", None),
    "cocatk-fp32-1t": ("fp32", 1),  # the previous default on 2 cores: one torch thread for the whole run
}


def start_load(n: int) -> list[subprocess.Popen]:
    """``n`` busy processes (one core each) standing for the other work of a loaded machine."""
    code = "import time\nwhile True:\n    sum(range(10000))"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 photos per set")
    ap.add_argument("--n", type=int, default=None, help="photos per set (default 300, 60 with --quick)")
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=None, help="cocatk decode threads (default: cocatk's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda, for both sides)")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR, help="where the generated photos are kept")
    ap.add_argument("--out", type=Path, default=None, help="folder of the JSON record (default benchmarks/results)")
    ap.add_argument("--sets", nargs="*", default=["12mp", "1024"], choices=["12mp", "1024"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reps", type=int, default=1, help="alternate baseline and cocatk this many times (medians)")
    ap.add_argument("--load", type=int, default=0, help="busy processes running beside the benchmark (a loaded run)")
    ap.add_argument("--tag", default=None, help="suffix of the record's name (e.g. quiet, loaded)")
    args = ap.parse_args()

    import torch

    from cocatk import load_model

    n = args.n or (60 if args.quick else 300)
    sizes = {"12mp": (4000, 3000), "1024": (1024, 768)}
    record: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "weights": "random",
        "device": args.device,
        "baseline_torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "busy_processes": args.load,
        "reps": args.reps,
        "results": [],
        "target": "cocatk >= 3x the plain open_clip loop on 12 MP JPEGs and >= 1.5x on 1024 px (CPU)",
    }
    base_model = load_model(args.model, pretrained="none", device=args.device, precision="fp32")
    load = start_load(args.load)
    try:
        for name in args.sets:
            w, h = sizes[name]
            folder = args.cache / f"{w}x{h}-{n}"
            t = time.perf_counter()
            paths = ensure_photo_set(folder, n, w, h, workers=os.cpu_count() or 2)
            print(f"{name}: {n} photos in {folder} ({time.perf_counter() - t:.0f} s to generate/check)", flush=True)
            mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
            for p in paths:  # warm the page cache and the model once, so no side pays the first read
                p.read_bytes()
            baseline_loop(base_model, paths[: args.batch_size // 4 or 1], args.batch_size)
            runs: dict[str, list[dict[str, Any]]] = {"baseline": [], **{v: [] for v in args.variants}}
            for _ in range(args.reps):
                load_before = os.getloadavg()[0]
                base_s, base_n, base_stages = baseline_loop(base_model, paths, args.batch_size)
                runs["baseline"].append(
                    {"s": base_s, "images_per_s": base_n / base_s, "stages_s": base_stages, "load": load_before}
                )
                print(f"  baseline: {base_n / base_s:.2f} img/s ({base_s:.1f} s, load {load_before:.2f})", flush=True)
                for v in args.variants:
                    precision, threads = VARIANTS[v]
                    load_before = os.getloadavg()[0]
                    idx_s, idx_n, report = cocatk_index(
                        args.model, folder, args.batch_size, args.workers, args.device, precision, threads
                    )
                    tl = report["torch_threads"]
                    runs[v].append(
                        {
                            "s": idx_s,
                            "images_per_s": idx_n / idx_s,
                            "encoded": idx_n,
                            "load": load_before,
                            "precisions": report["precisions"],
                            "torch_threads_mean": sum(tl) / len(tl) if tl else None,
                            "timings": report["timings"],
                        }
                    )
                    print(
                        f"  {v}: {idx_n / idx_s:.2f} images/s ({idx_s:.1f} s, load {load_before:.2f}, "
                        f"{'/'.join(report['precisions'])}, torch threads mean "
                        f"{(sum(tl) / len(tl)) if tl else 0:.2f})",
                        flush=True,
                    )
            base_rate = median([r["images_per_s"] for r in runs["baseline"]])
            entry: dict[str, Any] = {"set": name, "size": f"{w}x{h}", "n": n, "mb_per_image": mb, "runs": runs}
            entry["baseline_images_per_s"] = base_rate
            for v in args.variants:
                rate = median([r["images_per_s"] for r in runs[v]])
                entry[f"{v}_images_per_s"] = rate
                entry[f"{v}_speedup"] = rate / base_rate
            entry["loadavg_after"] = os.getloadavg()
            record["results"].append(entry)
    finally:
        for proc in load:
            proc.kill()
    print_table(
        f"indexing throughput, {args.model} random weights, {args.device}, batch {args.batch_size}, "
        f"{args.load} busy processes beside, medians of {args.reps}; baseline: plain open_clip loop, fp32, "
        f"{record['baseline_torch_threads']} torch threads",
        ["set", "MB/img", "baseline img/s", *(f"{v} img/s (x)" for v in args.variants)],
        [
            [
                r["set"],
                r["mb_per_image"],
                r["baseline_images_per_s"],
                *(f"{r[f'{v}_images_per_s']:.2f} ({r[f'{v}_speedup']:.2f}x)" for v in args.variants),
            ]
            for r in record["results"]
        ],
    )
    stages = ("decode_preprocess", "read_hash", "wait_decode", "model", "sqlite", "faiss", "scan", "other")
    rows = []
    for r in record["results"]:
        b = r["runs"]["baseline"][-1]
        rows.append([f"{r['set']} baseline", b["s"], *(b["stages_s"].get(k, "") for k in stages)])
        for v in args.variants:
            c = r["runs"][v][-1]
            rows.append([f"{r['set']} {v}", c["s"], *(c["timings"].get(k, "") for k in stages)])
    print_table(
        "where the time goes in the last repetition, seconds (cocatk: decode_preprocess and read_hash are summed "
        "over the decode threads and overlap the main thread)",
        ["run", "total", *stages],
        rows,
    )
    write_record("index" + (f"-{args.tag}" if args.tag else ""), record, args.out)


if __name__ == "__main__":
    main()
