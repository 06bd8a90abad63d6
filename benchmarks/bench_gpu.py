"""GPU figures in one run: bf16 matmul ceiling, CoCa image-encoding throughput, JPEG decode, rerank, exact search.

    python benchmarks/bench_gpu.py                 # on a CUDA machine (coca_ViT-L-14, random weights)
    python benchmarks/bench_gpu.py --smoke         # a seconds-long check of the script itself (tiny model, any device)
    python benchmarks/bench_gpu.py --out DIR       # write the JSON record into DIR instead of benchmarks/results

Sections (each one is independent: a failure is recorded and the run goes on):

1. ``matmul``: 8192^3 bf16 matrix product, TFLOP/s: the ceiling the encoder's FLOP rate is compared with.
2. ``encode``: images/s of ``CocaModel.encode_images`` (bf16 autocast, fp32) vs a plain open_clip loop
   (``model.encode_image`` under the same autocast) on preprocessed tensors already on the GPU (model-only rate),
   batch 256 and 512; the fraction of the FLOP-bound rate at 215 GFLOP per image (open_clip's profile of
   coca_ViT-L-14); tokens on/off; channels_last; ``torch.compile`` of the image tower.
3. ``decode``: images/s of JPEG -> preprocessed tensor: PIL decode + the model's preprocess on CPU threads, PIL with
   ``draft`` (JPEG DCT downscaling), and ``torchvision.io.decode_jpeg(device="cuda")`` + resize/crop/normalise on
   the GPU, at 1600x1200 and 4000x3000 (JPEG bytes in memory: disk reads are not counted).
4. ``rerank``: ``caption_loglik`` over k = 50/200 candidates with cached tokens and with tokens computed at query
   time, vs ``model.model(image, text)`` pair by pair; max abs score difference (fp32) as the honesty check.
5. ``search``: exact top-10 over 1M x 768 normalised vectors as one GPU matmul + topk (a stand-in for FAISS
   ``GpuIndexFlatIP``, whose wheel cannot be carried to the lent machine), single-query latency and batched QPS.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import ROOT, machine_info, median, percentile, print_table, timeit, write_record

#: open_clip's profile of coca_ViT-L-14 (GFLOP per image, as listed in COCA_NOTES.md).
L14_GFLOP_PER_IMAGE = 215.0
CAPTION = "a photo of a red bicycle leaning against an old brick wall next to a green door"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def section_matmul(smoke: bool) -> dict[str, Any]:
    import torch

    n = 1024 if smoke else 8192
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    times = timeit(lambda: a @ b, repeat=3 if smoke else 10, warmup=3, sync=_sync)
    t = median(times)
    return {"n": n, "ms": t * 1e3, "tflops": 2 * n**3 / t / 1e12}


def _plain_open_clip_loop(model: Any, x: Any, bs: int, dtype: Any) -> Any:
    """What a user writes with open_clip alone: no_grad + autocast, encode_image, move the features to the host."""
    import torch

    feats = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(0, x.shape[0], bs):
            feats.append(model.encode_image(x[i : i + bs]).float().cpu())
    return torch.cat(feats)


def section_encode(m: Any, smoke: bool, compile_: bool, results: dict[str, Any]) -> None:
    import torch

    s = m.image_size
    n = 64 if smoke else 1024
    batches = (16, 32) if smoke else (256, 512)
    x = torch.randn(n, 3, s, s, device=m.device)
    m32 = dataclasses.replace(m, precision="fp32")
    rows: list[dict[str, Any]] = []
    peak = results.get("matmul", {}).get("tflops")

    def record(name: str, bs: int, fn: Any, repeat: int = 3) -> None:
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        times = timeit(fn, repeat=repeat, warmup=1, sync=_sync)
        rate = n / median(times)
        row = {"variant": name, "batch": bs, "images_per_s": rate}
        if peak:
            row["flop_fraction"] = rate * L14_GFLOP_PER_IMAGE * 1e9 / (peak * 1e12)
        if torch.cuda.is_available():
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        print(f"  encode {name:32s} batch {bs:4d}: {rate:9.1f} images/s", flush=True)

    for bs in batches:
        record("cocatk bf16", bs, lambda bs=bs: m.encode_images(x, batch_size=bs))
        record("open_clip loop bf16", bs, lambda bs=bs: _plain_open_clip_loop(m.model, x, bs, torch.bfloat16))
        record("cocatk bf16 +tokens", bs, lambda bs=bs: m.encode_images_and_tokens(x, batch_size=bs))
    bs = batches[0]
    record("cocatk fp32", bs, lambda: m32.encode_images(x, batch_size=bs), repeat=2)
    record("open_clip loop fp32", bs, lambda: _plain_open_clip_loop(m.model, x, bs, None), repeat=2)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        record("cocatk fp32 (TF32 allowed)", bs, lambda: m32.encode_images(x, batch_size=bs), repeat=2)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    # channels_last only changes the patch-embedding convolution (the rest is matmuls over tokens).
    xc = x.contiguous(memory_format=torch.channels_last)
    m.model.visual.to(memory_format=torch.channels_last)
    record("cocatk bf16 channels_last", batches[-1], lambda: m.encode_images(xc, batch_size=batches[-1]))
    m.model.visual.to(memory_format=torch.contiguous_format)
    results["encode"] = rows

    if compile_:
        try:
            t0 = time.perf_counter()
            m.model.visual.compile(dynamic=False)
            m.encode_images(x[: batches[-1]], batch_size=batches[-1])
            _sync()
            results["compile_s"] = time.perf_counter() - t0
            record("cocatk bf16 torch.compile", batches[-1], lambda: m.encode_images(x, batch_size=batches[-1]))
            results["encode"] = rows
        except Exception as e:  # compile support varies with the torch/triton build; the eager figures stand
            results["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            m.model.visual._compiled_call_impl = None


def _gpu_preprocess(imgs: Any, size: int, mean: Any, std: Any) -> Any:
    """uint8 CHW images (same size) on the GPU -> normalised (N, 3, size, size): resize shortest side, centre crop."""
    import torch
    import torch.nn.functional as F

    x = torch.stack(imgs).float().div_(255)
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    return (x - mean) / std


def section_decode(m: Any, smoke: bool) -> list[dict[str, Any]]:
    import torch
    from _photos import photo_jpeg
    from PIL import Image

    workers = os.cpu_count() or 4
    sizes = [(320, 240, 16)] if smoke else [(1600, 1200, 256), (4000, 3000, 48)]
    rows = []
    size = m.image_size
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=m.device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=m.device).view(1, 3, 1, 1)
    for w, h, n in sizes:
        with ThreadPoolExecutor(workers) as pool:
            blobs = list(pool.map(lambda i, w=w, h=h: photo_jpeg(i, w, h), range(n)))
        mb = sum(map(len, blobs)) / n / 1e6

        def pil(draft: bool, blobs: list[bytes] = blobs) -> Any:
            def one(b: bytes) -> Any:
                im = Image.open(io.BytesIO(b))
                if draft:
                    im.draft("RGB", (size, size))
                return m.preprocess(im.convert("RGB"))

            with ThreadPoolExecutor(workers) as pool:
                return torch.stack(list(pool.map(one, blobs)))

        def nvjpeg(blobs: list[bytes] = blobs, chunk: int = 64) -> Any:
            from torchvision.io import decode_jpeg

            out = []
            for i in range(0, len(blobs), chunk):
                data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs[i : i + chunk]]
                imgs = decode_jpeg(data, device=m.device)
                out.append(_gpu_preprocess(imgs, size, mean, std))
            return torch.cat(out)

        variants = [
            (f"PIL + preprocess, {workers} threads", lambda: pil(False)),
            (f"PIL draft + preprocess, {workers} threads", lambda: pil(True)),
        ]
        if torch.cuda.is_available():
            variants.append(("torchvision decode_jpeg cuda + GPU resize", nvjpeg))
        for name, fn in variants:
            try:
                times = timeit(fn, repeat=2 if not smoke else 1, warmup=1, sync=_sync)
                rate = n / median(times)
                rows.append({"size": f"{w}x{h}", "mb_per_image": mb, "variant": name, "images_per_s": rate})
                print(f"  decode {w}x{h} {name:45s}: {rate:8.1f} images/s", flush=True)
            except Exception as e:
                rows.append({"size": f"{w}x{h}", "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        if torch.cuda.is_available() and not smoke:
            # Same pixels? Compare GPU preprocessing with the model's own on a few images.
            ref = pil(False, blobs[:4]).to(m.device)
            got = nvjpeg(blobs[:4])
            rows.append(
                {
                    "size": f"{w}x{h}",
                    "variant": "gpu vs PIL preprocess max abs diff",
                    "value": float((ref - got).abs().max()),
                }
            )
    return rows


def _pair_scores(m: Any, x: Any, ids: Any) -> Any:
    """The naive reference: ``model(image, text)`` per candidate, log-softmax of the logits at the labels."""
    import torch

    out = []
    with m._inference():
        for i in range(x.shape[0]):
            r = m.model(x[i : i + 1], ids)
            logp = r["logits"].float().log_softmax(-1)
            out.append(logp.gather(-1, r["labels"].unsqueeze(-1)).sum())
    return torch.stack(out).double().cpu().numpy()


def section_rerank(m: Any, smoke: bool) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    rows = []
    s = m.image_size
    ids = m._caption_ids(CAPTION).to(m.device)
    m32 = dataclasses.replace(m, precision="fp32")
    for k in (8, 16) if smoke else (50, 200):
        x = torch.randn(k, 3, s, s, device=m.device)
        tokens = m.image_tokens(x, batch_size=256)
        cached = timeit(lambda tokens=tokens: m.caption_loglik(CAPTION, tokens), repeat=5, warmup=2, sync=_sync)
        uncached = timeit(
            lambda x=x: m.caption_loglik(CAPTION, m.image_tokens(x, batch_size=256)), repeat=3, warmup=1, sync=_sync
        )
        pair = timeit(lambda x=x: _pair_scores(m, x, ids), repeat=2 if k <= 50 else 1, warmup=1, sync=_sync)
        row = {
            "k": k,
            "cached_ms": median(cached) * 1e3,
            "uncached_ms": median(uncached) * 1e3,
            "pair_ms": median(pair) * 1e3,
        }
        row["speedup_cached"] = row["pair_ms"] / row["cached_ms"]
        row["speedup_uncached"] = row["pair_ms"] / row["uncached_ms"]
        n = min(k, 16)
        a = m32.caption_loglik(CAPTION, m32.image_tokens(x[:n]))
        b = _pair_scores(m32, x[:n], ids)
        row["max_abs_diff_fp32"] = float(np.abs(a - b).max())
        row["max_abs_diff_bf16"] = float(
            np.abs(m.caption_loglik(CAPTION, tokens[:n]) - _pair_scores(m, x[:n], ids)).max()
        )
        rows.append(row)
        print(f"  rerank k={k}: {row}", flush=True)
    return rows


def section_search(smoke: bool) -> list[dict[str, Any]]:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, d, k = (20_000, 768, 10) if smoke else (1_000_000, 768, 10)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.float16):
        db = torch.nn.functional.normalize(torch.randn(n, d, device=dev, generator=g), dim=-1).to(dtype)
        q = torch.nn.functional.normalize(torch.randn(256, d, device=dev, generator=g), dim=-1).to(dtype)

        def search(qq: Any, db: Any = db) -> Any:
            vals, idx = torch.topk(qq @ db.T, k, dim=-1)
            return vals.float().cpu(), idx.cpu()  # results to the host, as a caller would use them

        single = timeit(lambda q=q: search(q[:1]), repeat=50, warmup=5, sync=_sync)
        batch = timeit(lambda q=q: search(q), repeat=10, warmup=2, sync=_sync)
        rows.append(
            {
                "n": n,
                "dim": d,
                "dtype": str(dtype).replace("torch.", ""),
                "p50_ms": median(single) * 1e3,
                "p95_ms": percentile(single, 95) * 1e3,
                "batch": 256,
                "qps": 256 / median(batch),
            }
        )
        del db
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, small sizes: checks the script in seconds")
    ap.add_argument("--model", default="coca_ViT-L-14")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="folder of the JSON record (default benchmarks/results)")
    args = ap.parse_args()

    import torch

    from cocatk import load_model

    record: dict[str, Any] = {"machine": machine_info(), "model": args.model, "smoke": args.smoke, "results": {}}
    res = record["results"]
    errors: dict[str, str] = {}
    name = str(ROOT / "tests/data/coca_tiny.json") if args.smoke else args.model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    m = load_model(name, pretrained="none", device=dev, precision="bf16" if dev == "cuda" else "fp32")
    res["load_s"] = time.perf_counter() - t0
    print(f"model {name} on {dev} loaded in {res['load_s']:.1f} s", flush=True)

    def run(section: str, fn: Any) -> None:
        try:
            t = time.perf_counter()
            value = fn()
            if value is not None:
                res[section] = value
            res[f"{section}_section_s"] = time.perf_counter() - t
        except Exception as e:  # keep the other sections' figures
            errors[section] = traceback.format_exc()[-2000:]
            print(f"section {section} failed: {e}", flush=True)

    run("matmul", lambda: section_matmul(args.smoke))
    print(f"  matmul: {res.get('matmul')}", flush=True)
    run("rerank", lambda: section_rerank(m, args.smoke))
    run("search", lambda: section_search(args.smoke))
    run("decode", lambda: section_decode(m, args.smoke))
    run("encode", lambda: section_encode(m, args.smoke, not args.no_compile and dev == "cuda", res))
    record["errors"] = errors

    if "encode" in res:
        print_table(
            f"image encoding, {name} ({dev}), model-only rate on preprocessed tensors",
            ["variant", "batch", "images/s", "FLOP frac", "peak GiB"],
            [
                [
                    r["variant"],
                    r["batch"],
                    r["images_per_s"],
                    r.get("flop_fraction", float("nan")),
                    r.get("peak_mem_gib", float("nan")),
                ]
                for r in res["encode"]
            ],
        )
    if "decode" in res:
        print_table(
            "JPEG -> preprocessed tensor",
            ["size", "variant", "images/s"],
            [[r["size"], r["variant"], r.get("images_per_s", r.get("value", r.get("error")))] for r in res["decode"]],
        )
    if "rerank" in res:
        print_table(
            "rerank: caption_loglik vs model(image, text) per pair (ms per query)",
            ["k", "cached", "uncached", "pair-by-pair", "x cached", "x uncached", "diff fp32"],
            [
                [
                    r["k"],
                    r["cached_ms"],
                    r["uncached_ms"],
                    r["pair_ms"],
                    r["speedup_cached"],
                    r["speedup_uncached"],
                    r["max_abs_diff_fp32"],
                ]
                for r in res["rerank"]
            ],
        )
    if "search" in res:
        print_table(
            "exact search (torch matmul + topk on the GPU)",
            ["n", "dtype", "p50 ms", "p95 ms", "QPS (256 batch)"],
            [[r["n"], r["dtype"], r["p50_ms"], r["p95_ms"], r["qps"]] for r in res["search"]],
        )
    for section, tb in errors.items():
        print(f"\n[{section}] failed:\n{tb}")
    write_record("gpu" if not args.smoke else "gpu-smoke", record, args.out)


if __name__ == "__main__":
    main()
