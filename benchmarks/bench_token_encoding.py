"""Smaller token-cache encodings against the issue's fidelity bound: fp16 (what the cache stores) and int8 with one
scale per token (half the bytes), each against float32 tokens, for caption log-likelihood and the rerank's order.

    python benchmarks/bench_token_encoding.py

For the demo model (50 generated scenes) and seeded random-weight coca_ViT-B-32 (50 noise images), 20 queries
(``tests/test_rerank_onnx.py``'s): the largest |log p(query | image) difference| per scored token against the same
tokens in float32, and on how many queries the top 10 keep their order. The bound that keeps an encoding: within
0.05 nats per token and the same top-10 order on every query. Writes
``benchmarks/results/token-encoding-<machine>.json``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, machine_info, print_table, write_record
from PIL import Image

sys.path.insert(0, str(ROOT / "tests"))
from test_rerank_onnx import _queries  # noqa: E402

from cocatk import load_model  # noqa: E402

BOUND = 0.05


def int8_per_token(t: torch.Tensor) -> torch.Tensor:
    """Quantise to int8 with one scale per token row (max |x| / 127) and back."""
    s = t.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127
    return torch.round(t / s).clamp(-127, 127) * s


def images_for(name: str, size: int) -> list[Image.Image]:
    if name == "demo":
        from cocatk.demo.scenes import generate_folder

        d = Path(tempfile.mkdtemp())
        generate_folder(d, n=50, seed=3, min_size=96, max_size=160)
        return [Image.open(p).convert("RGB") for p in sorted(d.glob("*.jpg"))[:50]]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(50)]


def main() -> None:
    record = {"machine": machine_info(), "bound_nats_per_token": BOUND, "models": {}}
    rows = []
    for name in ("demo", "coca_ViT-B-32"):
        m = load_model(name, device="cpu", precision="fp32") if name == "demo" else (
            load_model(name, pretrained="none", device="cpu", precision="fp32")
        )  # fmt: skip
        tok = m.image_tokens(images_for(name, m.image_size)).float()
        for enc, coded, bytes_per in (("fp16", tok.half().float(), 2), ("int8/token", int8_per_token(tok), 1)):
            worst, same = 0.0, 0
            for q in _queries():
                n = m.caption_token_count(q)
                a, b = m.caption_loglik(q, tok), m.caption_loglik(q, coded)
                worst = max(worst, float(np.abs(a - b).max()) / n)
                same += list(np.argsort(-a, kind="stable")[:10]) == list(np.argsort(-b, kind="stable")[:10])
            holds = worst <= BOUND and same == 20
            record["models"].setdefault(name, {})[enc] = {"max_nats_per_token": worst, "top10_same": same,
                                                          "bytes_per_value": bytes_per, "holds": holds}  # fmt: skip
            rows.append([name, enc, f"{worst:.2e}", f"{same}/20", "yes" if holds else "no"])
    print_table("token encodings against float32 tokens", ["model", "encoding", "nats/token", "top-10", "holds"], rows)
    print(f"record: {write_record('token-encoding', record)}")


if __name__ == "__main__":
    main()
