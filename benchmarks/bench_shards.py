"""Shards against files: `cocatk index` of N photos as WebDataset shards and as files in a folder, whole processes.

    python benchmarks/bench_shards.py                                   # 1,000 photos, 100 shards, coca_ViT-B-32
    python benchmarks/bench_shards.py --n 20000 --size 256x192 --model demo --no-ray --tag demo-20k

The same JPEG bytes (``_photos.py``: photo-like, camera EXIF, generated once under /tmp/cocatk-bench/shards) are written
twice: as ``files/photo_NNNNNN.jpg`` and as ``--shards`` WebDataset tar shards by webdataset's own ``TarWriter``, in
img2dataset's layout (``key.jpg``, ``key.txt`` a caption, ``key.json`` url/width/height), N / shards samples each. Each
run is a cold ``python -m cocatk index TARGET --index NEW --json`` (this checkout first on PYTHONPATH) into a fresh
index: ``FOLDER`` for files, ``'SHARDS/{00000..00099}.tar'`` for shards, with ``--ray local`` too unless ``--no-ray``
(only with it: ``--no-local``). Per repetition the order is files, shards (then files, shards with Ray), so the sides
alternate; the figures are medians. ``--shards-first`` runs shards before files in each pair: a single repetition of
each order tells a drifting machine from a cost of the shards. The model is ``--model`` with seeded random weights read
from a local safetensors file (``_common.ensure_random_weights``, built once; the speed is the real model's), or the
shipped ``demo`` model. Defaults otherwise (decoder tokens cached where they fit the default 8 GiB limit, not at 100k
with coca_ViT-B-32; ``--precision auto``: bf16 on a CPU with AMX); the
ONNX text tower export at the end of an index is off (``COCATK_TEXT_ONNX=0``) for both sides: it is a one-time cost per
model, not per collection. Both data sets are read once before the first run (page cache warm for both), and one untimed
run over 16 files loads the model file into the page cache.

Reported: images/s of the whole process (N / wall seconds, imports and model load included), the loop's rate from
the report, the scan seconds, and shards / files for each. The load average before each run is recorded: on a shared
machine it is the noise to read the ratios against.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import ROOT, ensure_random_weights, lscpu_model, machine_info, median, print_table, write_record
from _photos import CACHE_DIR, photo_jpeg


def ensure_data(folder: Path, n: int, shards: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """``folder/files`` (n JPEGs) and ``folder/shards`` (the same bytes in ``shards`` tars), built once."""
    import webdataset as wds

    files, tars = folder / "files", folder / "shards"
    recipe = {"n": n, "shards": shards, "size": list(size), "version": 1}
    marker = folder / "recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        return files, tars
    shutil.rmtree(folder, ignore_errors=True)
    files.mkdir(parents=True)
    tars.mkdir()
    paths = [files / f"photo_{i:06d}.jpg" for i in range(n)]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # PIL releases the GIL while encoding
        list(pool.map(lambda i: paths[i].write_bytes(photo_jpeg(i, *size)), range(n)))
    per = -(-n // shards)
    for s in range(shards):
        with wds.TarWriter(str(tars / f"{s:05d}.tar")) as w:
            for i in range(s * per, min(n, (s + 1) * per)):
                key = f"{i:06d}"
                meta = {"url": f"https://example.org/{key}.jpg", "width": size[0], "height": size[1], "key": key}
                w.write({"__key__": key, "jpg": paths[i].read_bytes(), "txt": f"a photo number {i}",
                         "json": json.dumps(meta).encode()})  # fmt: skip
    marker.write_text(json.dumps(recipe))
    return files, tars


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


def index_run(target: str, idx: Path, model: list[str], env: dict[str, str], ray: bool) -> dict[str, Any]:
    """One cold `cocatk index` process into a fresh ``idx``: wall seconds, the load before, the report's figures."""
    shutil.rmtree(idx, ignore_errors=True)
    cmd = [sys.executable, "-m", "cocatk", "index", target, "--index", str(idx), *model, "--json"]
    if ray:
        cmd += ["--ray", "local"]
    load = os.getloadavg()
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stdout + r.stderr)[-3000:]}")
    rep = json.loads(r.stdout)
    shutil.rmtree(idx, ignore_errors=True)
    return {
        "wall_s": round(wall, 3),
        "load_before": [round(x, 2) for x in load],
        "encoded": rep["encoded"],
        "failed": rep.get("failed_total"),
        "loop_images_per_s": rep.get("images_per_s"),
        "report_seconds": rep.get("seconds"),
        "timings": rep.get("timings"),
        "precisions": rep.get("precisions"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="photos")
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--size", default="640x480", help="photo size WxH")
    ap.add_argument("--model", default="coca_ViT-B-32", help="an open_clip CoCa architecture (random weights) or demo")
    ap.add_argument("--reps", type=int, default=2, help="repetitions of files, shards (medians)")
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="also --ray local, both sides")
    ap.add_argument("--local", action=argparse.BooleanOptionalAction, default=True,
                    help="the runs without Ray (--no-local with --ray: only the --ray local pair)")  # fmt: skip
    ap.add_argument("--shards-first", action="store_true", help="each pair runs shards, then files")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR / "shards", help="where the data sets are kept")
    ap.add_argument("--tag", default=None, help="suffix of the record's name")
    args = ap.parse_args()
    if not (args.local or args.ray):
        ap.error("--no-local --no-ray leaves nothing to run")
    w, h = (int(x) for x in args.size.split("x"))

    record: dict[str, Any] = {"machine": machine_info(), "lscpu_model": lscpu_model()}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    record["commit"] = commit.stdout.strip() or "unknown (not a git checkout)"
    print(f"CPU: {record['lscpu_model'] or record['machine']['cpu']}, {record['machine']['cores']} cores, "
          f"load {record['machine']['loadavg']}", flush=True)  # fmt: skip
    t = time.perf_counter()
    data = args.cache / f"{w}x{h}-{args.n}-{args.shards}"
    files, tars = ensure_data(data, args.n, args.shards, (w, h))
    file_paths = sorted(files.iterdir())
    tar_paths = sorted(tars.iterdir())
    mb_files = sum(p.stat().st_size for p in file_paths) / 1e6
    mb_tars = sum(p.stat().st_size for p in tar_paths) / 1e6
    print(f"{args.n} photos {w}x{h}: {mb_files:.0f} MB of files, {args.shards} shards of {mb_tars:.0f} MB "
          f"({time.perf_counter() - t:.0f} s to generate or check)", flush=True)  # fmt: skip
    if args.model == "demo":
        model = ["--model", "demo", "--device", "cpu"]
        weights = None
    else:
        weights = ensure_random_weights(CACHE_DIR / "default-search" / f"weights-{args.model}" /
                                        "open_clip_model.safetensors", args.model)  # fmt: skip
        model = ["--model", args.model, "--pretrained", str(weights), "--device", "cpu"]
    work = Path(f"/tmp/cocatk-bench-shards-{os.getpid()}")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, COCATK_HOME=str(work / "home"), COCATK_CACHE=str(work / "cache"), COCATK_TEXT_ONNX="0",
               RAY_TMPDIR=str(work / "ray"), PYTHONPATH=path)  # fmt: skip
    env.pop("COCATK_INDEX", None)
    spec = str(tars.resolve() / f"{{{0:05d}..{args.shards - 1:05d}}}.tar")  # quoted: cocatk expands the range
    try:
        warm(file_paths + tar_paths + ([weights] if weights else []))
        small = work / "warm-files"
        small.mkdir(parents=True)
        for p in file_paths[:16]:
            shutil.copy(p, small / p.name)
        index_run(str(small), work / "warm-idx", model, env, ray=False)  # untimed: imports compiled, weights read

        sides = [("files", str(files), False), ("shards", spec, False)] if args.local else []
        if args.ray:
            sides += [("files --ray local", str(files), True), ("shards --ray local", spec, True)]
        if args.shards_first:
            sides = [s for pair in zip(sides[1::2], sides[0::2], strict=True) for s in pair]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in sides}
        for rep in range(args.reps):
            for name, target, ray in sides:
                r = index_run(target, work / "idx", model, env, ray)
                r["images_per_s"] = round(args.n / r["wall_s"], 3)
                runs[name].append(r)
                print(f"  rep {rep + 1} {name}: {r['wall_s']:.1f} s, {r['images_per_s']:.2f} images/s "
                      f"(loop {r['loop_images_per_s']}, scan {(r['timings'] or {}).get('scan')} s, encoded "
                      f"{r['encoded']}, load before {r['load_before'][0]})", flush=True)  # fmt: skip
                if r["encoded"] != args.n:
                    raise SystemExit(f"{name} encoded {r['encoded']} of {args.n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = {}
    for name in runs:
        summary[name] = {
            "wall_s_median": median([r["wall_s"] for r in runs[name]]),
            "images_per_s_median": median([r["images_per_s"] for r in runs[name]]),
            "loop_images_per_s_median": median([r["loop_images_per_s"] or 0 for r in runs[name]]),
            "scan_s_median": median([(r["timings"] or {}).get("scan", 0) for r in runs[name]]),
        }
    rows = []
    for name in runs:
        base = "files --ray local" if "ray" in name else "files"
        s, b = summary[name], summary[base]
        ratio = s["images_per_s_median"] / b["images_per_s_median"]
        s["vs_files"] = round(ratio, 4)
        loads = ", ".join(str(r["load_before"][0]) for r in runs[name])
        rows.append([name, s["wall_s_median"], s["images_per_s_median"], s["loop_images_per_s_median"],
                     s["scan_s_median"], f"{ratio:.3f}", loads])  # fmt: skip
    print_table(
        f"`cocatk index`, {args.n} photos {w}x{h} as files and as {args.shards} shards, {args.model}"
        f"{' (random weights)' if weights else ''}, whole cold processes, medians of {args.reps}",
        ["run", "wall s", "images/s", "loop images/s", "scan s", "vs files", "load before each"],
        rows,
    )
    record.update({
        "n": args.n, "shards": args.shards, "size": f"{w}x{h}", "model": args.model,
        "weights": "random (seeded safetensors)" if weights else "shipped demo", "reps": args.reps,
        "order": [name for name, _, _ in sides], "mb_files": round(mb_files, 1), "mb_shards": round(mb_tars, 1),
        "runs": runs, "summary": summary,
        "target": "100k items in 100 shards index within 10 % of the same images as files",
    })  # fmt: skip
    write_record("shards" + (f"-{args.tag}" if args.tag else ""), record)


if __name__ == "__main__":
    main()
