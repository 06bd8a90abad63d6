"""Reference captions from open_clip's own ``CoCa.generate`` (needs transformers < 4.56), for tests/test_captioning.py.

Runs in a separate interpreter (``COCATK_REF_PYTHON``: a venv with torch, open_clip_torch 3.3 and transformers<4.56)
and imports nothing from cocatk. It builds the model exactly as ``cocatk.models.loading._build`` does (seed 0 on the
CPU, decoder projection initialised for random weights, or a checkpoint loaded strictly), reads preprocessed images
from a safetensors file, and prints the generated ids as JSON.

Input (stdin, JSON): {"config": config JSON path or open_clip architecture, "weights": path or null,
"images": safetensors path (key "images"), "threads": int,
"runs": [{"name": str, "kwargs": {...generate kwargs...}, "length_penalty": float, "batch_size": int}]}
Output (stdout, JSON): {"transformers": version, "runs": {name: [[ids after SOT, up to the first EOT]...]},
"seconds": {name: float}}
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from pathlib import Path


def build(config: str, weights: str | None):
    import open_clip
    import torch

    if config.endswith(".json"):
        open_clip.add_model_config(config)
    arch = Path(config).stem if config.endswith(".json") else config
    logging.disable(logging.WARNING)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # cocatk.models.RANDOM_SEED
        model = open_clip.create_model(arch, pretrained=None, device="cpu")
        if weights is None:
            proj = model.text_decoder.text_projection
            with torch.no_grad():
                torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    if weights is not None:
        open_clip.load_checkpoint(model, weights, strict=True, weights_only=True)
    return model.eval()


def trim(row: list[int], eot: int = 49407) -> list[int]:
    row = row[1:]  # SOT
    return row[: row.index(eot) + 1] if eot in row else row


def main() -> None:
    import open_clip.coca_model as cm
    import torch
    import transformers
    from safetensors.torch import load_file

    req = json.load(sys.stdin)
    torch.set_num_threads(int(req.get("threads") or torch.get_num_threads()))
    model = build(req["config"], req.get("weights"))
    images = load_file(req["images"])["images"]
    scorer = cm.BeamSearchScorer
    out: dict = {"transformers": transformers.__version__, "runs": {}, "seconds": {}}
    for run in req["runs"]:
        # open_clip passes no length_penalty to HF's BeamSearchScorer: set the scorer's default for this run
        cm.BeamSearchScorer = functools.partial(scorer, length_penalty=run.get("length_penalty", 1.0))
        torch.manual_seed(0)
        bs = run.get("batch_size") or images.shape[0]
        t = time.perf_counter()
        rows: list[list[int]] = []
        with contextlib.redirect_stdout(sys.stderr):  # transformers' deprecation warnings
            for i in range(0, images.shape[0], bs):
                ids = model.generate(images[i : i + bs], **run["kwargs"])
                rows.extend(trim(r) for r in ids.tolist())
        out["seconds"][run["name"]] = time.perf_counter() - t
        out["runs"][run["name"]] = rows
    cm.BeamSearchScorer = scorer
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
