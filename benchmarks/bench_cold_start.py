"""Cold start: the wall time of one ``cocatk search`` as a person waits for it (a fresh process: imports, model load,
text embedding, FAISS search), and where that time goes.

    python benchmarks/bench_cold_start.py                          # 3 repetitions of everything
    git worktree add /tmp/cocatk-before 2b0106f                    # the code before the cold-start work
    python benchmarks/bench_cold_start.py --baseline /tmp/cocatk-before   # both, alternating

Prepared once into ``/tmp/cocatk-bench/cold-start`` (not timed): a ``coca_ViT-B-32`` checkpoint of seeded random
weights saved as ``open_clip_model.safetensors`` (open_clip's own file name; ``open_clip.load_checkpoint`` reads a
``.safetensors`` file with ``safetensors.torch.load_file``), a folder of demo scene photos
(``cocatk.demo.scenes.generate_folder``), an index of them built with ``--model coca_ViT-B-32 --pretrained FILE``,
and one built with ``--model demo``. Random weights give meaningless rankings, but the file size (1 GB), the model
and the code path are the real ``coca-b32``'s.

- **whole**: ``python -m cocatk search "a red bicycle" --index IDX --json`` with ``--no-rerank`` and with the default
  rerank, each in a fresh process, ``--reps`` times; wall and CPU seconds from spawn to exit, and the search's own
  ``timings_ms`` from its JSON. ``python -c pass`` and ``cocatk --help`` are measured beside them.
- **breakdown**: a fresh interpreter (``_DRIVER`` below) runs the same command in-process, ``cocatk.cli.main``,
  with the imports hoisted to the front and timed one by one (torch, open_clip as cocatk imports it, FAISS) and
  perf_counter stamps around the library functions the command calls: the tokenizer, the model construction, the
  weight loading, the image tower's bf16 cast, the FAISS index read, the text embedding and the search. "other" is
  what remains of the command (argument parsing, SQLite, the manifest, rendering the JSON).

With ``--baseline DIR`` every measurement also runs with the cocatk of another checkout (``PYTHONPATH``), the two
alternating (the order flips every repetition), so load from other jobs on a shared machine hits both alike; the
table gives both and the ratio. The files are read once before timing and two untimed searches per checkout run
first, so the page cache, the bytecode caches and remembered digests are warm (as a person's second search finds
them). The record holds the load average before and after, and each side's commit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine_info, median, print_table, write_record

CACHE = Path("/tmp/cocatk-bench/cold-start")
QUERY = "a red bicycle"
ARCH = "coca_ViT-B-32"

# Runs in a fresh interpreter: argv = [index dir, query, rerank flag]; prints one JSON object of stage seconds.
_DRIVER = r"""
import contextlib, io, json, sys, time
T0 = time.perf_counter()
stages = {}
def stamp(name, t):
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
t = time.perf_counter(); import cocatk.cli.app; stamp("import cocatk.cli", t)
# argv[4] == "1": this run loads torch (a rerank, --backend torch, or a checkout without the ONNX text path), so its
# imports are hoisted here and timed; else they are left out, as the command itself leaves them out.
HOIST = sys.argv[4] == "1"
import os, cocatk, cocatk.models as M
if HOIST:
    t = time.perf_counter(); import torch; stamp("import torch", t)
    # What cocatk.cli.main() does in a real process, where this checkout has it. (A plain import would not tell: an
    # editable install's finder serves a module missing here from the installed checkout.)
    if os.path.exists(os.path.join(os.path.dirname(cocatk.__file__), "_imports.py")):
        from cocatk._imports import defer_optional_imports
        defer_optional_imports()
    t = time.perf_counter(); import open_clip; stamp("import open_clip (+torchvision, transformers, timm)", t)
t = time.perf_counter(); import faiss; stamp("import faiss", t)

STACK = []  # [name, start, seconds spent in wrapped callees]: each stage counts its own time only

