"""`cocatk duplicates`: the default threshold (pair precision / recall per threshold) and the speed at 100k images.

    python benchmarks/bench_duplicates.py                  # both parts (about 2 minutes on 2 cores)
    python benchmarks/bench_duplicates.py --part quality   # precision / recall per threshold, per model
    python benchmarks/bench_duplicates.py --part speed --n 100000

Quality. ``--originals`` demo scenes (``cocatk.demo.scenes``, distinct meanings) are rendered at 256 px; each gets
five near-duplicate copies: resized to 60 %, recompressed as JPEG quality 35, cropped by 10 % (5 % off each side),
EXIF-rotated (pixels stored turned, Orientation tag 6: decoded upright), colour-adjusted (brightness +15 %, saturation
-25 %). ``--distinct`` further scenes join as singletons. Every image goes through the indexer's decoding
(``load_image``: EXIF orientation applied) and the model; a predicted pair is two images whose cosine is at or above
the threshold; a true pair is two images of the same original. Precision = true predicted pairs / predicted pairs,
recall = true predicted pairs / true pairs. Models: the ``demo`` preset (trained on these scenes), and random weights
(``--pretrained none``) of the demo architecture and of the test config ``tests/data/coca_tiny.json``.

Speed. ``--n`` random 512-d unit vectors (plus 1 % planted near-copies so the groups are not empty): the range search
and grouping that ``find_duplicates`` runs (:func:`cocatk.retrieval.duplicates.group_rows`), timed at two thresholds.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, machine_info, print_table, write_record

THRESHOLDS = (0.80, 0.85, 0.90, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999)
VARIANTS = ("resized", "recompressed", "cropped", "exif_rotated", "colour")


def _variants(img: Any) -> dict[str, bytes]:
    from PIL import Image, ImageEnhance

    def jpeg(im: Any, quality: int = 90, exif: bytes | None = None) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality, **({"exif": exif} if exif else {}))
        return buf.getvalue()

    w, h = img.size
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned 90 degrees clockwise; the decoder turns it back
    colour = ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.15)).enhance(0.75)
    return {
        "original": jpeg(img),
        "resized": jpeg(img.resize((int(w * 0.6), int(h * 0.6)), Image.Resampling.LANCZOS)),
        "recompressed": jpeg(img, quality=35),
        "cropped": jpeg(img.crop((w // 20, h // 20, w - w // 20, h - h // 20))),
        "exif_rotated": jpeg(img.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()),
        "colour": jpeg(colour),
    }


def make_set(originals: int, distinct: int, seed: int = 11) -> tuple[list[bytes], np.ndarray]:
    """Encoded image files and their group label (-1: a distinct singleton)."""
    from cocatk.demo.scenes import iter_scenes, render_scene

    files: list[bytes] = []
    labels: list[int] = []
    for k, spec in enumerate(iter_scenes(seed, originals + distinct, unique=True)):
        img = render_scene(spec, 256).convert("RGB")
        if k < originals:
            for data in _variants(img).values():
                files.append(data)
                labels.append(k)
        else:
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            files.append(buf.getvalue())
            labels.append(-1)
    return files, np.array(labels)


def pair_scores(model: Any, files: list[bytes], labels: np.ndarray) -> list[dict[str, Any]]:
    from cocatk.images import load_image

    images = [load_image(io.BytesIO(f)) for f in files]
    emb = model.encode_images(images)
    sims = emb @ emb.T
    iu = np.triu_indices(len(files), 1)
    s = sims[iu]
    true = (labels[iu[0]] == labels[iu[1]]) & (labels[iu[0]] >= 0)
    rows = []
    for t in THRESHOLDS:
        pred = s >= t
        tp = int((pred & true).sum())
        rows.append(
            {
                "threshold": t,
                "predicted": int(pred.sum()),
                "true_pairs": int(true.sum()),
                "precision": tp / pred.sum() if pred.sum() else 1.0,
                "recall": tp / true.sum(),
            }
        )
    # Where the two populations sit: the lowest true-pair cosine and the highest distinct-pair cosine.
    rows.append({"min_true_pair": float(s[true].min()), "max_distinct_pair": float(s[~true].max())})
    return rows


def quality(args: argparse.Namespace) -> dict[str, Any]:
    from cocatk.models import load_model

    files, labels = make_set(args.originals, args.distinct)
    models = [("demo", None), ("demo", "none"), (str(ROOT / "tests" / "data" / "coca_tiny.json"), "none")]
    out: dict[str, Any] = {"images": len(files), "originals": args.originals, "distinct": args.distinct}
    for name, weights in models:
        model = load_model(name, weights, device="cpu")
        label = f"{Path(name).name} ({'random weights' if weights == 'none' else 'trained'})"
        rows = pair_scores(model, files, labels)
        extremes = rows.pop()
        out[label] = {"rows": rows, **extremes}
        print_table(
            f"{label}: {len(files)} images, {rows[0]['true_pairs']} true pairs; lowest true-pair cosine "
            f"{extremes['min_true_pair']:.4f}, highest distinct-pair cosine {extremes['max_distinct_pair']:.4f}",
            ["threshold", "predicted pairs", "precision", "recall"],
            [[r["threshold"], r["predicted"], f"{r['precision']:.3f}", f"{r['recall']:.3f}"] for r in rows],
        )
    return out


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from cocatk.retrieval.duplicates import group_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, 512)).astype(np.float32)
    planted = args.n // 100  # near-copies of the first rows, cosine ~0.99
    x[-planted:] = x[:planted] + 0.08 * rng.standard_normal((planted, 512)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    hashes = [str(i) for i in range(args.n)]
    out: dict[str, Any] = {"n": args.n, "dim": 512, "planted": planted, "rows": []}
    rows = []
    for t in (0.95, 0.9):
        t0 = time.perf_counter()
        groups, pairs = group_rows(hashes, x, t)
        sec = time.perf_counter() - t0
        out["rows"].append({"threshold": t, "seconds": sec, "groups": len(groups), "pairs": pairs})
        rows.append([t, f"{sec:.1f}", len(groups), pairs])
    print_table(
        f"range search + grouping, {args.n} random 512-d vectors ({planted} planted near-copies)",
        ["threshold", "seconds", "groups", "pairs"],
        rows,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("quality", "speed", "both"), default="both")
    ap.add_argument("--originals", type=int, default=60)
    ap.add_argument("--distinct", type=int, default=300)
    ap.add_argument("--n", type=int, default=100_000)
    args = ap.parse_args()
    record: dict[str, Any] = {"settings": vars(args)}
    if args.part in ("quality", "both"):
        record["quality"] = quality(args)
    if args.part in ("speed", "both"):
        record["speed"] = speed(args)
    record["machine"] = machine_info()
    path = write_record("duplicates", record)
    print(f"wrote {os.path.relpath(path, ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
