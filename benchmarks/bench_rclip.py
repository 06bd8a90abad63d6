"""A real peer: rclip (github.com/yurijmikhalevich/rclip, from PyPI) against ``cocatk index`` / ``cocatk search``,
as whole processes on the same folder of 12 MP JPEGs.

    python benchmarks/bench_rclip.py            # 60 photos at 4000x3000, 2 repetitions of everything
    python benchmarks/bench_rclip.py --quick    # 20 photos, 1 repetition (a smoke test)
    python benchmarks/bench_rclip.py --rclip-python /some/venv/bin/python   # an rclip installed elsewhere

Run it on a quiet machine: both tools use every core, so anything else running moves the figures (the load
average before and after each run is in the record).

**rclip's own environment.** rclip is installed into its own virtual environment so it cannot disturb cocatk's:
``<cache>/venv-rclip`` (``python -m venv`` + ``pip install rclip``), created on the first run unless
``--rclip-python`` names an interpreter that already has rclip. The benchmark prints what it did.

**The stand-in model.** rclip (3.x) runs open_clip ``ViT-B-32-256`` (``datacomp_s34b_b86k``) as two ONNX files on
onnxruntime's CPU provider, 256x256 input: ``$RCLIP_DATADIR/ViT-B-32-256-datacomp_s34b_b86k/visual.onnx`` (input
``input`` float32 [N,3,256,256] -> one output [N,512]), ``.../textual.onnx`` (``input`` int64 [N,77] -> [N,512]) and
``$RCLIP_DATADIR/tokenizer/bpe_simple_vocab_16e6.txt.gz``; it downloads them from the Hugging Face hub when they
are missing. No weights can be downloaded here, so this script builds the same files the way rclip's own
``scripts/convert_model.py`` does (``torch.onnx.export``, opset 18, TorchScript exporter, dynamic batch axis, fp32)
from a *seeded random-weight* ``ViT-B-32-256`` created with open_clip in cocatk's environment, and copies the
tokenizer vocabulary open_clip ships (the file rclip's repository copies too). They are kept in
``<cache>/rclip-model`` and linked into a fresh ``RCLIP_DATADIR`` for every run, so rclip finds them and never
touches the network (``HF_HUB_OFFLINE=1`` as well). Random weights give meaningless rankings, but the graph,
shapes and dtype are the real model's, so the speed is the real model's; cocatk runs ``coca_ViT-B-32`` with seeded
random weights for the same reason, loaded from a local checkpoint file as a user's real weights are.

**What is measured** (the photos are ``_photos.py``'s 12 MP set, generated once into the cache folder; all files are
read once before timing so both tools find them in the page cache; one untimed warm-up run of each tool on 4 of
the photos fills the page cache with the model files and the bytecode caches unless ``--no-warmup``):

- Indexing, fresh database each run, the two tools alternating, ``--reps`` times:
  ``_rclip_driver.py FOLDER`` under rclip's Python (``rclip.main.init_rclip``: what the ``rclip`` command runs
  before its search: open the database, check the model, ``ensure_index``) and
  ``cocatk index FOLDER --model coca_ViT-B-32 --pretrained WEIGHTS --index TMP --device cpu --json``, where
  WEIGHTS is a local 1 GB safetensors file of seeded random weights (built once, like a user's downloaded
  checkpoint; ``--cocatk-weights none`` initialises random weights in every process instead).
  Per run: whole-process wall seconds (images / wall = the whole-process rate) and the in-loop rate: cocatk's
  own ``--json`` report (``encoded / seconds`` of ``Index.update``: scan, hash, decode, encode, SQLite, FAISS,
  checkpoint; the model is loaded before it), rclip's ``ensure_index`` timed inside the driver, less its lazy
  ONNX session load (rclip opens the visual model at the first batch; cocatk's figure excludes its model load
  too). Both with their defaults: batch 8 and one loader thread per core for rclip, onnxruntime with one
  intra-op thread per core; cocatk's batch, decode threads and torch threads.
- Cold queries, fresh processes on the indexes of the last indexing repetition, alternating, ``--reps`` times:
  ``rclip -n "a red bicycle"`` (``--no-indexing``: straight to the query, as cocatk's search does) and
  ``cocatk search "a red bicycle" --index TMP --no-rerank --json`` (which embeds the text with the text tower
  that ``cocatk index`` exported to ONNX, without importing torch; the untimed warm-up run made that export, as
  rclip's ONNX files are made before its runs too), the same query on an index of the same folder built with the
  shipped ``demo`` model (untimed), and the coca_ViT-B-32 query through torch (``--backend torch``: the path before
  the export); then once each ``cocatk search`` with its
  default rerank (CoCa caption likelihood over the candidates, which re-decodes the files) and the plain
  ``rclip "a red bicycle"`` (which first re-checks the folder for changes).
- FLOPs per image of the two image towers (``torch.utils.flop_counter.FlopCounterMode``, a multiply-add is
  2 FLOPs; batch 1; attention through the math SDPA kernel and with autograd on, because the fused kernels of
  ``nn.MultiheadAttention``'s inference fast path and of SDPA on the CPU are invisible to the counter).

The record ``benchmarks/results/rclip-<machine>.json`` holds every run, the medians, the ratios cocatk / rclip
(loop rate, whole-process rate, cold query time: below 1 is faster for cocatk), the load averages, the exact
command lines and the versions of both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ensure_random_weights, machine_info, median, print_table, write_record
from _photos import CACHE_DIR, ensure_photo_set

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "_rclip_driver.py"
QUERY = "a red bicycle"
COCATK_MODEL = "coca_ViT-B-32"
RCLIP_ARCH = "ViT-B-32-256"  # rclip's model: open_clip ViT-B-32-256, datacomp_s34b_b86k
RCLIP_MODEL_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"  # rclip.model_download.MODEL_SUBDIR
RCLIP_TOKENIZER = "tokenizer/bpe_simple_vocab_16e6.txt.gz"  # rclip.model_download.TOKENIZER_VOCAB
RCLIP_IMAGE_SIZE = 256
CONTEXT_LENGTH = 77
SEED = 0
EXPORT_RECIPE_VERSION = 1


# --- rclip's environment and model --------------------------------------------------------------------------


def ensure_rclip_python(cache: Path, given: str | None, spec: str) -> Path:
    """The interpreter that has rclip: ``given``, else ``<cache>/venv-rclip`` (created and filled when missing)."""
    if given:
        python = Path(given)
        print(f"rclip: using {python} (--rclip-python)", flush=True)
        return python
    venv = cache / "venv-rclip"
    python = venv / "bin" / "python"
    has_rclip = python.is_file() and subprocess.run([python, "-c", "import rclip"], capture_output=True).returncode == 0
    if has_rclip:
        print(f"rclip: using the existing venv {venv}", flush=True)
        return python
    if not python.is_file():
        print(f"rclip: creating a venv of its own: {sys.executable} -m venv {venv}", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    print(f"rclip: {python} -m pip install {spec}", flush=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", spec], check=True)
    return python


def rclip_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({k: m.version(k) for k in ('rclip', 'onnxruntime', 'numpy', 'pillow')}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def ensure_rclip_model(model_dir: Path) -> dict[str, Any]:
    """Export a seeded random-weight open_clip ViT-B-32-256 to the ONNX files rclip loads, in the layout it expects
    under its data folder (see the module docstring); reused when the recipe marker matches."""
    import open_clip
    import torch

    recipe = {
        "arch": RCLIP_ARCH,
        "weights": f"random, torch.manual_seed({SEED})",
        "image_size": RCLIP_IMAGE_SIZE,
        "opset": 18,
        "dtype": "float32",
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "version": EXPORT_RECIPE_VERSION,
    }
    sub = model_dir / RCLIP_MODEL_SUBDIR
    marker = model_dir / "recipe.json"
    files = [sub / "visual.onnx", sub / "textual.onnx", model_dir / RCLIP_TOKENIZER]
    if marker.is_file() and json.loads(marker.read_text()) == recipe and all(f.is_file() for f in files):
        print(f"rclip model: reusing the random-weight ONNX export in {model_dir}", flush=True)
        return recipe
    print(f"rclip model: exporting a random-weight {RCLIP_ARCH} to ONNX into {model_dir} ...", flush=True)
    t = time.perf_counter()
    sub.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = open_clip.create_model(RCLIP_ARCH, pretrained=None).eval()
    assert model.visual.image_size == (RCLIP_IMAGE_SIZE, RCLIP_IMAGE_SIZE), model.visual.image_size

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = model.visual

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.visual(x)

    class Textual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(x)

    image = torch.randn(1, 3, RCLIP_IMAGE_SIZE, RCLIP_IMAGE_SIZE)
    text = torch.zeros(1, CONTEXT_LENGTH, dtype=torch.long)
    for wrapper, example, name in ((Visual(), image, "visual.onnx"), (Textual(), text, "textual.onnx")):
        torch.onnx.export(
            wrapper.eval(),
            (example,),
            str(sub / name),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=18,
            dynamo=False,
        )
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (model_dir / RCLIP_TOKENIZER).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(vocab, model_dir / RCLIP_TOKENIZER)
    # Check the export against torch on a batch of 2 (the dynamic batch axis) when onnxruntime is at hand.
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        images = torch.randn(2, 3, RCLIP_IMAGE_SIZE, RCLIP_IMAGE_SIZE)
        tokens = torch.zeros(2, CONTEXT_LENGTH, dtype=torch.long)
        tokens[:, 0], tokens[0, 1], tokens[1, 1], tokens[:, 2] = 49406, 320, 539, 49407
        with torch.no_grad():
            ref = {"visual.onnx": (images, model.visual(images)), "textual.onnx": (tokens, model.encode_text(tokens))}
        for name, (x, y) in ref.items():
            sess = ort.InferenceSession(str(sub / name), providers=["CPUExecutionProvider"])
            (out,) = sess.run(None, {"input": x.numpy()})
            diff = float(abs(out - y.numpy()).max())
            assert out.shape == (2, 512) and diff < 1e-3, (name, out.shape, diff)
            recipe[f"max_abs_diff_{name}"] = diff
    marker.write_text(json.dumps({k: v for k, v in recipe.items() if not k.startswith("max_abs")}))
    print(f"rclip model: exported in {time.perf_counter() - t:.0f} s", flush=True)
    return recipe


def rclip_datadir(model_dir: Path, tmp: Path) -> Path:
    """A fresh RCLIP_DATADIR (so a fresh db.sqlite3) whose model files are links to the export."""
    datadir = tmp / "rclip-data"
    datadir.mkdir(parents=True)
    (datadir / RCLIP_MODEL_SUBDIR).symlink_to(model_dir / RCLIP_MODEL_SUBDIR, target_is_directory=True)
    (datadir / "tokenizer").symlink_to(model_dir / "tokenizer", target_is_directory=True)
    return datadir


def rclip_env(datadir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCLIP_")}
    env.update(RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1")
    return env


# --- FLOPs --------------------------------------------------------------------------------------------------


def tower_gflops(arch: str, size: int) -> float:
    """GFLOPs of one image through ``arch``'s image tower (multiply-add = 2 FLOPs)."""
    import open_clip
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(SEED)
    model = open_clip.create_model(arch, pretrained=None).eval()
    # Autograd on and the math SDPA kernel: otherwise nn.MultiheadAttention's fused inference path and the CPU's
    # flash SDPA run kernels FlopCounterMode does not see (the q/k/v/out projections and the attention matmuls).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.visual(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