def wrap(owner, attr, name):
    # Time owner.attr. A function of cocatk.models (a module in older checkouts, a package of submodules now) is
    # replaced in every cocatk module that holds it: `from .x import f` copies the name.
    if owner is M:
        found = [m for n, m in list(sys.modules.items()) if n.startswith("cocatk") and getattr(m, attr, None)]
        fns = {id(getattr(m, attr)): getattr(m, attr) for m in found}
        if not fns:
            return
        fn = next(iter(fns.values()))
        holders = [m for m in found if getattr(m, attr) is fn]
    else:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        holders = [owner]
    def timed(*a, **k):
        label = name(STACK) if callable(name) else name
        STACK.append([label, time.perf_counter(), 0.0])
        try:
            return fn(*a, **k)
        finally:
            label, start, inner = STACK.pop()
            elapsed = time.perf_counter() - start
            stages[label] = stages.get(label, 0.0) + elapsed - inner
            if STACK:
                STACK[-1][2] += elapsed
    for h in holders:
        setattr(h, attr, timed)

def bf16_label(stack):
    inside = stack[-1][0] if stack else ""
    return inside if inside.startswith("bf16 copy") else "bf16 cast of the image tower"

from cocatk.retrieval import vectors as V
if HOIST:
    import open_clip
    wrap(open_clip, "create_model_and_transforms", "model construction")
    wrap(open_clip, "load_checkpoint", "weight loading")
if os.path.exists(os.path.join(os.path.dirname(cocatk.__file__), "models", "onnx")):
    import cocatk.models.onnx as XO
    import cocatk.models.onnx.text as X
    wrap(XO, "open_text_onnx", "ONNX export lookup")
elif os.path.exists(os.path.join(os.path.dirname(cocatk.__file__), "textonnx.py")):
    import cocatk.textonnx as X
    wrap(X, "open_text_onnx", "ONNX export lookup")
else:
    X = None
if X is not None:
    wrap(X.TextOnnx, "_load", "ONNX Runtime session + tokenizer (import, load)")
    wrap(X.TextOnnx, "encode_texts", "text embedding")
wrap(M, "load_tokenizer", "tokenizer")
wrap(M, "_load_checkpoint", "weight loading")
wrap(M, "bf16_island", bf16_label)
wrap(M.ClipModel, "_bf16_copy", "bf16 copy of the text tower (first query)")
wrap(M, "_sha256_file", "sha256 of the weights")
wrap(faiss, "read_index", "FAISS index read")
wrap(M.ClipModel, "encode_texts", "text embedding")
wrap(V.VectorIndex, "search", "FAISS search")
import cocatk.retrieval.search as S
wrap(S, "_load_reranker", "rerank: reranker lookup")
wrap(S, "candidate_tokens", "rerank: decode files + image tower")
wrap(M.CocaModel, "caption_loglik", "rerank: caption likelihood")
import cocatk.cli as C
args = ["search", sys.argv[2], "--index", sys.argv[1], "--json"] + ([] if sys.argv[3] == "1" else ["--no-rerank"])
args += sys.argv[5:]
t = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = C.main(args)
command = time.perf_counter() - t
if code:
    sys.exit(f"search failed with exit code {code}")
