"""GPU check of USP sequence parallelism (Ulysses x Ring) on NCCL.

    torchrun --nproc-per-node N bench/check_parallel_gpu.py        # or
    python bench/check_parallel_gpu.py --nproc N                    # spawns N ranks itself

For every (ulysses, ring) with ulysses * ring = N:

* attention level: ``UlyssesRingAttention`` with the cuDNN and flash kernels (bf16, fp16), the
  memory-efficient kernel (fp32, bf16) and the fp32 math kernel (short sequence only), on inputs
  whose chunks differ (keys sharpen and values shift along the sequence) and with garbage in the
  padded tail, against a float64 one-device reference on the same (dtype-rounded) inputs. The
  same kernel's error and time on one device (whole sequence) are reported next to it.
  Lengths: 32760 tokens (Wan 1.3B at 832x480, 81 frames) and 9999 (not a multiple of N).
* model level: a tiny ``WanModel`` (8 heads) on N ranks against the same model on one GPU.

Prints a table on rank 0 and writes JSON lines to ``$OUT/parallel_gpu.jsonl`` when ``$OUT`` is set.
Needs only torch, yunchang and this repo.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.parallel import ParallelConfig, init_distributed, setup_sequence_parallel  # noqa: E402
from wan_model.parallel.kernels import get_lse_kernel, plain_attention, resolve_kernel_name  # noqa: E402

HEADS, HEAD_DIM, BATCH = 24, 128, 1
LENGTHS = (32760, 9999)
KERNEL_DTYPES = [("cudnn", torch.bfloat16), ("cudnn", torch.float16), ("flash", torch.bfloat16),
                 ("flash", torch.float16), ("cudnn", torch.float32), ("efficient", torch.float32),
                 ("efficient", torch.bfloat16), ("math", torch.float32), ("fa4", torch.bfloat16),
                 ("fa4", torch.float16), ("fa3", torch.bfloat16), ("fa3_fp8", torch.bfloat16)]
MATH_MAX_LEN = 10000  # the fp32 math kernel materializes the score matrix


def use_smoke_settings() -> None:
    """--smoke: the same code path on CPU/gloo at toy sizes (to test this script without a GPU)."""
    global HEAD_DIM, LENGTHS, KERNEL_DTYPES
    HEAD_DIM, LENGTHS = 16, (96, 99)
    KERNEL_DTYPES = [("cpu", torch.float32), ("math", torch.float32), ("cudnn", torch.bfloat16),
                     ("efficient", torch.float32)]


def make_inputs(length: int, padded_len: int, device, dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(BATCH, padded_len, HEADS, HEAD_DIM, generator=gen, device=device) for _ in range(3))
    position = torch.linspace(0.0, 1.0, padded_len, device=device).view(1, -1, 1, 1)
    k = k * (0.25 + 3.0 * position)
    v = v + 4.0 * position
    k[:, length:] = 50.0
    v[:, length:] = 1e3
    return q.to(dtype), k.to(dtype), v.to(dtype)


def reference_attention(q, k, v, valid_len):
    """Float64 attention over the first valid_len keys, one head at a time, [B, L, H, D]."""
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for h in range(q.shape[2]):
        qh, kh, vh = q[:, :, h].double(), k[:, :valid_len, h].double(), v[:, :valid_len, h].double()
        scores = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
        out[:, :, h] = scores.softmax(-1) @ vh
        del scores
    return out


def errors(out, ref):
    diff = out.double() - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm()).item()


def all_ranks_ok(flag: bool, device) -> bool:
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def kernel_runs_here(kernel: str, dtype, device) -> str | None:
    """None if the kernel runs on this device/dtype (tried locally, no collectives); else why not."""
    try:
        name = resolve_kernel_name(kernel, device, dtype)
        x = torch.randn(1, 2, 64, HEAD_DIM, device=device, dtype=dtype)
        get_lse_kernel(name)(x, x, x)
        synchronize(device)
        return None
    except Exception as err:  # report, never fall back
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=5):
    """(result, median milliseconds); ranks are lined up with a barrier before each run."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return result, sorted(times)[len(times) // 2]