# --- runs ---------------------------------------------------------------------------------------------------


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_process(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` to completion; wall seconds and the load average before and after."""
    before = loadavg()
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "loadavg_before": before, "loadavg_after": loadavg(), "stdout": proc.stdout}


def rclip_index_cmd(python: Path, folder: Path, batch_size: int) -> list[str]:
    return [str(python), str(DRIVER), str(folder), str(batch_size)]


def rclip_query_cmd(python: Path, no_indexing: bool) -> list[str]:
    script = python.parent / "rclip"
    cmd = [str(script)] if script.is_file() else [str(python), "-m", "rclip"]
    return [*cmd, *(["-n"] if no_indexing else []), QUERY]


#: cocatk's weights: a local checkpoint file (what a user has after the first download), set in main().
COCATK_WEIGHTS: list[str] = ["none"]


def ensure_cocatk_weights(cache: Path) -> Path:
    """A safetensors file of seeded random coca_ViT-B-32 weights (1 GB, like the real checkpoint), built once."""
    return ensure_random_weights(cache / "cocatk-weights" / "open_clip_model.safetensors", COCATK_MODEL)


def cocatk_index_cmd(cocatk: str, folder: Path, index: Path, device: str) -> list[str]:
    return [cocatk, "index", str(folder), "--model", COCATK_MODEL, "--pretrained", COCATK_WEIGHTS[0]] + [
        "--index",
        str(index),
        "--device",
        device,
        "--json",
    ]


def cocatk_search_cmd(cocatk: str, index: Path, device: str, rerank: bool) -> list[str]:
    return [cocatk, "search", QUERY, "--index", str(index), "--device", device, "--json"] + (
        [] if rerank else ["--no-rerank"]
    )


def run_rclip_index(python: Path, model_dir: Path, folder: Path, batch_size: int, tmp: Path) -> dict[str, Any]:
    datadir = rclip_datadir(model_dir, tmp)
    r = run_process(rclip_index_cmd(python, folder, batch_size), env=rclip_env(datadir))
    line = [x for x in r.pop("stdout").splitlines() if x.startswith("RCLIP_DRIVER ")][-1]
    d = json.loads(line.split(" ", 1)[1])
    loop_s = d["ensure_index_s"] - d["session_load_s"]
    return {
        "tool": "rclip",
        **r,
        "images": d["encoded"],
        "in_database": d["in_database"],
        "images_per_s": d["encoded"] / r["wall_s"],
        "loop_s": loop_s,
        "loop_images_per_s": d["encoded"] / loop_s,
        "datadir": str(datadir),
        "driver": d,
    }


def run_cocatk_index(cocatk: str, folder: Path, device: str, tmp: Path) -> dict[str, Any]:
    index = tmp / "index"
    r = run_process(cocatk_index_cmd(cocatk, folder, index, device))
    report = json.loads(r.pop("stdout"))
    keep = ("encoded", "failed_total", "checkpoints", "seconds", "images_per_s", "timings", "warnings")
    return {
        "tool": "cocatk",
        **r,
        "images": report["encoded"],
        "images_per_s": report["encoded"] / r["wall_s"],
        "loop_s": report["seconds"],
        "loop_images_per_s": report["encoded"] / report["seconds"],
        "index": str(index),
        "report": {k: report.get(k) for k in keep},
    }


def run_query(name: str, cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> dict:
    r = run_process(cmd, cwd=cwd, env=env)
    out = r.pop("stdout")
    q: dict[str, Any] = {"variant": name, **r}
    if name.startswith("cocatk"):
        res = json.loads(out)
        q["hits"] = len(res["hits"])
        q["timings_ms"] = res.get("timings_ms")
        q["backend"] = res["model"].get("backend", "torch")  # onnxruntime: the text tower exported by cocatk index
    else:  # rclip prints "score\tfilepath" then one line per hit
        q["hits"] = max(0, len(out.strip().splitlines()) - 1)
    return q


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 photos, 1 repetition")
    ap.add_argument("--n", type=int, default=None, help="photos (default 60, 20 with --quick)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of each run (default 2, 1 with --quick)")
    ap.add_argument("--cache", type=Path, default=CACHE_DIR, help="photos, rclip's venv and its ONNX model")
    ap.add_argument("--rclip-python", default=None, help="a Python with rclip (default: <cache>/venv-rclip)")
    ap.add_argument("--rclip-spec", default="rclip", help="what pip installs into a new venv-rclip")
    ap.add_argument("--rclip-batch-size", type=int, default=8, help="rclip's --indexing-batch-size (its default 8)")
    ap.add_argument("--cocatk", default=None, help="the cocatk command (default: the one beside this Python)")
    ap.add_argument("--device", default="cpu", help="cocatk's --device (rclip runs on the CPU)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    ap.add_argument(
        "--cocatk-weights",
        default=None,
        help="cocatk's --pretrained: a checkpoint file (default: seeded random weights saved once to a 1 GB file), "
        "or none (random initialisation in every process)",
    )
    ap.add_argument("--out", type=Path, default=None, help="folder of the JSON record (default benchmarks/results)")
    args = ap.parse_args()

    n = args.n or (20 if args.quick else 60)
    reps = args.reps or (1 if args.quick else 2)
    cocatk = args.cocatk or str(Path(sys.executable).parent / "cocatk")
    if not Path(cocatk).is_file():
        cocatk = shutil.which("cocatk") or cocatk
    record: dict[str, Any] = {"machine": machine_info(), "n": n, "reps": reps, "query": QUERY}
    COCATK_WEIGHTS[0] = args.cocatk_weights or str(ensure_cocatk_weights(args.cache))
    record["cocatk_weights"] = COCATK_WEIGHTS[0]

    python = ensure_rclip_python(args.cache, args.rclip_python, args.rclip_spec)
    record["rclip_python"] = str(python)
    record["rclip_versions"] = rclip_versions(python)
    model_dir = args.cache / "rclip-model"
    record["rclip_model"] = {"dir": str(model_dir), **ensure_rclip_model(model_dir)}
    print(f"rclip {record['rclip_versions']}", flush=True)

    print("counting FLOPs of the two image towers ...", flush=True)
    flops = {
        "rclip": {"arch": RCLIP_ARCH, "image_size": RCLIP_IMAGE_SIZE, "gflops": tower_gflops(RCLIP_ARCH, 256)},
        "cocatk": {"arch": COCATK_MODEL, "image_size": 224, "gflops": tower_gflops(COCATK_MODEL, 224)},
    }
    flops["ratio_cocatk_over_rclip"] = flops["cocatk"]["gflops"] / flops["rclip"]["gflops"]
    record["image_tower_gflops"] = flops
    print(
        f"  {RCLIP_ARCH} @256: {flops['rclip']['gflops']:.2f} GFLOPs/image, "
        f"{COCATK_MODEL} @224: {flops['cocatk']['gflops']:.2f} GFLOPs/image",
        flush=True,
    )

    folder = (args.cache / f"4000x3000-{n}").resolve()  # rclip keys its database by os.getcwd(): no symlinks
    t = time.perf_counter()
    paths = ensure_photo_set(folder, n, 4000, 3000, workers=os.cpu_count() or 2)
    print(f"{n} photos in {folder} ({time.perf_counter() - t:.0f} s to generate/check)", flush=True)
    record["photos"] = {"folder": str(folder), "size": "4000x3000", "mb_per_image": 0.0}
    record["photos"]["mb_per_image"] = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
    for p in paths:  # both tools find the photos in the page cache
        p.read_bytes()

    work = Path(tempfile.mkdtemp(prefix="cocatk-bench-rclip-"))
    try:
        if not args.no_warmup:
            warm = work / "warmup-photos"
            warm.mkdir()
            for p in paths[:4]:
                shutil.copy2(p, warm / p.name)
            t = time.perf_counter()
            run_rclip_index(python, model_dir, warm, args.rclip_batch_size, work / "warm-rclip")
            run_cocatk_index(cocatk, warm, args.device, work / "warm-cocatk")
            print(f"warm-up runs on 4 photos: {time.perf_counter() - t:.0f} s (untimed)", flush=True)

        # Indexing: the two alternate, a fresh database / index folder each run.
        runs: list[dict[str, Any]] = []
        last: dict[str, Path] = {}
        for rep in range(reps):
            for tool in ("rclip", "cocatk"):
                tmp = work / f"{tool}-{rep}"
                tmp.mkdir()
                if tool == "rclip":
                    r = run_rclip_index(python, model_dir, folder, args.rclip_batch_size, tmp)
                    last["rclip"] = Path(r["datadir"])
                else:
                    r = run_cocatk_index(cocatk, folder, args.device, tmp)
                    last["cocatk"] = Path(r["index"])
                r["rep"] = rep
                runs.append(r)
                print(
                    f"  index {tool} rep {rep}: {r['images']} images, {r['wall_s']:.1f} s whole process "
                    f"({r['images_per_s']:.2f} img/s), loop {r['loop_images_per_s']:.2f} img/s, "
                    f"load {r['loadavg_before'][0]} -> {r['loadavg_after'][0]}",
                    flush=True,
                )
                if r["images"] != n:
                    print(f"  WARNING: {tool} encoded {r['images']} of {n} photos", flush=True)
        record["index_runs"] = runs

        # The same folder indexed with the shipped demo model (untimed; its export made here too): the issue's
        # "cold search on the demo index" beside rclip's query in the same alternation.
        demo_index = work / "demo-index"
        run_process([cocatk, "index", str(folder), "--model", "demo", "--index", str(demo_index), "--json"])

        # Cold queries: fresh processes on the last indexes, alternating.
        env = rclip_env(last["rclip"])
        queries: list[dict[str, Any]] = []
        plan = [
            ("rclip -n", rclip_query_cmd(python, no_indexing=True), folder, env),
            ("cocatk --no-rerank", cocatk_search_cmd(cocatk, last["cocatk"], args.device, rerank=False), None, None),
            ("cocatk demo --no-rerank", cocatk_search_cmd(cocatk, demo_index, args.device, rerank=False), None, None),
            (
                "cocatk --no-rerank --backend torch",
                cocatk_search_cmd(cocatk, last["cocatk"], args.device, rerank=False) + ["--backend", "torch"],
                None,
                None,
            ),
        ]
        for rep in range(reps):
            for name, cmd, cwd, e in plan:
                q = run_query(name, cmd, cwd, e)
                q["rep"] = rep
                queries.append(q)
                shown = f" ({q['backend']})" if "backend" in q else ""
                print(f"  query {name} rep {rep}: {q['wall_s']:.2f} s, {q['hits']} hits{shown}", flush=True)
        for name, cmd, cwd, e in [
            ("rclip (re-checks the folder)", rclip_query_cmd(python, no_indexing=False), folder, env),
            ("cocatk (rerank)", cocatk_search_cmd(cocatk, last["cocatk"], args.device, rerank=True), None, None),
        ]:
            q = run_query(name, cmd, cwd, e)
            q["rep"] = 0
            queries.append(q)
            print(f"  query {name}: {q['wall_s']:.2f} s, {q['hits']} hits", flush=True)
        record["query_runs"] = queries
    finally:
        shutil.rmtree(work, ignore_errors=True)

    record["commands"] = {
        "rclip_index": shlex.join(rclip_index_cmd(python, folder, args.rclip_batch_size))
        + "   (env RCLIP_DATADIR=<fresh dir> HF_HUB_OFFLINE=1)",
        "cocatk_index": shlex.join(cocatk_index_cmd(cocatk, folder, Path("<fresh dir>/index"), args.device)),
        "rclip_query": f"cd {folder} && " + shlex.join(rclip_query_cmd(python, True)),
        "cocatk_query": shlex.join(cocatk_search_cmd(cocatk, Path("<index>"), args.device, rerank=False)),
    }

    def med(tool: str, key: str) -> float:
        return median([r[key] for r in runs if r["tool"] == tool])

    def qmed(variant: str) -> float:
        return median([q["wall_s"] for q in queries if q["variant"] == variant])

    summary = {
        tool: {
            "wall_s": med(tool, "wall_s"),
            "images_per_s": med(tool, "images_per_s"),
            "loop_images_per_s": med(tool, "loop_images_per_s"),
        }
        for tool in ("rclip", "cocatk")
    }
    summary["query_s"] = {v: qmed(v) for v in dict.fromkeys(q["variant"] for q in queries)}
    summary["ratios_cocatk_over_rclip"] = {
        "loop_rate": summary["cocatk"]["loop_images_per_s"] / summary["rclip"]["loop_images_per_s"],
        "whole_process_rate": summary["cocatk"]["images_per_s"] / summary["rclip"]["images_per_s"],
        "cold_query_time": summary["query_s"]["cocatk --no-rerank"] / summary["query_s"]["rclip -n"],
        "cold_query_time_demo": summary["query_s"]["cocatk demo --no-rerank"] / summary["query_s"]["rclip -n"],
        "cold_query_time_torch": summary["query_s"]["cocatk --no-rerank --backend torch"]
        / summary["query_s"]["rclip -n"],
        "cold_query_time_rerank": summary["query_s"]["cocatk (rerank)"] / summary["query_s"]["rclip -n"],
        "image_tower_gflops": flops["ratio_cocatk_over_rclip"],
    }
    record["summary"] = summary

    print_table(
        f"indexing {n} photos of 12 MP, whole processes, fresh database each run "
        f"(rclip {record['rclip_versions']['rclip']}"
        f" ONNX {RCLIP_ARCH}@256 vs cocatk {COCATK_MODEL}@224 on {args.device}; random weights)",
        ["tool", "rep", "wall s", "images", "img/s whole", "img/s loop", "load before", "load after"],
        [
            [r["tool"], r["rep"], r["wall_s"], r["images"], r["images_per_s"], r["loop_images_per_s"]]
            + [r["loadavg_before"][0], r["loadavg_after"][0]]
            for r in runs
        ],
    )
    print_table(
        f'cold queries "{QUERY}", fresh processes',
        ["variant", "rep", "wall s", "hits", "load before", "load after"],
        [
            [q["variant"], q["rep"], q["wall_s"], q["hits"], q["loadavg_before"][0], q["loadavg_after"][0]]
            for q in queries
        ],
    )
    ratios = summary["ratios_cocatk_over_rclip"]
    print_table(
        "summary (medians); ratio = cocatk / rclip",
        ["figure", "rclip", "cocatk", "ratio"],
        [
            ["index img/s, loop", summary["rclip"]["loop_images_per_s"], summary["cocatk"]["loop_images_per_s"]]
            + [ratios["loop_rate"]],
            ["index img/s, whole process", summary["rclip"]["images_per_s"], summary["cocatk"]["images_per_s"]]
            + [ratios["whole_process_rate"]],
            [
                "cold query s (-n / --no-rerank)",
                summary["query_s"]["rclip -n"],
                summary["query_s"]["cocatk --no-rerank"],
            ]
            + [ratios["cold_query_time"]],
            [
                "cold query s (cocatk demo index)",
                summary["query_s"]["rclip -n"],
                summary["query_s"]["cocatk demo --no-rerank"],
            ]
            + [ratios["cold_query_time_demo"]],
            [
                "cold query s (cocatk --backend torch)",
                summary["query_s"]["rclip -n"],
                summary["query_s"]["cocatk --no-rerank --backend torch"],
            ]
            + [ratios["cold_query_time_torch"]],
            ["cold query s (cocatk rerank)", summary["query_s"]["rclip -n"], summary["query_s"]["cocatk (rerank)"]]
            + [ratios["cold_query_time_rerank"]],
            ["image tower GFLOPs/image", flops["rclip"]["gflops"], flops["cocatk"]["gflops"]]
            + [ratios["image_tower_gflops"]],
        ],
    )
    record["cocatk_version"] = _cocatk_version()
    write_record("rclip", record, args.out)


def _cocatk_version() -> str | None:
    try:
        import cocatk

        return getattr(cocatk, "__version__", None)
    except Exception:
        return None


if __name__ == "__main__":
    main()
