"""Output helpers: results on stdout, everything else (progress, warnings, errors) on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

#: Results (tables) go to stdout; progress, warnings and errors to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def print_json(data: Any) -> None:
    """One JSON document on stdout (plain, no colour codes, so scripts can parse it)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def note(message: str) -> None:
    err.print(message, highlight=False)
