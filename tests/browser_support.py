"""Helpers for the real-browser tests of `cocatk serve` (tests/test_browser.py): Chromium, servers, the demo index.

Nothing here imports playwright: the test module skips with a reason when Chromium or playwright is missing.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS_IMG = REPO / "docs" / "img"


def screenshot_dir(tmp: Path) -> Path:
    """docs/img when COCATK_UPDATE_SCREENSHOTS=1 (refreshes the README's pictures), else ``tmp``: a test run leaves
    the work tree clean."""
    return DOCS_IMG if os.environ.get("COCATK_UPDATE_SCREENSHOTS") == "1" else tmp


#: clip-retrieval's wheel (its built front end is inside); .ci/run pre-downloads it, the tests download it if missing.
CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
CLIP_CACHE = REPO / ".cache" / "clip-retrieval"

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """A Chromium or Chrome binary: $COCATK_CHROMIUM, then the distribution's, then PATH."""
    env = os.environ.get("COCATK_CHROMIUM")
    if env and Path(env).exists():
        return env
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"):
        if Path(candidate).exists():
            return candidate
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        COCATK_HOME=str(home / "cocatk"),
        COCATK_CACHE=str(home / "cache"),
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(home / "hf"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    for var in ("COCATK_MODEL", "COCATK_PRETRAINED", "COCATK_DEVICE", "COCATK_INDEX", "COCATK_TOKEN"):
        env.pop(var, None)
    return env


_BUILD = """
import sys
from pathlib import Path
from cocatk.demo.scenes import generate_folder
from cocatk.retrieval import Index
root = Path(sys.argv[1]); photos = root / "photos"
generate_folder(photos / "holiday", n=20, seed=2026, manifest=False)
generate_folder(photos / "garden", n=20, seed=7, manifest=False)
index = Index.open(root / "index", model="demo", device="cpu", create=True, rebuild=True)
try:
    index.update([photos], cache_tokens=True)
finally:
    index.close()
"""


def build_demo_index(root: Path) -> Path:
    """40 demo scene photos in two folders (holiday/, garden/) and their index (demo model, CPU); returns root."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", _BUILD, str(root)], check=True, env=_env(root / "home"), timeout=300)
    return root


class Server:
    """`cocatk serve` in a subprocess on 127.0.0.1 (a free port); ``url`` is its base URL."""

    def __init__(self, index: Path, home: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "cocatk",
            "serve",
            "--index",
            str(index),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(extra or []),
        ]
        home.mkdir(parents=True, exist_ok=True)
        self.log_path = home / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 (closed by stop())
        self.proc = subprocess.Popen(cmd, env=_env(home), stdout=self._log, stderr=subprocess.STDOUT, cwd=home)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cocatk serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/health", timeout=2):
                    break
            except urllib.error.HTTPError:  # answering (401 with --token): up
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log = self.log()
                self.stop()
                raise RuntimeError(f"cocatk serve did not answer /api/health in 120 s:\n{log}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """Serve ``directory`` over HTTP on 127.0.0.1 in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def clip_front_build() -> Path | None:
    """clip-retrieval's built front end (the folder with index.html), from the cached wheel; None when unavailable."""
    import zipfile

    CLIP_CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CLIP_CACHE.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    wheels = sorted(CLIP_CACHE.glob("clip_retrieval-2.45.0-*.whl"))
    if not wheels:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", CLIP_RETRIEVAL, "-d", str(CLIP_CACHE)],
                check=True,
                timeout=180,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        wheels = sorted(CLIP_CACHE.glob("clip_retrieval-2.45.0-*.whl"))
        if not wheels:
            return None
    out = CLIP_CACHE / "unpacked"
    if not (out / "front" / "build" / "index.html").exists():
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(out, [n for n in z.namelist() if n.startswith("front/build/")])
    build = out / "front" / "build"
    return build if (build / "index.html").exists() else None
