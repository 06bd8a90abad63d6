"""Shared helpers of the benchmark scripts: machine description, timers, the printed table and the JSON record.

Every benchmark prints a table on stdout and writes ``benchmarks/results/<name>-<machine>.json`` holding the machine
(CPU model, cores, load average, torch / faiss / open_clip versions, GPU), the settings and every figure, so a number
in RESULTS.md can always be traced to the run and the machine that produced it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The scripts run as `python benchmarks/bench_x.py` from a checkout; make `import cocatk` work without an install.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def lscpu_model() -> str:
    """The CPU as `lscpu` names it ("Model name"), which the figures cite; "" without lscpu."""
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken: the record says so instead of failing the benchmark
        return None
    return str(getattr(mod, "__version__", "?"))


def machine_info() -> dict[str, Any]:
    """Where the figures come from. Call it at the end of a run too: the load average moves."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "open_clip": _version("open_clip"),
    }
    if "faiss" in sys.modules or _version("faiss") is not None:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    else:
        info["faiss"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["gpu_sms"] = p.multi_processor_count
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def machine_slug(info: dict[str, Any]) -> str:
    """A short file-name-safe machine name: the GPU when one is used, else the CPU model and core count."""
    name = info["gpu"] if info.get("gpu") else f"{info['cpu']}-{info['cores']}c"
    name = re.sub(r"\b(NVIDIA|AMD|Intel\(R\)|Core\(TM\)|CPU|Processor|\d+-Core)\b", "", name)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def timeit(fn: Callable[[], Any], repeat: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones (``sync`` waits for a GPU)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return times


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    i = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[i]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain-text table (benchmarks print to logs and CI as often as to terminals)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)))


def write_record(name: str, record: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<name>-<machine>.json`` (machine info measured now, load average included) and return its path."""
    info = machine_info()
    if "machine" in record:  # keep the start-of-run load average beside the end one
        info["loadavg_start"] = record["machine"].get("loadavg")
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record, "machine": info}
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{machine_slug(info)}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}  (load average {info['loadavg']}, {info['cpu']}, {info['cores']} cores)")
    return path


def add_threads_option(ap: Any) -> None:
    """``--threads`` (default 1) for an argparse parser: torch/FAISS threads of a CPU benchmark."""
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/FAISS threads; 1 by default: on a shared machine, more threads than free cores costs up to 30x",
    )


def ensure_random_weights(path: Path, arch: str) -> Path:
    """A safetensors file of seeded random ``arch`` weights at ``path`` (built once, in a fresh process): cocatk then
    loads its model the way it does for a user, from a local checkpoint file, not by random initialisation."""
    import subprocess

    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {path} (seeded random {arch} weights)", flush=True)
        code = (
            "import sys, cocatk\nfrom safetensors.torch import save_file\n"
            f"m = cocatk.load_model({arch!r}, 'none', device='cpu', precision='fp32')\n"
            "save_file({k: v.contiguous() for k, v in m.model.state_dict().items()}, sys.argv[1] + '.tmp', "
            "metadata={'format': 'pt'})\n"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
        Path(str(path) + ".tmp").rename(path)
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a server a benchmark starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: Any, timeout: float = 20) -> None:
    """Terminate a subprocess (a server a benchmark started), killing it when it does not exit within ``timeout``."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
