"""One GPU: the LSE attention kernels side by side at the Wan shapes (speed, accuracy, ring merge).

For each shape and kernel it reports the median time and TFLOP/s of one attention call, the
error of the output and of the log-sum-exp against a float32 reference on a sample of query
rows, and the error of a two-chunk merge (keys scaled differently per chunk, the inputs that
expose a wrong LSE) against the same reference. It also checks that the kernel runs inside
``torch.compile(fullgraph=True)``.

    python3 bench/bench_attention.py --kernels cudnn,flash,fa4,fa3,fa3_fp8,sage --out $OUT

``sage`` is SageAttention 1 (``sageattention``, Triton, int8 QK), measured as a lever only: it
returns no LSE, so it has no ring rows and is not a product kernel.

Shapes are per GPU: ``14b-u4`` is the 14B model at 1280x720x81 (75,600 tokens) with its 40
heads split over 4 Ulysses ranks (10 heads per GPU); ``14b-u1`` all 40 heads on one GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wan_model.parallel.kernels import get_lse_kernel, resolve_kernel_name  # noqa: E402
from wan_model.parallel.ring import merge_partial  # noqa: E402

# name -> (heads on this GPU, tokens, head_dim)
SHAPES = {
    "14b-u1": (40, 75600, 128),
    "14b-u2": (20, 75600, 128),
    "14b-u4": (10, 75600, 128),
    "1.3b-u1": (12, 32760, 128),
    "1.3b-u4": (3, 32760, 128),
    "14b-480p-u4": (10, 32760, 128),
}


def reference_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor):
    """float32 attention of the query rows ``rows`` over all keys: (out, lse)."""
    qs = q[:, :, rows].float()
    scores = torch.matmul(qs, k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out, lse


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_call(fn, iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def sage_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, None]:
    """SageAttention 1 in [B, H, L, D]. It subtracts the key mean in place, so it gets its own copy of k."""
    from sageattention.core import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False), None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="cudnn,flash,fa4")
    p.add_argument("--shapes", default="14b-u4,14b-u1,1.3b-u4,1.3b-u1")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--layouts", default="bhld",
                   help="memory layouts of q/k/v to time: bhld (head-major), blhd (token-major), "
                        "bl3hd (q/k/v interleaved per token, as they arrive from the Ulysses all-to-all)")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    args = p.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = out_dir / "attention.jsonl"
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} cudnn {torch.backends.cudnn.version()}")
    rows_table = []
    for shape_name in args.shapes.split(","):
        heads, tokens, head_dim = SHAPES[shape_name]
        q, k, v = (torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype, generator=gen) for _ in range(3))
        # Keys scaled along the sequence so that the two halves have different LSEs.
        scale = torch.linspace(0.5, 2.5, tokens, device=device, dtype=dtype).view(1, 1, tokens, 1)
        k_varying = k * scale
        sample = torch.randperm(tokens, device=device, generator=gen)[:256].sort().values
        ref_out, ref_lse = reference_rows(q, k_varying, v, sample)
        for layout in args.layouts.split(","):
            rows_table += run_layout(args, layout, shape_name, q, k_varying, v, sample, ref_out, ref_lse, records)
        del q, k, v, k_varying
        torch.cuda.empty_cache()
    print("\nshape         layout kernel  median_s  TFLOP/s  out_err   lse_err   ring2_err  compiled_err")
    for r in rows_table:
        head = f"{r['shape']:13s} {r['layout']:6s} {r['kernel']:7s}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:120]}")
            continue
        if "note" in r:
            print(f"{head} {r['median_s']:.4f}  {r['tflops']:7.1f}  {r['out_err']:.2e}  ({r['note']})")
            continue
        print(f"{head} {r['median_s']:.4f}  {r['tflops']:7.1f}  {r['out_err']:.2e}  "
              f"{r['lse_err']:.2e}  {r['ring2_out_err']:.2e}   {r['compiled_out_err']:.2e}")
    return 0


def in_layout(layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The same [B, H, L, D] values, stored as ``layout`` and returned as [B, H, L, D] views."""
    if layout == "bhld":
        return q, k, v
    if layout == "blhd":
        return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    if layout == "bl3hd":
        qkv = torch.stack([x.transpose(1, 2) for x in (q, k, v)], dim=2)  # [B, L, 3, H, D]
        return tuple(x.transpose(1, 2) for x in qkv.unbind(dim=2))
    raise ValueError(f"unknown layout {layout!r}")


def run_layout(args, layout, shape_name, q, k_varying, v, sample, ref_out, ref_lse, records) -> list[dict]:
    """Every kernel of ``args.kernels`` on q/k/v stored as ``layout``: one record each."""
    rows_table = []
    heads, tokens, head_dim = q.shape[1], q.shape[2], q.shape[3]
    flops = 4 * heads * tokens * tokens * head_dim
    half = tokens // 2
    device, dtype = q.device, q.dtype
    q, k_varying, v = in_layout(layout, q, k_varying, v)
    for kernel_name in args.kernels.split(","):
        record = {"shape": shape_name, "layout": layout, "kernel": kernel_name, "heads": heads, "tokens": tokens}
        try:
            if kernel_name == "sage":
                kernel, keys = sage_kernel, k_varying.clone()
            else:
                kernel, keys = get_lse_kernel(resolve_kernel_name(kernel_name, device, dtype)), k_varying
            t0 = time.perf_counter()
            kernel(q, keys, v)  # first call: JIT compile for the DSL/Triton kernels
            torch.cuda.synchronize()
            record["first_call_s"] = round(time.perf_counter() - t0, 3)
            times = time_call(lambda: kernel(q, keys, v), args.iters)
            med = statistics.median(times)
            record.update(median_s=med, tflops=flops / med / 1e12)
            out, lse = kernel(q, keys, v)
            record["out_err"] = rel(out[:, :, sample], ref_out)
            if lse is None:  # no LSE: no ring merge, not a product kernel
                raise LookupError("returns no LSE")
            record["lse_err"] = rel(lse[:, :, sample], ref_lse)
            o1, l1 = kernel(q, k_varying[:, :, :half], v[:, :, :half])
            o2, l2 = kernel(q, k_varying[:, :, half:], v[:, :, half:])
            merged, merged_lse = merge_partial(*merge_partial(None, None, o1, l1), o2, l2)
            record["ring2_out_err"] = rel(merged[:, :, sample], ref_out)
            record["ring2_lse_err"] = rel(merged_lse[:, :, sample], ref_lse)
            torch._dynamo.reset()  # a fresh compile per kernel (same lambda code object)
            compiled = torch.compile(lambda a, b, c: kernel(a, b, c)[0] * 1.0, fullgraph=True)
            record["compiled_out_err"] = rel(compiled(q, k_varying, v)[:, :, sample], ref_out)
        except LookupError as exc:
            record["note"] = str(exc)
        except Exception as exc:  # report and go on with the next kernel
            record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(json.dumps(record), flush=True)
        with records.open("a") as f:
            f.write(json.dumps(record) + "\n")
        rows_table.append(record)
    return rows_table


if __name__ == "__main__":
    sys.exit(main())
