"""The default search as a person types it: cold ``cocatk search TEXT`` (rerank of 50 by caption likelihood) against
``--no-rerank`` and rclip's cold query, whole processes on the index a plain ``cocatk index PHOTOS --model M`` builds.

    python benchmarks/bench_default_search.py                 # coca-b32, 60 photos of 1600x1200, 3 repetitions
    python benchmarks/bench_default_search.py --l14           # coca-l14 too (2.6 GB of random weights, built once)
    python benchmarks/bench_default_search.py --quick         # 20 photos, 1 repetition

For each model (seeded random weights saved once as a local safetensors file, loaded as a user's downloaded
checkpoint is; the speed is the real model's, the rankings are not) two indexes of the same folder are built,
untimed: ``cocatk index PHOTOS --model ARCH --pretrained FILE`` (the default: decoder tokens cached, text tower and
decoder exported to ONNX at the end) and the same with ``--no-cache-tokens``. Then these run as fresh processes,
alternating, ``--reps`` times each, after one untimed warm-up of each (page cache, bytecode):

- ``default``: ``cocatk search QUERY --index IDX --json`` (auto: ONNX Runtime for the text and the rerank);
- ``no-rerank``: the same with ``--no-rerank`` (ONNX text tower only);
- ``torch``: the default search with ``--backend torch`` (torch for the text and the rerank, cached tokens);
- ``uncached``: the default search on the ``--no-cache-tokens`` index (torch re-decodes the 50 candidates);
- ``image`` (with ``--image``): ``cocatk search --image PHOTO`` (auto: the image tower exported to ONNX Runtime),
  cold, and ``image torch`` the same with ``--backend torch``; and beside them the same query five times in one
  process for each backend (the first, and the median of the last four: warm);
- ``rclip -n``: rclip's cold query without re-indexing, on its own index of the same folder (``bench_rclip.py``'s
  environment and stand-in ONNX model), with ``--rclip`` (default on; ``--no-rclip`` leaves it out).

The table gives medians and the ratios the issue asks for: default / no-rerank and default / rclip. The record
``benchmarks/results/default-search-<machine>.json`` holds every run with its load average, the search's own
``timings_ms`` and backend, and the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import ensure_random_weights, machine_info, median, print_table, write_record
from _photos import CACHE_DIR, ensure_photo_set
from bench_rclip import (
    ensure_rclip_model,
    ensure_rclip_python,
    rclip_index_cmd,
    rclip_query_cmd,
    rclip_versions,
    run_process,
)

QUERY = "a red bicycle"
MODELS = {"coca-b32": "coca_ViT-B-32", "coca-l14": "coca_ViT-L-14"}


def ensure_weights(cache: Path, arch: str) -> Path:
    """Seeded random weights of ``arch`` as a local safetensors file (built once)."""
    return ensure_random_weights(cache / f"weights-{arch}" / "open_clip_model.safetensors", arch)


#: argv: index, photo, backend. Opens the index once, runs the image query 5 times: the first (model load included)
#: and the median of the last 4 (warm), in seconds.
_WARM_IMAGE = """
import json, statistics, sys, time
from cocatk.retrieval import Index
from cocatk.retrieval.search import search_index
ix = Index.open(sys.argv[1])
times = []
for _ in range(5):
    t = time.perf_counter()
    r = search_index(ix, image=sys.argv[2], n=10, backend=sys.argv[3])
    times.append(time.perf_counter() - t)
print(json.dumps({"first": round(times[0], 3), "warm_median": round(statistics.median(times[1:]), 3),
                  "backend": r.model.get("backend", "torch")}))
