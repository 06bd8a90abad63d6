"""CoCa's caption log-likelihood without torch: the multimodal decoder exported to ONNX, run by ONNX Runtime.

The default ``cocatk search`` reranks its top 50 by log p(query | image). From cached decoder tokens that is one
decoder pass over the candidates, but through torch a cold process first spends seconds importing torch and
open_clip and building the model (benchmarks/RESULTS.md section 5). So ``cocatk index`` exports the decoder once per
model, next to the text tower (:mod:`cocatk.models.onnx`, same cache folder, same records), and a cold search runs both
in ONNX Runtime.

What is exported and checked:
    * the graph: the text tower's token embeddings of the decoder input (1, L, D) float32, the target ids (1, L)
      int64 and the candidates' cached tokens (N, T, D) float16 -> the summed log-probabilities (N,) float32. It is
      :func:`cocatk.models.decoder_logits` with the cross-attention folded into the queries (the order torch runs
      for a query), then ``logit[target] - logsumexp(logits)``, summed over the L positions. N and L are dynamic:
      the graph comes from the dynamo exporter (``torch.export``), whose symbolic shapes keep them so.
    * the result against open_clip's own decoder forward (unfolded, float32) on :data:`PROBES` over
      :data:`PROBE_IMAGES` token sets, before anything is kept: within :data:`MAX_NATS_PER_TOKEN`.

This module is the lower half: it writes and runs the graph from token embeddings. Tokenising the query and running
the text tower (whose graph also returns those token embeddings) is :class:`cocatk.models.onnx.text.TextOnnx`'s.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .session import open_session

if TYPE_CHECKING:  # pragma: no cover
    pass


GRAPH, WEIGHTS = "decoder.onnx", "decoder.onnx.data"

#: Largest |ONNX - torch fp32| log-likelihood allowed at export, per scored token (measured ~2e-6 on coca_ViT-B-32
#: random weights and the demo model: the same float32 arithmetic in another order).
MAX_NATS_PER_TOKEN = 1e-3

#: Texts scored at export: one word, a query, a long caption (the folded path at H L >= T too), odd tokens.
PROBES: tuple[str, ...] = (
    "x",
    "a red bicycle",
    "two dogs playing in the snow at night next to a wooden fence and a small red house with a chimney",
    "route 66 in 1999: 3.14 km/h!!! 🐕",
)

#: Images whose decoder tokens the probes are scored against: seeded noise and flat colours, decoded at the model's
#: size (more than one, so a graph that mixed up candidates would fail).
PROBE_IMAGES = 5

#: Logits per ONNX run are kept near this many bytes (N x L x vocab float32), as torch's chunking does.
CHUNK_BYTES = 256 << 20


class DecoderOnnx:
    """An exported decoder: scores one text against N images' cached tokens. Made by
    :meth:`cocatk.models.onnx.text.TextOnnx.decoder`; nothing is loaded until the first call."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self._session: Any = None
        self._lock = threading.Lock()

    @property
    def vocab(self) -> int:
        return int(self.meta["vocab"])

    def loglik(self, embs: np.ndarray, targets: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Summed log p(targets | image) per image: ``embs`` (1, L, D) float32, ``targets`` (1, L) int64, ``tokens``
        (N, T, D) float16 (any float array is cast). Returns float64 (N,)."""
        session = self.load()
        n = tokens.shape[0]
        if n == 0:
            return np.zeros(0, np.float64)
        tokens = np.ascontiguousarray(tokens, dtype=np.float16)
        chunk = max(1, CHUNK_BYTES // max(1, targets.shape[1] * self.vocab * 4))
        feeds = {"embs": np.ascontiguousarray(embs, np.float32), "targets": np.ascontiguousarray(targets, np.int64)}
        out = [session.run(None, {**feeds, "tokens": tokens[i : i + chunk]})[0] for i in range(0, n, chunk)]
        return np.concatenate(out).astype(np.float64)

    def prefetch(self) -> None:
        """Start opening the session in a background thread, so a cold search overlaps it with the text tower and
        FAISS (0.3-0.4 s off a cold coca-l14 search, RESULTS 6.2c). :meth:`load` waits for it; a failure here is
        left for :meth:`load` to raise."""
        if self._session is not None:
            return

        def run() -> None:
            with contextlib.suppress(Exception):
                self.load()

        threading.Thread(target=run, name="cocatk-decoder-open", daemon=True).start()

    def load(self) -> Any:
        """The ONNX Runtime session (opened once).

        Raises:
            ExportUnreadableError: the graph cannot be loaded (truncated, edited, an ONNX Runtime too old for it).
        """
        with self._lock:
            if self._session is None:
                self._session = open_session(self.folder / GRAPH, "decoder")
            return self._session


def export_decoder(decoder: Any, folder: Path, example_tokens: Any, example_embs: Any) -> None:
    """Write ``decoder`` (open_clip's ``MultimodalTransformer``, float32 on the CPU) as ``folder``/decoder.onnx with
    its weights in decoder.onnx.data.

    Raises:
        Exception: the exporter's own errors (an op without an ONNX form, onnxscript missing).
    """
    import torch

    from ..coca import decoder_logits

    class _Scorer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder  # registered: the exporter sees the weights as initialisers

        def forward(self, embs: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            logits = decoder_logits(self.decoder, tokens.float(), embs, fold=True)  # (N, L, vocab)
            picked = logits.gather(-1, targets.expand(tokens.shape[0], -1).unsqueeze(-1)).squeeze(-1)
            return (picked - torch.logsumexp(logits, dim=-1)).sum(dim=-1)

    export_graph(
        _Scorer().eval(), (example_embs, example_targets(example_embs), example_tokens), folder / GRAPH, WEIGHTS,
        input_names=["embs", "targets", "tokens"], output_names=["loglik"],
        dynamic={"embs": {1: "L"}, "targets": {1: "L"}, "tokens": {0: "N"}},
    )  # fmt: skip


def example_targets(embs: Any) -> Any:
    import torch

    return torch.ones((1, embs.shape[1]), dtype=torch.int64)


def export_graph(
    module: Any,
    args: tuple[Any, ...],
    path: Path,
    weights: str,
    input_names: list[str],
    output_names: list[str],
    dynamic: dict[str, dict[int, str]],
) -> None:
    """Export ``module`` with the dynamo exporter (``torch.export``, symbolic ``dynamic`` axes) to ``path``, its
    weights in the side file ``weights`` (ONNX Runtime maps it: a cold session does not parse a large protobuf).
    nn.MultiheadAttention's fused fast path (no ONNX form) is off for the export; the exporter's progress lines
    (stdout) and warnings (stderr, some from C++) are silenced."""
    import onnx
    import torch
    from torch.export import Dim

    names = {axis: Dim(axis, min=1, max=1 << 16) for dims in dynamic.values() for axis in dims.values()}
    shapes = {name: {i: names[axis] for i, axis in dims.items()} for name, dims in dynamic.items()}
    shapes.update({name: None for name in input_names if name not in shapes})
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    trace = path.parent / f".{path.name}.trace"
    trace.mkdir()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, dynamic_shapes=shapes, input_names=input_names,
                output_names=output_names, opset_version=18, verbose=False,
            )  # fmt: skip
            program.save(str(trace / "single.onnx"), external_data=True)
        graph = onnx.load(str(trace / "single.onnx"))
        onnx.save_model(graph, str(path), save_as_external_data=True, location=weights, size_threshold=1024)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        import shutil

        shutil.rmtree(trace, ignore_errors=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send file descriptors 1 and 2 to /dev/null for the block (the exporter prints progress; C++ writes warnings
    straight to fd 2), and silence the loggers of onnxscript's optimiser."""
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    levels = {name: logging.getLogger(name).level for name in ("onnxscript", "torch.onnx", "torch.export")}
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        for name in levels:
            logging.getLogger(name).setLevel(logging.ERROR + 10)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def reference_loglik(decoder: Any, embs: Any, targets: Any, tokens: Any) -> np.ndarray:
    """open_clip's own decoder forward (no folding) in float32: the summed log-probabilities the export is checked
    against. ``embs`` (1, L, D), ``targets`` (1, L), ``tokens`` (N, T, D) torch tensors."""
    import torch

    with torch.inference_mode():
        x = tokens.float()
        logits = decoder(x, embs.float().expand(x.shape[0], -1, -1))
        logp = logits.float().log_softmax(dim=-1)
        picked = logp.gather(-1, targets.expand(x.shape[0], -1).unsqueeze(-1)).squeeze(-1)
        return picked.sum(dim=-1).double().numpy()


def probe_tokens(model: Any) -> Any:
    """Decoder tokens (N, T, D) float16 of :data:`PROBE_IMAGES` seeded images at the model's size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    size = int(model.image_size)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(3)]
    images += [Image.new("RGB", (size, size), c) for c in ((200, 30, 30), (30, 60, 200))][: PROBE_IMAGES - 3]
    return model.image_tokens(images).half().cpu()