json.loads(out.getvalue())  # the command printed its JSON document
inner = sum(v for k, v in stages.items() if not k.startswith("import"))
stages["other (CLI, SQLite, manifest, JSON)"] = command - inner
stages["total"] = time.perf_counter() - T0
stages["torch imported (1 = yes)"] = float("torch" in sys.modules)
print(json.dumps(stages))
"""


def _env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(root)})
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed cocatk has its bytecode cached; so does a checkout
    return env


def _run(cmd: list[str], root: Path = ROOT) -> subprocess.CompletedProcess:
    # cwd too: `python -c` and `python -m` put the working directory first on sys.path, before PYTHONPATH
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(root), cwd=root, check=False)


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def prepare(cache: Path, photos: int) -> dict[str, Path]:
    """The weights file, the photo folder and the two indexes (built once, reused by later runs)."""
    cache.mkdir(parents=True, exist_ok=True)
    weights = cache / "open_clip_model.safetensors"
    if not weights.is_file():
        print(f"building {weights} (seeded random {ARCH} weights)", file=sys.stderr)
        code = (
            "import sys, cocatk\nfrom safetensors.torch import save_file\n"
            f"m = cocatk.load_model({ARCH!r}, 'none', device='cpu', precision='fp32')\n"
            "sd = {k: v.contiguous() for k, v in m.model.state_dict().items()}\n"
            "save_file(sd, sys.argv[1] + '.tmp', metadata={'format': 'pt'})\n"
        )
        proc = _run([sys.executable, "-c", code, str(weights)])
        if proc.returncode:
            sys.exit(proc.stderr)
        Path(str(weights) + ".tmp").rename(weights)
    folder = cache / "photos"
    if not folder.is_dir():
        sys.path.insert(0, str(ROOT))
        from cocatk.demo.scenes import generate_folder

        generate_folder(folder, n=photos, seed=0, manifest=False)
    indexes = {
        "b32-file": (cache / "index-b32", ["--model", ARCH, "--pretrained", str(weights)]),
        "demo": (cache / "index-demo", ["--model", "demo"]),
    }
    out = {"weights": weights, "photos": folder}
    for name, (idx, model_args) in indexes.items():
        if not (idx / "manifest.json").is_file():
            print(f"indexing {folder} into {idx}", file=sys.stderr)
            proc = _run([sys.executable, "-m", "cocatk", "index", str(folder), "--index", str(idx), *model_args])
            if proc.returncode:
                sys.exit(proc.stderr)
        else:  # an index from before the ONNX text tower: its next run exports it (a no-op when done)
            proc = _run([sys.executable, "-m", "cocatk", "index", "--index", str(idx), "--json"])
            if proc.returncode:
                sys.exit(proc.stderr)
        out[name] = idx
    return out


def warm_page_cache(paths: list[Path]) -> None:
    for p in paths:
        files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def whole(index: Path, rerank: bool, root: Path, extra: tuple[str, ...] = ()) -> tuple[float, float, dict[str, Any]]:
    """(wall seconds, CPU seconds, the search's own timings_ms and backend) of one fresh ``cocatk search``."""
    cmd = [sys.executable, "-m", "cocatk", "search", QUERY, "--index", str(index), "--json", *extra]
    if not rerank:
        cmd.append("--no-rerank")
    cpu = _children_cpu()
    t = time.perf_counter()
    proc = _run(cmd, root)
    seconds = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout)
    return seconds, _children_cpu() - cpu, {**out["timings_ms"], "backend": out["model"].get("backend", "torch")}


def _has_text_onnx(root: Path) -> bool:
    return (root / "cocatk" / "textonnx.py").is_file() or (root / "cocatk" / "models" / "onnx").is_dir()


