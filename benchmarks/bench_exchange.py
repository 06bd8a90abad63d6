"""An index exported as clip-retrieval's embeddings folder, read back by clip-retrieval's reader (embedding-reader).

    python benchmarks/bench_exchange.py                          # 1,000 photos, the demo model
    python benchmarks/bench_exchange.py --model coca_ViT-B-32    # seeded random weights from a local file

Builds an index of ``--n`` photo-like JPEGs (``_photos.py``, generated once under /tmp/cocatk-bench/exchange) with
``cocatk index``, then for ``--dtype float32`` and ``float16``: ``cocatk export OUT --format clip-retrieval --dtype D
--shard-size S --index IDX --json`` (whole processes, timed), reads OUT with
``embedding_reader.EmbeddingReader(OUT/img_emb, file_format="parquet_npy", metadata_folder=OUT/metadata,
meta_columns=["image_path", "id"])`` in its own order, and compares with the index's own vectors
(``Index.embeddings`` in id order): max |d| over every value, whether the metadata's ids and image paths are the
index's ids and paths in the same order, and for float16 whether the rows are exactly the float16 rounding of the
stored vectors. Then ``cocatk index --from-embeddings OUT --index NEW`` imports each export into a fresh index, whose
vectors are compared with the original's by path (float32 must come back bit for bit; float16 is normalised again).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import ROOT, ensure_random_weights, machine_info, print_table, write_record
from _photos import CACHE_DIR, ensure_photo_set


def cocatk(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cocatk", *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"cocatk {' '.join(args)} failed ({r.returncode}): {(r.stdout + r.stderr)[-3000:]}")
    return json.loads(r.stdout), wall


def read_back(out: Path) -> tuple[np.ndarray, list[dict[str, Any]], float]:
    """The folder as clip-retrieval's back end reads it: (vectors, metadata rows, seconds)."""
    from embedding_reader import EmbeddingReader

    t = time.perf_counter()
    reader = EmbeddingReader(
        embeddings_folder=str(out / "img_emb"),
        file_format="parquet_npy",
        metadata_folder=str(out / "metadata"),
        meta_columns=["image_path", "id"],
    )
    vecs, meta = [], []
    for emb, df in reader(batch_size=10**5, start=0, end=reader.count, show_progress=False):
        vecs.append(emb)
        meta.extend(df.to_dict("records"))
    return np.concatenate(vecs), meta, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", default="320x240", help="photo size WxH")
    ap.add_argument("--model", default="demo", help="demo, or an open_clip CoCa architecture (random weights)")
    ap.add_argument("--shard-size", type=int, default=300, help="rows per img_emb_N.npy (several: the reader pairs)")
    ap.add_argument("--tag", default=None, help="suffix of the record's name")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    record: dict[str, Any] = {"machine": machine_info(), "n": args.n, "size": args.size, "model": args.model}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    record["commit"] = commit.stdout.strip() or "unknown (not a git checkout)"
    import embedding_reader

    record["embedding_reader"] = getattr(embedding_reader, "__version__", None) or _dist_version("embedding-reader")
    photos = ensure_photo_set(CACHE_DIR / "exchange" / f"{w}x{h}-{args.n}", args.n, w, h, os.cpu_count() or 2)
    if args.model == "demo":
        model = ["--model", "demo", "--device", "cpu"]
    else:
        weights = ensure_random_weights(CACHE_DIR / "default-search" / f"weights-{args.model}" /
                                        "open_clip_model.safetensors", args.model)  # fmt: skip
        model = ["--model", args.model, "--pretrained", str(weights), "--device", "cpu"]
    work = Path(tempfile.mkdtemp(prefix="cocatk-bench-exchange-"))
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, COCATK_HOME=str(work / "home"), COCATK_CACHE=str(work / "cache"), COCATK_TEXT_ONNX="0",
               PYTHONPATH=path)  # fmt: skip
    env.pop("COCATK_INDEX", None)
    sys.path.insert(0, str(ROOT))
    from cocatk.retrieval import Index

    rows = []
    try:
        idx = work / "idx"
        rep, wall = cocatk(["index", str(photos[0].parent), "--index", str(idx), *model, "--json"], env)
        print(f"indexed {rep['total']} photos in {wall:.1f} s", flush=True)
        with Index.open(idx) as ix:
            ids = ix.store.ids().tolist()
            ref = ix.embeddings(ids)
            paths = ix.store.paths_for_ids(ids)
        record["dim"] = int(ref.shape[1])
        for dtype in ("float32", "float16"):
            out = work / f"out-{dtype}"
            cmd = ["export", str(out), "--format", "clip-retrieval", "--dtype", dtype]
            exp, export_s = cocatk([*cmd, "--shard-size", str(args.shard_size), "--index", str(idx), "--json"], env)
            vecs, meta, read_s = read_back(out)
            maxd = float(np.abs(vecs - ref).max())
            order = [m["id"] for m in meta] == ids and [m["image_path"] for m in meta] == paths
            f16_exact = bool(np.array_equal(vecs, ref.astype(np.float16).astype(np.float32)))
            new = work / f"new-{dtype}"
            imp, import_s = cocatk(["index", "--from-embeddings", str(out), "--index", str(new), "--device", "cpu",
                                    "--json"], env)  # fmt: skip
            with Index.open(new) as nx:
                nids = nx.store.ids().tolist()
                by_path = dict(zip(nx.store.paths_for_ids(nids), nids, strict=True))
                back = nx.embeddings([by_path[p] for p in paths])
            import_maxd = float(np.abs(back - ref).max())
            res = {
                "dtype": dtype,
                "rows": exp["rows"],
                "shards": exp["shards"],
                "bytes": exp["bytes"],
                "export_wall_s": round(export_s, 3),
                "read_s": round(read_s, 3),
                "max_abs_d": maxd,
                "metadata_order_matches": order,
                "rows_are_float16_rounding": f16_exact,
                "import_wall_s": round(import_s, 3),
                "import": {k: imp.get(k) for k in ("imported", "already", "missing", "hashed", "total")},
                "import_max_abs_d": import_maxd,
            }
            record.setdefault("results", []).append(res)
            rounding = ("yes" if f16_exact else "no") if dtype == "float16" else "-"
            rows.append([dtype, exp["rows"], exp["shards"], f"{exp['bytes'] / 1e6:.2f}", f"{maxd:.3g}",
                         "yes" if order else "NO", rounding, f"{import_maxd:.3g}",
                         f"{export_s:.2f}", f"{read_s:.3f}", f"{import_s:.2f}"])  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(
        f"cocatk export -> embedding-reader, {args.n} photos, {args.model} ({record['dim']}-d), shard size "
        f"{args.shard_size}; max |d| against the index's own vectors",
        ["dtype", "rows", "shards", "MB", "max |d|", "order + paths match", "= fp16 rounding", "import max |d|",
         "export s", "read s", "import s"],
        rows,
    )  # fmt: skip
    write_record("exchange" + (f"-{args.tag}" if args.tag else ""), record)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
