"""A text tower without torch, for cold text queries: open_clip's text tower exported to ONNX, run by ONNX Runtime.

A text-only ``cocatk search`` used to spend ~5 of its ~6 seconds importing torch and open_clip on a 2-core CPU; the
text tower itself takes ~60 ms (benchmarks/RESULTS.md section 5). So a process that already holds the model
(``cocatk index``, or a search that had to load torch) exports the text tower once per model identity, and a later
cold text query loads only numpy, ONNX Runtime and Hugging Face ``tokenizers``: the approach of rclip, which ships
its towers as ONNX files.

What is exported and checked:
    * the graph: token ids (N, context_length) int64 -> L2-normalised float32 embeddings (N, D), traced in fp32 from
      the same modules :meth:`cocatk.models.ClipModel.encode_texts` runs;
    * the tokenizer: open_clip's own BPE tables (``SimpleTokenizer``'s vocabulary and merge ranks) rebuilt as a
      ``tokenizers`` BPE with CLIP's pre-tokenising pattern; the text cleaning (ftfy, HTML entities, whitespace,
      lower case) runs here in Python, as open_clip does;
    * both against open_clip on :data:`PROBES` before anything is kept: equal token ids, and embeddings within
      :data:`MAX_ABS_DIFF` of torch's. A model whose tokenizer is not open_clip's BPE (SigLIP's and other hub
      tokenizers) is not exported; its queries keep the torch path.

Cache: ``$COCATK_CACHE/text-onnx/<key>/`` holding ``text.onnx`` (graph), ``text.onnx.data`` (weights, memory-mapped
by ONNX Runtime), ``tokenizer.json`` and ``meta.json``. The key hashes the model identity an index records (name,
architecture, weights id) with the export format and open_clip's version. The folder is written under a temporary
name and renamed into place, so a reader sees all of it or nothing.

Modules: :mod:`.cache` (the folders and their records), :mod:`.text` (:class:`TextOnnx`, the query side),
:mod:`.export` (writing and checking), :mod:`.decoder` and :mod:`.image` (CoCa's decoder and the image tower beside
it), :mod:`.session` (ONNX Runtime's options). Importing this package is cheap: ONNX Runtime, onnx and torch load
inside the functions that need them.
"""

from __future__ import annotations

from .cache import (
    FORMAT,
    available,
    cache_folder,
    describe,
    needs_export,
    read_meta,
    remove_export,
    remove_older_exports,
)
from .export import MAX_ABS_DIFF, PROBES, export_text_onnx
from .text import TextOnnx, clean_text, open_text_onnx

__all__ = [
    "FORMAT",
    "MAX_ABS_DIFF",
    "PROBES",
    "TextOnnx",
    "available",
    "cache_folder",
    "clean_text",
    "describe",
    "export_text_onnx",
    "needs_export",
    "open_text_onnx",
    "read_meta",
    "remove_export",
    "remove_older_exports",
]
