"""The block's GEMMs alone on one GPU, at the per-GPU token counts of the real runs: which form is fastest.

A 14B block has per token: q, k, v, o and the cross-attention q, o (dim x dim), and the FFN
(dim -> ffn_dim -> dim, GELU tanh between). This times each as the model runs it (``F.linear``
with bias, i.e. cuBLASLt with a bias epilogue) and the alternatives that could replace it:

* ``qkv_fused``: one GEMM against the three weights concatenated (N = 3 dim) instead of three;
  ``qkv_fused_cat`` also pays for concatenating the weights on every call (no new parameter);
* ``ffn1_gelu_epilogue``: the GELU folded into the GEMM (``torch._addmm_activation``, cuBLASLt's
  GELU epilogue, the tanh form) instead of a separate elementwise kernel;
* ``autotune``: ``torch.compile(mode="max-autotune-no-cudagraphs")`` of the same call, which lets
  Inductor pick among cuBLAS and its Triton GEMM templates.

    python3 bench/bench_gemm.py --model 14b --tokens 18900,75600 --out $OUT

Prints median ms and TFLOP/s per form and writes JSON lines (``gemm.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = {"14b": (5120, 13824), "1.3b": (1536, 8960)}  # dim, ffn_dim


def _time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on the GPU after ``warmup`` calls."""
    from bench_attention import time_call  # this folder's timing loop (CUDA events)

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(time_call(fn, iters)) * 1e3


def forms(tokens: int, dim: int, ffn_dim: int, device: torch.device, autotune: bool) -> dict:
    """name -> (callable, flops, reference callable or None): each form and what it must equal."""
    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, **bf) * scale)

    x = rand(tokens, dim)
    wq, wk, wv = (rand(dim, dim, scale=dim**-0.5) for _ in range(3))
    bq, bk, bv = (rand(dim, scale=0.1) for _ in range(3))
    w_qkv, b_qkv = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
    w1, b1 = rand(ffn_dim, dim, scale=dim**-0.5), rand(ffn_dim, scale=0.1)
    h = rand(tokens, ffn_dim)
    w2, b2 = rand(dim, ffn_dim, scale=ffn_dim**-0.5), rand(dim, scale=0.1)
    mm = lambda n, k: 2.0 * tokens * n * k  # noqa: E731

    def qkv_separate():
        return torch.cat([F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)], dim=-1)

    def ffn1_gelu():
        return F.gelu(F.linear(x, w1, b1), approximate="tanh")

    out = {
        "qkv_separate": (lambda: (F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)), 3 * mm(dim, dim), None),
        "qkv_fused": (lambda: F.linear(x, w_qkv, b_qkv), 3 * mm(dim, dim), qkv_separate),
        "qkv_fused_cat": (lambda: F.linear(x, torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])), 3 * mm(dim, dim), qkv_separate),
        "o": (lambda: F.linear(x, wq, bq), mm(dim, dim), None),
        "ffn1": (lambda: F.linear(x, w1, b1), mm(ffn_dim, dim), None),
        "ffn1_gelu": (ffn1_gelu, mm(ffn_dim, dim), None),
        "ffn1_gelu_epilogue": (lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True), mm(ffn_dim, dim), ffn1_gelu),
        "ffn2": (lambda: F.linear(h, w2, b2), mm(dim, ffn_dim), None),
    }
    if autotune:
        for name in ("o", "qkv_fused", "ffn1_gelu", "ffn2"):
            fn, flops, _ = out[name]
            ref = {"o": out["o"][0], "qkv_fused": qkv_separate, "ffn1_gelu": ffn1_gelu, "ffn2": out["ffn2"][0]}[name]
            out[f"{name}_autotune"] = (torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False), flops, ref)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="14b", choices=sorted(MODELS))
    p.add_argument("--tokens", default="18900,75600", help="comma list: tokens per GPU (14B 720p: 75600 / GPUs)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-autotune", action="store_true", help="skip the max-autotune forms (their compile takes minutes)")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemm needs a CUDA GPU", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out_file = Path(args.out) / "gemm.jsonl"
    device = torch.device("cuda")
    dim, ffn_dim = MODELS[args.model]
    for tokens in (int(t) for t in args.tokens.split(",")):
        for name, (fn, flops, ref) in forms(tokens, dim, ffn_dim, device, not args.no_autotune).items():
            ms = _time(fn, args.warmup, args.iters)
            row = dict(model=args.model, tokens=tokens, form=name, median_ms=round(ms, 4),
                       tflops=round(flops / ms / 1e9, 1), gpu=torch.cuda.get_device_name(), torch=torch.__version__)
            if ref is not None:  # same numbers as the form it would replace (bf16 rounding apart)
                with torch.no_grad():
                    got, want = fn().float(), ref().float()
                row["rel_err_vs_current"] = float((got - want).norm() / want.norm())
            print(json.dumps(row), flush=True)
            with open(out_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
