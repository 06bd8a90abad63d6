"""Output helpers: results on stdout, everything else (progress, warnings, errors) on stderr.

File names are shown through :mod:`cocatk.paths`: readable in tables and messages (never parsed as Rich markup),
exact bytes with ``--paths`` / ``-0``, and the documented ``path`` / ``path_b64`` form in JSON.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from ..paths import display_path, text_path, to_bytes

#: Results (tables) go to stdout; progress, warnings and errors to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _json_safe(data: Any) -> Any:
    """Every string as valid Unicode (a file name that is not UTF-8 would otherwise fail to encode)."""
    if isinstance(data, str):
        return text_path(data)
    if isinstance(data, dict):
        return {_json_safe(k): _json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_json_safe(v) for v in data]
    return data


def stdout_to_stderr(active: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Inside: what anything writes on stdout goes to stderr. For a `--ray` run: Ray's driver prints its cluster
    messages ("A worker died ...") on stdout, which must hold only the command's output (`--json`, TSV)."""
    return contextlib.redirect_stdout(sys.stderr) if active else contextlib.nullcontext()


def print_json(data: Any) -> None:
    """One JSON document on stdout (plain, no colour codes, so scripts can parse it)."""
    sys.stdout.write(json.dumps(_json_safe(data), indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_paths(paths: Iterable[str], nul: bool = False) -> None:
    """The exact bytes of each path, one per line (``nul``: NUL-terminated, like ``find -print0``), for xargs."""
    end = b"\0" if nul else b"\n"
    stream = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    for p in paths:
        if stream is not None:
            stream.write(to_bytes(p) + end)
        else:  # a text-only stdout (tests capture it so): the readable form is all it can hold
            sys.stdout.write(display_path(p) + end.decode())
    if stream is not None:
        stream.flush()
    sys.stdout.flush()


def show_path(path: str, style: str = "") -> Text:
    """A file name for a table cell or message: readable, never interpreted as markup."""
    return Text(display_path(path), style=style)


def warn(message: str | Text) -> None:
    """``warning: <message>`` on stderr; the message is plain text (a path in it cannot inject markup)."""
    err.print(Text.assemble(("warning: ", "yellow"), message), highlight=False, soft_wrap=True)


def note(message: str | Text) -> None:
    err.print(message if isinstance(message, Text) else Text(message), highlight=False, soft_wrap=True)


def _cell_text(cell: Any) -> str:
    """A table cell as one line of plain text: markup removed, tabs and newlines escaped."""
    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        text = Text.from_markup(cell).plain
    else:
        text = str(cell)
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def print_table(table: Any, rows: Iterable[Sequence[Any]] | None = None) -> None:
    """A Rich table on a terminal; otherwise TSV with a header row, every value whole (never wrapped or cut).

    A pipe gets what ``cut``, ``grep`` and ``sort`` expect, as rclip and sqlite-utils print: the header, then one
    line per row, cells separated by tabs (a tab or newline inside a value is shown as ``\\t`` / ``\\n``, as file
    names are everywhere; ``--paths`` gives exact bytes). The table's caption (warnings) goes to stderr there, so
    stdout stays one table.

    Args:
        table: the ``rich.table.Table`` to show on a terminal.
        rows: the TSV rows when they differ from the table's cells (e.g. a value the table shows once per group);
            default: the table's own cells.
    """
    if out.is_terminal:
        out.print(table)
        return
    header = [_cell_text(c.header) for c in table.columns]
    if rows is None:
        columns = [list(c._cells) for c in table.columns]  # noqa: SLF001 - Rich keeps cells per column
        rows = list(zip(*columns, strict=True)) if columns else []
    lines = ["\t".join(header)] + ["\t".join(_cell_text(c) for c in row) for row in rows]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    if table.caption:
        err.print(table.caption, highlight=False, soft_wrap=True)