def breakdown(index: Path, rerank: bool, root: Path, extra: tuple[str, ...] = ()) -> dict[str, float]:
    hoist = rerank or "torch" in extra or not _has_text_onnx(root)
    cmd = [sys.executable, "-c", _DRIVER, str(index), QUERY, "1" if rerank else "0", "1" if hoist else "0", *extra]
    proc = _run(cmd, root)
    if proc.returncode:
        sys.exit(f"breakdown driver failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed(cmd: list[str], root: Path) -> tuple[float, float]:
    cpu = _children_cpu()
    t = time.perf_counter()
    proc = _run(cmd, root)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return time.perf_counter() - t, _children_cpu() - cpu


def _rev(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "cocatk"], capture_output=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="fresh processes per measurement (medians)")
    ap.add_argument("--photos", type=int, default=8, help="photos in the indexed folder")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout of cocatk (e.g. `git worktree add /tmp/before COMMIT`): every measurement runs in "
        "both, alternating, so a change of load on the machine hits both alike",
    )
    ap.add_argument("--tag", default=None, help="suffix of the record's name")
    ap.add_argument("--out", type=Path, default=None, help="folder of the JSON record (default benchmarks/results)")
    args = ap.parse_args()

    roots = {"this": ROOT}
    if args.baseline is not None:
        roots["baseline"] = args.baseline.resolve()
    record: dict[str, Any] = {
        "machine": machine_info(),
        "reps": args.reps,
        "query": QUERY,
        "arch": ARCH,
        "commits": {side: _rev(root) for side, root in roots.items()},
    }
    files = prepare(args.cache, args.photos)
    warm_page_cache([files["weights"], files["b32-file"], files["demo"], ROOT / "cocatk" / "assets"])
    for root in roots.values():  # bytecode caches, page cache of the interpreter's modules, remembered digests
        for _ in range(2):
            whole(files["b32-file"], False, root)
            whole(files["b32-file"], True, root)
            whole(files["demo"], False, root)

    # (label, index, rerank, extra arguments): a text query without rerank takes the ONNX text tower by default
    # where the checkout has it; "--backend torch" is the same query through torch, in the same run.
    cases: list[tuple[str, Path, bool, tuple[str, ...]]] = [
        (f"{name} {'rerank' if rr else 'no-rerank'}", files[name], rr, ())
        for name in ("b32-file", "demo")
        for rr in (False, True)
    ]
    if _has_text_onnx(ROOT):
        cases += [(f"{name} no-rerank --backend torch", files[name], False, ("--backend", "torch"))
                  for name in ("b32-file", "demo")]  # fmt: skip
    simple = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "cocatk --help": [sys.executable, "-m", "cocatk", "--help"],
    }
    wall: dict[str, dict[str, list[float]]] = {side: {} for side in roots}
    cpu: dict[str, dict[str, list[float]]] = {side: {} for side in roots}
    inner: dict[str, dict[str, list[dict[str, float]]]] = {side: {} for side in roots}
    stages: dict[str, dict[str, dict[str, list[float]]]] = {side: {} for side in roots}
    for rep in range(args.reps):
        order = list(roots.items()) if rep % 2 == 0 else list(roots.items())[::-1]
        for label, cmd in simple.items():
            for side, root in order:
                seconds, cpu_s = timed(cmd, root)
                wall[side].setdefault(label, []).append(seconds)
                cpu[side].setdefault(label, []).append(cpu_s)
        for label, idx, rr, extra in cases:
            for side, root in order:
                if extra and not _has_text_onnx(root):
                    continue  # a checkout without --backend
                seconds, cpu_s, timings = whole(idx, rr, root, extra)
                wall[side].setdefault(label, []).append(seconds)
                cpu[side].setdefault(label, []).append(cpu_s)
                inner[side].setdefault(label, []).append(timings)
        for label, idx, rr, extra in cases:
            if label != "demo rerank":
                for side, root in order:
                    if extra and not _has_text_onnx(root):
                        continue
                    for k, v in breakdown(idx, rr, root, extra).items():
                        stages[side].setdefault(label, {}).setdefault(k, []).append(v)

    sides = list(roots)
    cols = [f"{side} wall s" for side in sides] + [f"{side} CPU s" for side in sides]
    rows = []
    nan = [float("nan")]
    for label in wall["this"]:
        rows.append(
            [label]
            + [median(wall[side].get(label, nan)) for side in sides]
            + [median(cpu[side].get(label, nan)) for side in sides]
            + ([median(wall["this"][label]) / median(wall["baseline"].get(label, nan))] if "baseline" in roots else [])
        )
    ratio = ["this / baseline"] if "baseline" in roots else []
    print_table(
        f"whole process, fresh each time (medians of {args.reps}; {record['commits']})", ["run", *cols, *ratio], rows
    )
    for label in stages["this"]:
        keys = list(dict.fromkeys(k for side in sides for k in stages[side].get(label, {})))
        rows = [[k, *(median(stages[side][label].get(k, [0.0])) for side in sides)] for k in keys]
        print_table(f"breakdown: {label} (seconds, medians of {args.reps})", ["stage", *sides], rows)

    record.update(
        {
            "whole_seconds": {
                side: {k: {"median": median(v), "runs": v} for k, v in wall[side].items()} for side in sides
            },
            "whole_cpu_seconds": {
                side: {k: {"median": median(v), "runs": v} for k, v in cpu[side].items()} for side in sides
            },
            "search_timings_ms": inner,
            "breakdown_seconds": {
                side: {
                    label: {k: {"median": median(v), "runs": v} for k, v in st.items()}
                    for label, st in stages[side].items()
                }
                for side in sides
            },
            "weights_file_bytes": files["weights"].stat().st_size,
        }
    )
    write_record("cold-start" + (f"-{args.tag}" if args.tag else ""), record, args.out)


if __name__ == "__main__":
    main()
