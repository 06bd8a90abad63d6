"""`cocatk tag` (issue 31): time to tag 10k indexed images from their stored embeddings, and the demo model's tag
precision and recall against the scenes' true objects.

1. Speed: an index of 10,000 coca_ViT-B-32 (random weights) embeddings, imported with ``cocatk index
   --from-embeddings`` (tagging reads stored embeddings only, so how they were made does not matter), tagged with the
   built-in vocabulary (Open Images, 601 labels) by whole ``cocatk tag --json`` processes: once cold (the label
   embeddings computed: 601 labels x 4 prompts through the text tower) and three times warm (the label embeddings
   from the zero-shot cache), medians. The baseline in the same run is the warm scoring alone (the matrix product
   and the SQLite write), which the process start and model load sit on top of.
2. Quality: the demo model on held-out scenes, vocabulary = its 18 objects grouped by shape. The threshold is chosen
   on 300 calibration scenes (best F1 on a grid) and measured on 300 other scenes, against the objects each scene
   was drawn with; chance precision (tag everything) is reported beside it.

Usage: python benchmarks/bench_tag.py [--images 10000] [--out benchmarks/results/tag-<cpu>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import machine_info, machine_slug  # noqa: E402


def _cocatk(*args: str, env: dict[str, str]) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cocatk", *args], capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"cocatk {' '.join(args)} failed: {r.stderr[-2000:]}")
    return wall, json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}


def speed(n: int, tmp: Path, env: dict[str, str]) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(31)
    emb = rng.standard_normal((n, 512)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out = tmp / "emb"
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    np.save(out / "img_emb" / "img_emb_0.npy", emb)
    pq.write_table(pa.table({"image_path": [f"{tmp}/photos/img_{i:06d}.jpg" for i in range(n)]}),
                   out / "metadata" / "metadata_0.parquet")  # fmt: skip
    idx = tmp / "idx"
    _cocatk("index", "--from-embeddings", str(out), "--index", str(idx), "--model", "coca_ViT-B-32",
            "--pretrained", "none", "--device", "cpu", "--json", env=env)  # fmt: skip
    cmd = ("tag", "--index", str(idx), "--json")
    cold_wall, cold = _cocatk(*cmd, env=env)
    warm = [_cocatk(*cmd, env=env) for _ in range(3)]
    return {
        "images": n,
        "labels": cold["settings"]["vocabulary"]["labels"],
        "tags": cold["tags"],
        "tagged_images": cold["tagged"],
        "cold_process_s": round(cold_wall, 3),
        "cold_library_s": cold["seconds"],
        "warm_process_s": round(statistics.median(w for w, _ in warm), 3),
        "warm_library_s": {k: statistics.median(d["seconds"][k] for _, d in warm) for k in warm[0][1]["seconds"]},
        "warm_from_cache": all(d["classifier_from_cache"] for _, d in warm),
    }


def quality(n: int) -> dict:
    from cocatk.demo.scenes import CLASS_NAMES, iter_scenes, render_scene
    from cocatk.models import load_model
    from cocatk.zeroshot.tagging import Tagger, TagRule, parse_vocabulary

    model = load_model("demo", device="cpu")
    vocab = parse_vocabulary("\n".join(f"{c.split()[1]}|{c}" for c in CLASS_NAMES), "demo objects")
    tagger = Tagger.build(model, vocab, ["a {}"], cache=False)

    def scored(namespace: str) -> tuple[np.ndarray, np.ndarray]:
        specs = list(iter_scenes(11, n, namespace=namespace))
        p = tagger.probabilities(model.encode_images([render_scene(s, 192) for s in specs]))
        truth = np.zeros_like(p, dtype=bool)
        for i, s in enumerate(specs):
            for o in s.objects:
                truth[i, vocab.names.index(o.name)] = True
        return p, truth

    def pr(p: np.ndarray, truth: np.ndarray, th: float) -> tuple[float, float]:
        pred = p >= th
        tp = float((pred & truth).sum())
        return tp / max(float(pred.sum()), 1.0), tp / float(truth.sum())

    calib, held = scored("tag-calibration"), scored("tag-evaluation")
    grid = [0.5, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999]
    rows = []
    for th in grid:
        p, r = pr(*calib, th)
        rows.append({"threshold": th, "precision": round(p, 3), "recall": round(r, 3),
                     "f1": round(2 * p * r / (p + r), 3) if p + r else 0.0})  # fmt: skip
    best = max(rows, key=lambda r: r["f1"])
    p, r = pr(*held, best["threshold"])
    p05, r05 = pr(*held, 0.5)
    return {
        "scenes": {"calibration": n, "evaluation": n},
        "rule": TagRule(threshold=best["threshold"], max_tags=18).describe(),
        "scale": round(tagger.scale, 3),
        "calibration": rows,
        "chosen_threshold": best["threshold"],
        "evaluation": {"precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / (p + r), 3)},
        "evaluation_at_default_0.5": {"precision": round(p05, 3), "recall": round(r05, 3)},
        "chance_precision": round(float(held[1].mean()), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--scenes", type=int, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    info = machine_info()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "COCATK_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
        result = {"machine": info, "speed": speed(args.images, tmp, env), "quality": quality(args.scenes)}
    result["machine_after"] = machine_info()
    out = args.out or ROOT / "benchmarks" / "results" / f"tag-{machine_slug(info)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
