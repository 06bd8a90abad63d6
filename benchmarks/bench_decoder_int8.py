"""Int8 decoder weights for the ONNX rerank: ONNX Runtime's dynamic quantisation (int8 MatMul weights, per tensor
or per channel) of an exported decoder, against the float32 graph on one model's cached tokens.

    python benchmarks/bench_decoder_int8.py EXPORT_FOLDER TOKENS.npy [--per-channel]

EXPORT_FOLDER is a ``$COCATK_CACHE/text-onnx/<key>`` folder with a decoder (``bench_default_search.py`` leaves them
under /tmp/cocatk-bench/default-search/cocatk-cache); TOKENS.npy holds (N, T, D) float16 decoder tokens of N images
(``model.image_tokens(images).half().numpy()``). Prints the time per query and, per query, the largest difference
in nats per token and whether the top-5/top-10 order holds. Kept only within 0.05 nats/token and the same top-10.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

TEXTS = ["a red bicycle", "two dogs playing in the snow", "a photo of a cat", "sunset over the sea", "x"]


def main() -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cocatk import decoderonnx, textonnx

    ap = argparse.ArgumentParser()
    ap.add_argument("export", type=Path)
    ap.add_argument("tokens", type=Path)
    ap.add_argument("--per-channel", action="store_true")
    a = ap.parse_args()
    meta = json.loads((a.export / "meta.json").read_text())
    tokens = np.load(a.tokens)
    out = Path(tempfile.mkdtemp(prefix="decoder-int8-"))
    t0 = time.perf_counter()
    quantize_dynamic(
        str(a.export / decoderonnx.GRAPH), str(out / decoderonnx.GRAPH), per_channel=a.per_channel,
        weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True,
        extra_options={"MatMulConstBOnly": True},
    )  # fmt: skip
    print(f"quantised in {time.perf_counter() - t0:.1f} s")
    engine = textonnx.TextOnnx(a.export, meta)

    def run(folder: Path) -> tuple[list[float], list[np.ndarray]]:
        dec = decoderonnx.DecoderOnnx(folder, meta["decoder"])
        times, per_token = [], []
        for text in TEXTS:
            start = time.perf_counter()
            ids = engine.caption_ids(text)
            embs = engine._one_text(text)[1][None, : len(ids) - 1]
            per_token.append(dec.loglik(embs, ids[None, 1:], tokens) / (len(ids) - 1))
            times.append(time.perf_counter() - start)
        return times, per_token

    t_ref, ref = run(a.export)
    t_q, got = run(out)
    print(f"seconds per query: float32 {np.round(t_ref, 3).tolist()}  int8 {np.round(t_q, 3).tolist()}")
    for text, r, g in zip(TEXTS, ref, got, strict=True):
        same = [list(np.argsort(-r)[:k]) == list(np.argsort(-g)[:k]) for k in (5, 10)]
        print(f"{text!r}: {float(np.abs(r - g).max()):.3f} nats/token, top-5 same {same[0]}, top-10 same {same[1]}")


if __name__ == "__main__":
    main()
