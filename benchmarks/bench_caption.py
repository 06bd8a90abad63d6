"""Caption decoding speed: ``cocatk.captioning.generate_captions`` vs open_clip's own ``CoCa.generate``.

    python benchmarks/bench_caption.py --ref-python /tmp/venv-ref/bin/python            # B-32 + demo, CPU
    python benchmarks/bench_caption.py --ref-python /tmp/venv-ref/bin/python --quick    # fewer images, 1 round

open_clip's ``generate`` needs transformers < 4.56, which cannot live beside cocatk's datasets: it runs in a second
interpreter (``--ref-python`` or ``$COCATK_REF_PYTHON``, see tests/ref_generate.py) on the same preprocessed images,
with the same weights (seeded random init for ``coca_ViT-B-32 --pretrained none``: the speed is the model's; the
shipped ``demo`` weights) and the same thread count. Rounds alternate: cocatk from images, cocatk from cached image
tokens, open_clip; each open_clip round times only its ``generate`` calls (not the interpreter start or the model
build). Both decode the same settings (open_clip's semantics: ``score_space="logits"``) and the generated ids are
compared, so the speed-up is for the same captions.

Random weights rarely emit the end token: B-32 captions run to ``max_len`` (29 ids), the longest case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, add_threads_option, machine_info, median, print_table, write_record

REF_SCRIPT = ROOT / "tests" / "ref_generate.py"


def _ref_runs(name: str, cfg: Any, max_len: int, batch_size: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"seq_len": max_len + 1, "min_seq_len": cfg.min_len + 1}
    if cfg.strategy == "greedy":
        kw.update(generation_type="top_k", top_k=1)
    else:
        kw.update(num_beams=cfg.num_beams, num_beam_groups=1)
    return {"name": name, "kwargs": kw, "length_penalty": cfg.length_penalty, "batch_size": batch_size}


def run_reference(python: str, config: str, weights: str | None, images_path: str, runs: list, threads: int) -> dict:
    warm = {"name": "warmup", "kwargs": {"generation_type": "top_k", "top_k": 1, "seq_len": 6}, "batch_size": 1}
    req = {"config": config, "weights": weights, "images": images_path, "runs": [warm, *runs], "threads": threads}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([python, str(REF_SCRIPT)], input=json.dumps(req), capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"reference interpreter failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images, one round")
    ap.add_argument("--ref-python", default=os.environ.get("COCATK_REF_PYTHON"), help="python with transformers<4.56")
    ap.add_argument("--batch-size", type=int, default=16, help="images decoded together (each with its beams)")
    ap.add_argument("--models", default="coca_ViT-B-32,demo")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, 1 with --quick)")
    add_threads_option(ap)
    args = ap.parse_args()
    if not args.ref_python:
        raise SystemExit("pass --ref-python (a python with torch, open_clip_torch==3.3.0 and 'transformers<4.56')")

    import torch
    from safetensors.torch import save_file

    from cocatk import load_model
    from cocatk.captioning import GenerationConfig, generate_captions
    from cocatk.models import ASSETS_DIR

    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    record: dict[str, Any] = {"machine": machine_info(), "device": "cpu", "threads": args.threads, "results": []}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    for name in args.models.split(","):
        if name == "demo":
            from cocatk.demo.scenes import iter_scenes, render_scene

            model = load_model("demo", device="cpu")
            n = 32 if args.quick else 64
            x = model.preprocess_images([render_scene(s, 192) for s in iter_scenes(7, n, namespace="bench-caption")])
            config, weights = str(ASSETS_DIR / "coca_demo_tiny.json"), str(ASSETS_DIR / "demo.safetensors")
        else:
            model = load_model(name, pretrained="none", device="cpu")
            n = 4 if args.quick else 16
            x = torch.randn(n, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
            config, weights = name, None
        max_len = min(29, model.context_length - 1)
        bs = min(args.batch_size, n)
        images_path = str(tmp / f"{name}.safetensors")
        save_file({"images": x.contiguous()}, images_path)
        configs = {
            "greedy": GenerationConfig(strategy="greedy", max_len=max_len, score_space="logits"),
            "beam3": GenerationConfig(num_beams=3, max_len=max_len, score_space="logits"),
        }
        runs = [_ref_runs(k, c, max_len, bs) for k, c in configs.items()]
        generate_captions(model, x[:1], configs["greedy"])  # warm-up
        times: dict[str, dict[str, list[float]]] = {k: {"images": [], "tokens": [], "open_clip": []} for k in configs}
        mine: dict[str, list[list[int]]] = {}
        ref: dict[str, Any] = {}
        for _ in range(rounds):
            for key, cfg in configs.items():
                t = time.perf_counter()
                caps = generate_captions(model, x, cfg, batch_size=bs)
                times[key]["images"].append(time.perf_counter() - t)
                tokens = model.image_tokens(x)
                t = time.perf_counter()
                generate_captions(model, tokens, cfg, batch_size=bs)
                times[key]["tokens"].append(time.perf_counter() - t)
                mine[key] = [list(c.token_ids) for c in caps]
            ref = run_reference(args.ref_python, config, weights, images_path, runs, args.threads)
            for key in configs:
                times[key]["open_clip"].append(ref["seconds"][key])
        for key in configs:
            same = sum(a == b for a, b in zip(mine[key], ref["runs"][key], strict=True))
            rate = {k: n / median(v) for k, v in times[key].items()}
            res = {
                "model": name,
                "strategy": key,
                "images": n,
                "batch_size": bs,
                "max_len": max_len,
                "mean_tokens": sum(len(t) for t in mine[key]) / n,
                "captions_per_s": rate,
                "speedup_images": rate["images"] / rate["open_clip"],
                "speedup_tokens": rate["tokens"] / rate["open_clip"],
                "identical_captions": same,
                "seconds": times[key],
            }
            record["results"].append(res)
            rows.append(
                [
                    name,
                    key,
                    n,
                    rate["open_clip"],
                    rate["images"],
                    rate["tokens"],
                    res["speedup_images"],
                    res["speedup_tokens"],
                    f"{same}/{n}",
                ]
            )
        record["transformers_ref"] = ref.get("transformers")
    print_table(
        f"captions/s on the CPU, {args.threads} thread(s), median of {rounds} round(s)",
        ["model", "decode", "n", "open_clip", "cocatk img", "cocatk tok", "x img", "x tok", "same ids"],
        rows,
    )
    write_record("caption", record)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