"""


def cocatk_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cocatk", *args]


def query(variant: str, cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict:
    r = run_process(cmd, cwd=cwd, env=env)
    out = r.pop("stdout")
    q: dict[str, Any] = {"variant": variant, **r}
    if variant.startswith("rclip"):
        q["hits"] = max(0, len(out.strip().splitlines()) - 1)
    else:
        res = json.loads(out)
        q.update(hits=len(res["hits"]), timings_ms=res["timings_ms"], reranked=res["reranked"])
        q.update(backend=res["model"].get("backend", "torch"), tokens_from=res["tokens_from"])
    return q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 photos, 1 repetition")
    ap.add_argument("--n", type=int, default=None, help="photos (default 60)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    ap.add_argument("--l14", action="store_true", help="also coca-l14 (slow to index on a CPU)")
    ap.add_argument("--only-l14", action="store_true", help="coca-l14 alone")
    ap.add_argument("--image", action="store_true", help="also image queries (--image), cold and warm")
    ap.add_argument("--rclip", action=argparse.BooleanOptionalAction, default=True, help="rclip's cold query beside")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR / "default-search")
    ap.add_argument("--tag", default=None, help="suffix of the record's name")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    n = args.n or (20 if args.quick else 60)
    reps = args.reps or (1 if args.quick else 3)
    models = ["coca-l14"] if args.only_l14 else ["coca-b32"] + (["coca-l14"] if args.l14 else [])

    record: dict[str, Any] = {"machine": machine_info(), "n": n, "reps": reps, "query": QUERY, "models": models}
    folder = (args.cache / f"1600x1200-{n}").resolve()
    paths = ensure_photo_set(folder, n, 1600, 1200, workers=os.cpu_count() or 2)
    for p in paths:
        p.read_bytes()
    work = Path(tempfile.mkdtemp(prefix="cocatk-bench-default-search-"))
    env = {**os.environ, "COCATK_CACHE": str(args.cache / "cocatk-cache")}
    try:
        plan: list[tuple[str, list[str], Path | None, dict[str, str] | None]] = []
        for name in models:
            arch = MODELS[name]
            weights = ensure_weights(args.cache, arch)
            for variant, extra in (("cached", []), ("uncached", ["--no-cache-tokens"])):
                idx = work / f"{name}-{variant}"
                r = run_process(cocatk_cmd("index", str(folder), "--model", arch, "--pretrained", str(weights),
                                           "--index", str(idx), "--json", *extra), env=env)  # fmt: skip
                rep = json.loads(r["stdout"])
                print(f"{name} {variant}: indexed {rep['encoded']} in {r['wall_s']:.1f} s "
                      f"({rep['images_per_s']:.2f} images/s in the loop), "
                      f"tokens {rep['token_cache_bytes'] / 1e6:.0f} MB, "
                      f"export {rep.get('text_export')}", flush=True)  # fmt: skip
                record.setdefault("indexing", []).append({"model": name, "variant": variant, "wall_s": r["wall_s"],
                                                          "report": rep})  # fmt: skip
            cached, uncached = str(work / f"{name}-cached"), str(work / f"{name}-uncached")
            plan += [
                (f"{name} default", cocatk_cmd("search", QUERY, "--index", cached, "--json"), None, env),
                (f"{name} no-rerank", cocatk_cmd("search", QUERY, "--index", cached, "--json", "--no-rerank"), None,
                 env),
                (f"{name} torch", cocatk_cmd("search", QUERY, "--index", cached, "--json", "--backend", "torch"), None,
                 env),
                (f"{name} uncached", cocatk_cmd("search", QUERY, "--index", uncached, "--json"), None, env),
            ]  # fmt: skip
            if args.image:  # the image tower (ONNX Runtime under auto, and torch), cold, and warm in one process
                photo = str(paths[0])
                image_cmd = cocatk_cmd("search", "--image", photo, "--index", cached, "--json")
                plan.append((f"{name} image", image_cmd, None, env))
                plan.append((f"{name} image torch", [*image_cmd, "--backend", "torch"], None, env))
                for backend in ("auto", "torch"):
                    r = run_process([sys.executable, "-c", _WARM_IMAGE, cached, photo, backend], env=env)
                    record.setdefault("image_warm_s", {}).setdefault(name, {})[backend] = json.loads(r["stdout"])
                print(f"{name} image query, warm in one process: {record['image_warm_s'][name]}", flush=True)
        if args.rclip:
            python = ensure_rclip_python(CACHE_DIR, None, "rclip")
            model_dir = CACHE_DIR / "rclip-model"
            ensure_rclip_model(model_dir)
            datadir = work / "rclip-data"
            datadir.mkdir()
            (datadir / "ViT-B-32-256-datacomp_s34b_b86k").symlink_to(model_dir / "ViT-B-32-256-datacomp_s34b_b86k")
            (datadir / "tokenizer").symlink_to(model_dir / "tokenizer")
            renv = {k: v for k, v in os.environ.items() if not k.startswith("RCLIP_")}
            renv.update(RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1")
            run_process(rclip_index_cmd(python, folder, 8), env=renv)
            plan.append(("rclip -n", rclip_query_cmd(python, no_indexing=True), folder, renv))
            record["rclip_versions"] = rclip_versions(python)
        for variant, cmd, cwd, e in plan:  # warm-up, untimed
            query(variant, cmd, cwd, e)
        runs = []
        for rep in range(reps):
            order = plan if rep % 2 == 0 else plan[::-1]
            for variant, cmd, cwd, e in order:
                q = query(variant, cmd, cwd, e)
                q["rep"] = rep
                runs.append(q)
                print(f"  {variant:<20} rep {rep}: {q['wall_s']:.2f} s {q.get('backend', '')} "
                      f"{q.get('tokens_from') or ''} load {q['loadavg_before'][0]}", flush=True)  # fmt: skip
        record["runs"] = runs
        record["commands"] = {v: " ".join(map(str, c)) for v, c, _, _ in plan}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {v: median([r["wall_s"] for r in record["runs"] if r["variant"] == v]) for v, *_ in plan}
    record["medians_s"] = med
    rows = []
    for v, s in med.items():
        model = v.split()[0]
        base = med.get(f"{model} no-rerank")
        rows.append([v, f"{s:.2f}", f"{s / base:.2f}x" if base and model != "rclip" else "",
                     f"{s / med['rclip -n']:.2f}x" if "rclip -n" in med else ""])  # fmt: skip
    record["ratios"] = {v: {"vs_no_rerank": r[2], "vs_rclip": r[3]} for v, r in zip(med, rows, strict=True)}
    print_table(f"cold whole processes, medians of {reps} ({n} photos)", ["run", "s", "/ no-rerank", "/ rclip -n"],
                rows)  # fmt: skip
    path = write_record("default-search" + (f"-{args.tag}" if args.tag else ""), record, args.out)
    print(f"record: {path}")


if __name__ == "__main__":
    main()
