"""Schemathesis against a real `cocatk serve` on the demo index, from the app's own OpenAPI document.

Every check (``schemathesis.toml``: ``[checks] enabled = true``: no 5xx, every status and body as declared,
schema-valid requests accepted, schema-violating ones rejected, unsupported methods answered 405 with ``Allow``)
over every operation, in every phase (examples, coverage, fuzzing, stateful), with a bounded, seeded example count
so that a CI run is repeatable and takes about half a minute. A failure prints Schemathesis's report with the
``curl`` line that reproduces it; record such a case in tests/test_serve.py as a regression test when fixing it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from browser_support import Server, build_demo_index

pytest.importorskip("schemathesis")

ROOT = Path(__file__).resolve().parents[1]
#: Examples per operation and phase; 11 operations give about 1,000 cases at 30 (a few seconds each 100 by hand).
EXAMPLES = int(os.environ.get("COCATK_FUZZ_EXAMPLES", "30"))
SEED = int(os.environ.get("COCATK_FUZZ_SEED", "29"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = build_demo_index(tmp_path_factory.mktemp("fuzz-demo"))
    srv = Server(root / "index", root / "home")
    try:
        yield srv
    finally:
        srv.stop()


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


@pytest.mark.slow
def test_schemathesis_finds_nothing(server, tmp_path):
    cmd = [*_schemathesis(), "--config-file", str(ROOT / "schemathesis.toml"), "run", f"{server.url}/openapi.json",
           "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--no-color"]  # fmt: skip
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report[-12000:]
    assert "Selected: 11/11" in report and " passed" in report, report[-4000:]
    generated = int(report.split(" generated,")[0].rsplit(None, 1)[-1])
    assert generated >= 10 * EXAMPLES, report[-4000:]  # every operation was exercised
    log = server.log()
    assert "Traceback" not in log and "internal error" not in log, log
