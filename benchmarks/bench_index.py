"""Indexing throughput: ``cocatk.retrieval.Index.update`` vs a plain open_clip loop over the same photo folders.

    python benchmarks/bench_index.py            # 300 photos at 4000x3000 (12 MP) and 300 at 1024x768
    python benchmarks/bench_index.py --quick    # 60 of each

The photos are generated once into /tmp/cocatk-bench (``_photos.py``: photo-like content, camera EXIF, 2-4 MB per
12 MP JPEG) and reused by later runs; generation is not timed.

- ``baseline``: what a user writes with open_clip alone: for each batch of 32 paths, ``PIL.Image.open`` ->
  the model's preprocess -> ``model.encode_image`` under ``torch.no_grad()``, one thread for decoding.
- ``cocatk``: ``Index.open(..., create=True).update([folder])`` into a fresh index folder: scan, content hash,
  threaded decode with JPEG draft mode and EXIF orientation, batched encoding overlapped with decoding, SQLite and
  FAISS writes, checkpoints. The model is loaded before the clock starts for both (the same cached model object).

Both encode with the same model (``coca_ViT-B-32`` random weights on the CPU by default: the speed is the real
model's). The figure is images/s over the whole folder; the ratio cocatk / baseline is the headline (target >= 2x
on the 12 MP set on a CPU).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_info, print_table, write_record
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
    model_name: str, folder: Path, batch_size: int, workers: int | None, device: str
) -> tuple[float, int, dict]:
    """``Index.update`` into a fresh index folder; returns (seconds, images encoded, report)."""
    from cocatk.retrieval import Index

    tmp = Path(tempfile.mkdtemp(prefix="cocatk-bench-index-"))
    try:
        index = Index.open(tmp / "index", model=model_name, pretrained="none", device=device, create=True)
        t = time.perf_counter()
        report = index.update([folder], batch_size=batch_size, workers=workers)
        seconds = time.perf_counter() - t
        index.close()
        return seconds, report.encoded, report.to_dict()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    ap.add_argument("--threads", type=int, default=1, help="torch threads (decode threads are --workers)")
    ap.add_argument("--sets", nargs="*", default=["12mp", "1024"], choices=["12mp", "1024"])
    args = ap.parse_args()

    import torch

    from cocatk import load_model

    torch.set_num_threads(args.threads)
    n = args.n or (60 if args.quick else 300)
    sizes = {"12mp": (4000, 3000), "1024": (1024, 768)}
    record: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "weights": "random",
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "results": [],
        "target": "cocatk >= 2x the plain open_clip loop on the 12 MP set (CPU)",
    }
    m = load_model(args.model, pretrained="none", device=args.device)
    for name in args.sets:
        w, h = sizes[name]
        folder = args.cache / f"{w}x{h}-{n}"
        t = time.perf_counter()
        paths = ensure_photo_set(folder, n, w, h, workers=os.cpu_count() or 2)
        print(f"{name}: {n} photos in {folder} ({time.perf_counter() - t:.0f} s to generate/check)", flush=True)
        mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
        # Warm the page cache and the model once, so neither side pays the first read.
        for p in paths:
            p.read_bytes()
        baseline_loop(m, paths[: args.batch_size // 4 or 1], args.batch_size)
        load_before = machine_info()["loadavg"]
        base_s, base_n, base_stages = baseline_loop(m, paths, args.batch_size)
        print(f"  baseline: {base_n / base_s:.2f} images/s ({base_s:.1f} s)", flush=True)
        idx_s, idx_n, report = cocatk_index(args.model, folder, args.batch_size, args.workers, args.device)
        print(f"  cocatk index: {idx_n / max(idx_s, 1e-9):.2f} images/s ({idx_s:.1f} s)", flush=True)
        record["results"].append(
            {
                "set": name,
                "size": f"{w}x{h}",
                "n": n,
                "mb_per_image": mb,
                "baseline_s": base_s,
                "baseline_images_per_s": base_n / base_s,
                "baseline_stages_s": base_stages,
                "cocatk_s": idx_s,
                "cocatk_images_per_s": idx_n / idx_s,
                "cocatk_encoded": idx_n,
                "speedup": (idx_n / idx_s) / (base_n / base_s),
                "loadavg_before": load_before,
                "loadavg_after": machine_info()["loadavg"],
                "report": {
                    k: report[k] for k in ("encoded", "failed_total", "checkpoints", "seconds", "timings", "warnings")
                },
            }
        )
    print_table(
        f"indexing throughput, {args.model} random weights, {args.device} ({torch.get_num_threads()} torch threads), "
        f"batch {args.batch_size}",
        ["set", "MB/img", "baseline img/s", "cocatk img/s", "x baseline", "load before"],
        [
            [
                r["set"],
                r["mb_per_image"],
                r["baseline_images_per_s"],
                r["cocatk_images_per_s"],
                r["speedup"],
                r["loadavg_before"][0],
            ]
            for r in record["results"]
        ],
    )
    stages = ("decode_preprocess", "read_hash", "wait_decode", "model", "sqlite", "faiss", "scan", "other")
    rows = []
    for r in record["results"]:
        rows.append([f"{r['set']} baseline", r["baseline_s"], *(r["baseline_stages_s"].get(k, "") for k in stages)])
        t = r["report"]["timings"]
        rows.append([f"{r['set']} cocatk", r["cocatk_s"], *(t[k] for k in stages)])
    print_table(
        "where the time goes, seconds (cocatk: decode_preprocess and read_hash are summed over "
        f"{int(record['results'][0]['report']['timings']['decode_threads']) if record['results'] else 0} decode "
        "threads and overlap the main thread; the main-thread stages add up to the total)",
        ["run", "total", *stages],
        rows,
    )
    write_record("index", record, args.out)


if __name__ == "__main__":
    main()
