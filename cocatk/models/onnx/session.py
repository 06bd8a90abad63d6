"""ONNX Runtime sessions of cocatk's exported graphs: one set of session options, one opener."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    pass


def open_session(path: Path, what: str) -> Any:
    """An ONNX Runtime CPU session of one of cocatk's heavy graphs (the decoder, the image tower) on
    :func:`rerank_threads` threads.

    Raises:
        ExportUnreadableError: the graph cannot be loaded (truncated, edited, an ONNX Runtime too old for it).
    """
    import onnxruntime as ort

    from ...errors import ExportUnreadableError

    try:
        return ort.InferenceSession(
            str(path), session_options(ort, threads=rerank_threads()), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # ONNX Runtime raises its own types (protobuf, I/O, graph)
        raise ExportUnreadableError(
            f"the ONNX {what} in {path.parent} cannot be loaded ({str(e).splitlines()[0][:120]})",
            hint=f"delete {path.parent}: the next `cocatk index` exports it again; or use --backend torch",
        ) from e


def rerank_threads() -> int:
    """Threads for a rerank pass: the decoder over 50 candidates is ~1 s of matrix work on one core, which a second
    core halves on an idle machine; more than two gained nothing on the 2-core machines measured."""
    return max(1, min(2, os.cpu_count() or 1))


def session_options(ort: Any, threads: int = 1) -> Any:
    """ONNX Runtime session options of cocatk's CPU graphs: ``threads`` intra-op threads that do not spin between
    runs (a spinning thread beside another program costs it a core), quiet logs, no weight pre-packing (a cold
    session opens in about half the time)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # ONNX Runtime's own warnings would reach the user's terminal
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
