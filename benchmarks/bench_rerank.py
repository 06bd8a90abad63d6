"""Rerank cost: ``CocaModel.caption_loglik`` over k candidates vs ``model(image, text)`` pair by pair.

    python benchmarks/bench_rerank.py            # coca_ViT-B-32, random weights, CPU, k = 10/50/200
    python benchmarks/bench_rerank.py --quick    # k = 10/50, fewer repeats

For one query and k candidate images, three ways to get log p(query | image) for every candidate:

- ``cached``: image tokens precomputed at index time; ``caption_loglik`` runs the text tower once and the
  multimodal decoder over the k candidates in chunks.
- ``uncached``: the tokens are computed at query time from the preprocessed candidate images (``image_tokens``,
  batched), then ``caption_loglik``.
- ``pair``: the baseline, ``model.model(image, text)`` (open_clip's CoCa forward) for each candidate, re-encoding
  both the image and the text, then the log-softmax of the logits at the labels, summed.

The three are timed interleaved (one query of each in turn) so load from other processes hits them alike, and the
scores are compared (max abs difference) so the speed-up is for the same numbers. Random weights: the speed is that
of the real model; the scores are meaningless but must agree.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import add_threads_option, machine_info, median, print_table, write_record

QUERY = "a photo of a red bicycle leaning against an old brick wall"


def pair_scores(m: Any, x: Any, ids: Any) -> Any:
    """The reference: open_clip's CoCa forward per (image, text) pair, log-softmax at the labels, summed."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(x.shape[0]):
            r = m.model(x[i : i + 1], ids)
            logp = r["logits"].float().log_softmax(-1)
            out.append(logp.gather(-1, r["labels"].unsqueeze(-1)).sum())
    return torch.stack(out).double().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="k = 10/50 only")
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--repeat", type=int, default=None, help="timed queries per k and method")
    ap.add_argument("--pair-max", type=int, default=50, help="pairs timed per query; more are extrapolated")
    add_threads_option(ap)
    args = ap.parse_args()

    import numpy as np
    import torch

    from cocatk import load_model

    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {"machine": machine_info(), "model": args.model, "weights": "random", "device": "cpu"}
    ks = (10, 50) if args.quick else (10, 50, 200)
    repeat = args.repeat or 2
    m = load_model(args.model, pretrained="none", device="cpu", precision="fp32")
    ids = m._caption_ids(QUERY)
    record.update(query=QUERY, query_tokens=m.caption_token_count(QUERY), torch_threads=torch.get_num_threads())
    gen = torch.Generator().manual_seed(0)
    rows = []
    for k in ks:
        x = torch.randn(k, 3, m.image_size, m.image_size, generator=gen)  # preprocessed candidates
        tokens = m.image_tokens(x)
        # Pair-by-pair is linear in k (k independent forwards); at large k it is timed on the first `pair_max`
        # candidates and scaled by k / pair_max (the record says so): on 2 shared cores one pair takes ~1 s.
        n_pair = min(k, args.pair_max)
        methods = {
            "cached": lambda tokens=tokens: m.caption_loglik(QUERY, tokens),
            "uncached": lambda x=x: m.caption_loglik(QUERY, m.image_tokens(x)),
            "pair": lambda x=x, n=n_pair: pair_scores(m, x[:n], ids),
        }
        m.caption_loglik(QUERY, tokens)  # warm-up (allocator, thread pool)
        times: dict[str, list[float]] = {name: [] for name in methods}
        scores: dict[str, Any] = {}
        for _ in range(repeat):
            for name, fn in methods.items():
                t = time.perf_counter()
                scores[name] = fn()
                times[name].append(time.perf_counter() - t)
        times["pair"] = [t * k / n_pair for t in times["pair"]]
        row = {f"{name}_ms": median(ts) * 1e3 for name, ts in times.items()}
        row["k"] = k
        row["speedup_cached"] = row["pair_ms"] / row["cached_ms"]
        row["speedup_uncached"] = row["pair_ms"] / row["uncached_ms"]
        row["pair_timed_candidates"] = n_pair
        row["max_abs_diff_cached_vs_pair"] = float(np.abs(scores["cached"][:n_pair] - scores["pair"]).max())
        row["max_abs_diff_uncached_vs_pair"] = float(np.abs(scores["uncached"][:n_pair] - scores["pair"]).max())
        row["score_range"] = [float(scores["pair"].min()), float(scores["pair"].max())]
        row["timings_s"] = times
        rows.append(row)
        print(f"k={k}: { ({key: v for key, v in row.items() if key != 'timings_s'}) }", flush=True)
    record["results"] = rows
    record["target"] = "cached >= 5x faster than pair-by-pair at k = 50"
    print_table(
        f"rerank cost per query, {args.model} random weights, CPU ({torch.get_num_threads()} threads), "
        f"query of {record['query_tokens']} tokens",
        ["k", "cached ms", "uncached ms", "pair ms", "pairs timed", "x cached", "x uncached", "max |diff|"],
        [
            [
                r["k"],
                r["cached_ms"],
                r["uncached_ms"],
                r["pair_ms"],
                r["pair_timed_candidates"],
                r["speedup_cached"],
                r["speedup_uncached"],
                max(r["max_abs_diff_cached_vs_pair"], r["max_abs_diff_uncached_vs_pair"]),
            ]
            for r in rows
        ],
    )
    write_record("rerank", record)


if __name__ == "__main__":
    main()
