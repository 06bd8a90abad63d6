"""CPU inference paths for CoCa's towers: which one to keep, measured side by side with fp32 as the baseline.

    python benchmarks/bench_cpu_paths.py              # coca_ViT-B-32, 1 and 2 threads, every candidate
    python benchmarks/bench_cpu_paths.py --quick      # fewer repetitions, no torch.compile
    python benchmarks/bench_cpu_paths.py --only image # one part: image, text or decoder

Candidates, each against plain fp32 eager (open_clip's modules as they load) measured in the same run:

- image tower (images/s at batch 16): ``bf16 weights`` (cocatk's CPU bf16 path: the tower's weights stored in bf16,
  oneDNN's AMX/AVX512-BF16 kernels), ``bf16 autocast``, ``channels_last`` (the patch-embedding conv is the only
  conv), ``jit.freeze`` (TorchScript trace + freeze: oneDNN fusion) in fp32 and bf16, ``torch.compile`` (inductor)
  in bf16, ``ONNX Runtime`` fp32 (the exported tower, as rclip runs its model), ``int8 dynamic`` (the Linear layers
  quantised per batch);
- text tower (ms per single query, the search latency, and texts/s at batch 64): fp32, bf16 weights, bf16 autocast,
  int8 dynamic;
- rerank decoder (ms to score one 8-token query against 50 images' cached tokens, CocaModel.caption_loglik's
  folded path): fp32, bf16 weights, bf16 autocast.

Every candidate's output is compared with fp32's: the minimum cosine of the embeddings, or the largest difference of
a caption log-likelihood per token. Random weights (``--pretrained none``): the speed is the real model's.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import machine_info, median, print_table, write_record

#: Seconds of the last ``_rate``'s first call (torch.compile compiles there; oneDNN builds its kernels).
FIRST_CALL_S: list[float] = [0.0]


def _rate(fn: Callable[[], Any], n: int, reps: int) -> tuple[float, Any]:
    """(items per second, last output): median over ``reps`` timed calls after two warm-up calls."""
    t = time.perf_counter()
    out = fn()
    FIRST_CALL_S[0] = time.perf_counter() - t
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return n / median(times), out


def _min_cos(a: Any, b: Any) -> float:
    import torch

    a = torch.nn.functional.normalize(torch.as_tensor(a).float(), dim=-1)
    b = torch.nn.functional.normalize(torch.as_tensor(b).float(), dim=-1)
    return float((a * b).sum(-1).min())


def image_candidates(m: Any, quick: bool) -> dict[str, Callable[[], Callable[[Any], Any]]]:
    """name -> builder of a function (pixels -> pooled embedding)."""
    import torch

    vis = m.model.visual

    def fp32() -> Callable[[Any], Any]:
        return lambda x: vis(x)[0]

    def bf16_weights() -> Callable[[Any], Any]:
        v = copy.deepcopy(vis).to(torch.bfloat16)
        return lambda x: v(x.to(torch.bfloat16))[0].float()

    def autocast() -> Callable[[Any], Any]:
        def f(x: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return vis(x)[0].float()

        return f

    def channels_last() -> Callable[[Any], Any]:
        v = copy.deepcopy(vis).to(memory_format=torch.channels_last)
        return lambda x: v(x.contiguous(memory_format=torch.channels_last))[0]

    def freeze(dtype: Any) -> Callable[[], Callable[[Any], Any]]:
        def build() -> Callable[[Any], Any]:
            v = copy.deepcopy(vis).to(dtype)
            example = torch.zeros(2, 3, m.image_size, m.image_size, dtype=dtype)
            with torch.inference_mode():
                frozen = torch.jit.freeze(torch.jit.trace(v, example, check_trace=False).eval())
            return lambda x: frozen(x.to(dtype))[0].float()

        return build

    def compiled() -> Callable[[Any], Any]:
        v = torch.compile(copy.deepcopy(vis).to(torch.bfloat16))
        return lambda x: v(x.to(torch.bfloat16))[0].float()

    def onnxruntime() -> Callable[[Any], Any]:
        import onnxruntime as ort

        class Pooled(torch.nn.Module):
            def __init__(self, v: Any) -> None:
                super().__init__()
                self.v = v

            def forward(self, x: Any) -> Any:
                return self.v(x)[0]

        path = Path(tempfile.gettempdir()) / f"cocatk-bench-{m.spec.arch}-visual.onnx"
        if not path.is_file():
            # Export outside inference mode: there nn.MultiheadAttention takes its fused fast path, which ONNX lacks.
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.zeros(2, 3, m.image_size, m.image_size)
                torch.onnx.export(
                    Pooled(vis), (x,), str(path), input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}},
                    dynamo=False,
                )  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])

    def int8() -> Callable[[Any], Any]:
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(vis), {torch.nn.Linear}, dtype=torch.qint8)
        return lambda x: q(x)[0]

    out = {
        "fp32 (baseline)": fp32,
        "bf16 weights (cocatk)": bf16_weights,
        "bf16 autocast": autocast,
        "channels_last fp32": channels_last,
        "jit.freeze fp32": freeze(torch.float32),
        "jit.freeze bf16": freeze(torch.bfloat16),
        "ONNX Runtime fp32": onnxruntime,
        "int8 dynamic": int8,
    }
    if not quick:
        out["torch.compile bf16"] = compiled
    return out


def text_candidates(m: Any) -> dict[str, Callable[[], Callable[[Any], Any]]]:
    import torch

    text = m.model.text

    def fp32() -> Callable[[Any], Any]:
        return lambda ids: text(ids)[0]

    def bf16_weights() -> Callable[[Any], Any]:
        t = copy.deepcopy(text).to(torch.bfloat16)
        return lambda ids: t(ids)[0].float()

    def autocast() -> Callable[[Any], Any]:
        def f(ids: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return text(ids)[0].float()

        return f

    def int8() -> Callable[[Any], Any]:
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(text), {torch.nn.Linear}, dtype=torch.qint8)
        return lambda ids: q(ids)[0]

    return {
        "fp32 (baseline)": fp32,
        "bf16 weights (cocatk)": bf16_weights,
        "bf16 autocast": autocast,
        "int8 dynamic": int8,
    }


def decoder_candidates(m: Any) -> dict[str, Callable[[], Callable[[Any, Any], Any]]]:
    import torch

    from cocatk.models import decoder_logits

    dec = m.model.text_decoder

    def fp32() -> Callable[[Any, Any], Any]:
        return lambda toks, inp: decoder_logits(dec, toks, inp).float().log_softmax(-1)

    def bf16_weights() -> Callable[[Any, Any], Any]:
        d = copy.deepcopy(dec).to(torch.bfloat16)
        return lambda toks, inp: decoder_logits(d, toks.bfloat16(), inp.bfloat16()).float().log_softmax(-1)

    def autocast() -> Callable[[Any, Any], Any]:
        def f(toks: Any, inp: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return decoder_logits(dec, toks, inp).float().log_softmax(-1)

        return f

    return {"fp32 (baseline)": fp32, "bf16 weights (cocatk)": bf16_weights, "bf16 autocast": autocast}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="coca_ViT-B-32")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16, help="images per call of the image tower")
    ap.add_argument("--quick", action="store_true", help="3 repetitions, no torch.compile")
    ap.add_argument("--only", choices=["image", "text", "decoder"], default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from cocatk import load_model
    from cocatk.models import cpu_bf16_support

    reps = 3 if args.quick else 5
    m = load_model(args.model, "none", device="cpu", precision="fp32")
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, m.image_size, m.image_size) * 2 - 1
    one = m.tokenize(["a red bicycle leaning on a wall"])
    many = m.tokenize([f"a photo of a thing number {i}" for i in range(64)])
    query = m._caption_ids("a red bicycle leaning on a wall")
    record: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "cpu_bf16": cpu_bf16_support(),
        "batch": args.batch,
        "reps": reps,
        "results": [],
    }
    print(f"{args.model} on {record['machine']['cpu']}, bf16 support: {record['cpu_bf16']}", flush=True)
    with torch.inference_mode():
        ref_img = m.model.visual(x)[0]
        ref_txt = m.model.text(many)[0]
        _, toks = m.model.visual(torch.rand(50, 3, m.image_size, m.image_size) * 2 - 1)
        _, temb = m.model.text(query)
        inp = temb[:, :-1]
        targets = query[:, 1:]
        ref_lp = None
        for threads in args.threads:
            torch.set_num_threads(threads)
            parts = []
            if args.only in (None, "image"):
                parts += [("image", k, b) for k, b in image_candidates(m, args.quick).items()]
            if args.only in (None, "text"):
                parts += [("text", k, b) for k, b in text_candidates(m).items()]
            if args.only in (None, "decoder"):
                parts += [("decoder", k, b) for k, b in decoder_candidates(m).items()]
            base: dict[str, float] = {}
            for part, name, build in parts:
                row: dict[str, Any] = {"part": part, "candidate": name, "threads": threads}
                load = os.getloadavg()[0]
                try:
                    t = time.perf_counter()
                    fn = build()
                    row["build_s"] = time.perf_counter() - t
                    if part == "image":
                        rate, out = _rate(lambda fn=fn: fn(x), args.batch, reps)
                        row.update(value=rate, unit="images/s", fidelity=_min_cos(out, ref_img), metric="min cos")
                        row["first_call_s"] = FIRST_CALL_S[0]
                    elif part == "text":
                        q_rate, _ = _rate(lambda fn=fn: fn(one), 1, reps * 4)
                        rate, out = _rate(lambda fn=fn: fn(many), len(many), reps)
                        row.update(value=rate, unit="texts/s", query_ms=1000 / q_rate)
                        row.update(fidelity=_min_cos(out, ref_txt), metric="min cos")
                    else:
                        rate, lp = _rate(lambda fn=fn: fn(toks, inp), 1, reps)
                        picked = lp.gather(-1, targets.expand(50, -1).unsqueeze(-1)).squeeze(-1).sum(-1)
                        if name.startswith("fp32"):
                            ref_lp = picked
                        per_token = float((picked - ref_lp).abs().max()) / targets.shape[1]
                        row.update(value=1000 / rate, unit="ms per query x 50 images", fidelity=per_token)
                        row["metric"] = "max |d loglik| / token"
                except Exception as e:  # a candidate that does not run here is a result too
                    row.update(value=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                row["load"] = load
                if row.get("value") is not None:
                    if name.startswith("fp32"):
                        base[part] = row["value"]
                    better = row["unit"].startswith("ms")
                    row["x_fp32"] = (base[part] / row["value"]) if better else (row["value"] / base[part])
                record["results"].append(row)
                shown = f"{row['value']:.1f} {row['unit']}" if row.get("value") is not None else row.get("error")
                extra = f", single query {row['query_ms']:.1f} ms" if "query_ms" in row else ""
                print(
                    f"  t={threads} {part:7s} {name:24s} {shown}{extra}"
                    + (f"  x{row['x_fp32']:.2f}  {row['metric']} {row['fidelity']:.5f}" if "x_fp32" in row else ""),
                    flush=True,
                )
    print_table(
        f"CPU paths, {args.model} random weights, {record['machine']['cpu']} ({record['cpu_bf16']}), medians of {reps}",
        ["part", "candidate", "threads", "value", "unit", "x fp32", "fidelity", "load"],
        [
            [
                r["part"],
                r["candidate"],
                r["threads"],
                r.get("value") if r.get("value") is not None else r.get("error", "")[:40],
                r.get("unit", ""),
                r.get("x_fp32", ""),
                r.get("fidelity", ""),
                r["load"],
            ]
            for r in record["results"]
        ],
    )
    write_record("cpu-paths", record, args.out)


if __name__ == "__main__":
    main()