def kernel_selected(kernel: str) -> bool:
    wanted = os.environ.get("WANSERVE_CHECK_KERNELS")
    return not wanted or kernel in wanted.split(",")


def attention_checks(world, device, emit):
    layouts = [(u, world // u) for u in range(1, world + 1) if world % u == 0 and HEADS % u == 0]
    references = {}  # (length, dtype) -> (q, k, v, float64 reference, one-device results per kernel)
    for ulysses, ring in layouts:
        state = setup_sequence_parallel(ParallelConfig(ulysses=ulysses, ring=ring))
        sharding = state.sharding()
        for length in LENGTHS:
            padded = sharding.padded_len(length)
            for kernel, dtype in KERNEL_DTYPES:
                if not kernel_selected(kernel):
                    continue
                row = dict(check="attention", world=world, ulysses=ulysses, ring=ring, length=length,
                           kernel=kernel, dtype=str(dtype).removeprefix("torch."))
                if kernel == "math" and length > MATH_MAX_LEN:
                    continue
                why_not = kernel_runs_here(kernel, dtype, device)
                if not all_ranks_ok(why_not is None, device):
                    emit(dict(row, status="unsupported", reason=why_not or "unsupported on another rank"))
                    continue
                if (length, dtype) not in references:
                    q, k, v = make_inputs(length, padded, device, dtype)
                    references[(length, dtype)] = (q, k, v, reference_attention(q, k, v, length)[:, :length], {})
                q, k, v, ref, one_device = references[(length, dtype)]
                name = resolve_kernel_name(kernel, device, dtype)
                if name not in one_device:
                    # The same kernel on one device over the whole sequence: the yardstick for rounding
                    # error and for speed.
                    q1, k1, v1 = (x.transpose(1, 2) for x in (q, k[:, :length], v[:, :length]))
                    one, one_ms = timed(lambda: plain_attention(name, q1, k1, v1), device)
                    one_device[name] = (*errors(one.transpose(1, 2)[:, :length], ref), one_ms)
                    del one
                one_abs, one_rel, one_ms = one_device[name]

                attention = state.attention(kernel=kernel)
                local = [sharding.shard(x, 1) for x in (q, k, v)]
                out, ms = timed(lambda parts=local: attention(*parts, valid_len=length), device)
                full = sharding.gather(out, length, 1)
                max_abs, rel = errors(full, ref)
                flops = 4 * BATCH * HEADS * length * length * HEAD_DIM
                emit(dict(row, status="ok", kernel_ran=attention.kernel_name, max_abs=max_abs, rel=rel,
                          one_device_max_abs=one_abs, one_device_rel=one_rel, ms=ms, one_device_ms=one_ms,
                          speedup=one_ms / ms, tflops_per_gpu=flops / (ms * 1e-3) / world / 1e12))
                del local, out, full
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del state, sharding
    references.clear()


def model_checks(world, device, emit):
    from wan_model.config import get_variant
    from wan_model.model import WanModel

    config = replace(get_variant("tiny-t2v").transformer, dim=128, ffn_dim=256, num_heads=8)
    torch.manual_seed(0)
    model = WanModel(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.to(device)
    gen = torch.Generator(device=device).manual_seed(3)
    x = torch.randn(1, config.in_dim, 5, 10, 14, generator=gen, device=device)  # 175 tokens
    context = torch.randn(1, 7, config.text_dim, generator=gen, device=device)
    t = torch.tensor([700.0], device=device)
    layouts = [(u, world // u) for u in range(1, world + 1) if world % u == 0 and config.num_heads % u == 0]
    for dtype, kernels in ((torch.float32, ("auto", "math")), (torch.bfloat16, ("cudnn", "fa3", "fa3_fp8", "fa4", "flash"))):
        model.to(dtype)
        with torch.no_grad():
            from wan_model.attention import LocalAttention
            from wan_model.sequence import SequenceSharding

            model.set_parallel(SequenceSharding(), LocalAttention())
            reference = model(x, t, context)
            for ulysses, ring in layouts:
                state = setup_sequence_parallel(ParallelConfig(ulysses=ulysses, ring=ring))
                for kernel in kernels:
                    if kernel != "auto" and not kernel_selected(kernel):
                        continue
                    row = dict(check="model", world=world, ulysses=ulysses, ring=ring, length=175, kernel=kernel,
                               dtype=str(dtype).removeprefix("torch."))
                    why_not = None if kernel == "auto" else kernel_runs_here(kernel, dtype, device)
                    if not all_ranks_ok(why_not is None, device):
                        emit(dict(row, status="unsupported", reason=why_not or "unsupported on another rank"))
                        continue
                    attention = state.attention(kernel=kernel)
                    model.set_parallel(state.sharding(), attention)
                    out = model(x, t, context)
                    max_abs = (out - reference).abs().max().item()
                    rel = ((out - reference).norm() / reference.norm()).item()
                    # fp32 must match 1 GPU up to summation order; bf16 is reported (rounding differs by kernel).
                    passed = max_abs <= 1e-4 if dtype == torch.float32 else None
                    emit(dict(row, status="ok", kernel_ran=attention.kernel_name, max_abs=max_abs, rel=rel,
                              passed=passed))
                model.set_parallel(SequenceSharding(), LocalAttention())


def main_rank(rank: int, world: int, local_rank: int, addr: str, port: int, smoke: bool = False) -> None:
    if smoke:
        use_smoke_settings()
    device = init_distributed(rank, world, addr, port, backend="gloo" if smoke else "nccl", timeout_s=900,
                              local_rank=local_rank)
    rows = []
    out_dir = os.environ.get("OUT")

    def emit(row):
        rows.append(row)
        if rank == 0:
            print(format_row(row), flush=True)
            if out_dir:
                with open(Path(out_dir) / "parallel_gpu.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")

    if rank == 0:
        import yunchang

        emit(dict(check="env", world=world, torch=torch.__version__, cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version(), yunchang=yunchang.__version__,
                  gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    start = time.time()
    attention_checks(world, device, emit)
    model_checks(world, device, emit)
    if rank == 0:
        print(f"done in {time.time() - start:.0f} s", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def format_row(row) -> str:
    if row["check"] == "env":
        return " ".join(f"{k}={v}" for k, v in row.items())
    head = (f"{row['check']:9s} U{row['ulysses']}xR{row['ring']} L={row['length']:<6d} "
            f"{row['kernel']:>5s}/{row['dtype']:<8s}")
    if row["status"] != "ok":
        return f"{head} {row['status']}: {row['reason']}"
    text = f"{head} ran={row['kernel_ran']:<5s} max_abs={row['max_abs']:.3g} rel={row['rel']:.3g}"
    if row.get("one_device_rel") is not None:
        text += f" | 1-GPU same kernel max_abs={row['one_device_max_abs']:.3g} rel={row['one_device_rel']:.3g}"
    if row.get("passed") is not None:
        text += " PASS" if row["passed"] else " FAIL"
    if "ms" in row:
        text += (f" | {row['ms']:.2f} ms (1 GPU {row['one_device_ms']:.2f} ms, x{row['speedup']:.2f})"
                 f" {row['tflops_per_gpu']:.0f} TFLOP/s/GPU")
    return text


def _spawned(local_rank: int, world: int, port: int, smoke: bool) -> None:
    main_rank(local_rank, world, local_rank, "127.0.0.1", port, smoke)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=None, help="spawn this many ranks (when not under torchrun)")
    parser.add_argument("--smoke", action="store_true", help="CPU/gloo at toy sizes: tests this script, not the GPU")
    parser.add_argument("--kernels", default=None,
                        help="comma list: check only these attention kernels (default: all of KERNEL_DTYPES)")
    args = parser.parse_args()
    if args.kernels:
        os.environ["WANSERVE_CHECK_KERNELS"] = args.kernels  # read by every rank (spawned or torchrun)
    if "RANK" in os.environ:  # torchrun
        main_rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                  os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), args.smoke)
        return
    world = args.nproc or torch.cuda.device_count()
    if world < 1:
        raise SystemExit("no CUDA device: pass --nproc N (and --smoke to run on CPU)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(world, port, args.smoke), nprocs=world, join=True)


if __name__ == "__main__":
    main()
