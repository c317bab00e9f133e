"""The Ulysses all-to-alls alone, at the real per-GPU sizes, on N GPUs (NCCL): pure transfer time.

The forward profile's NCCL time includes waiting for the slowest rank. This times the same two
collectives with every rank lined up first (barrier + synchronize), so what remains is the
transfer: q/k/v stacked ``[L/N, 3, H, D]`` and the attention output ``[L, H/N, D]``, bf16.

    python3 bench/bench_alltoall.py --gpus 4 --out $OUT     # env such as TORCH_NCCL_HIGH_PRIORITY=1 applies
    python3 bench/bench_alltoall.py --smoke --gpus 2         # CPU/gloo at toy sizes (tests this script)

Prints median ms per call, the algorithm bandwidth (bytes a rank sends to others / time) and the
time of one forward's worth (x layers).
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
import torch.distributed as dist

from ranks import spawn_ranks

# name -> (tokens, heads, head_dim, layers)
SHAPES = {"14b-720p": (75600, 40, 128, 40), "1.3b-480p": (32760, 12, 128, 30), "smoke": (96, 4, 8, 2)}


def _rank_values(src: int, shape: tuple, dst: int, world: int) -> torch.Tensor:
    """What rank ``src`` sends to rank ``dst``: a constant that names both (exact in bf16)."""
    return torch.full((1, *shape), float(src * world + dst))


def _send_buffer(shape: tuple, rank: int, world: int, device: torch.device) -> torch.Tensor:
    """``[world, *shape]`` bf16; slice ``j`` goes to rank ``j``."""
    return torch.cat([_rank_values(rank, shape, dst, world) for dst in range(world)]).to(device, torch.bfloat16)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    if args.smoke:
        device, backend, synchronize = torch.device("cpu"), "gloo", lambda: None
    else:
        torch.cuda.set_device(rank)
        device, backend, synchronize = torch.device("cuda", rank), "nccl", torch.cuda.synchronize
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for shape in args.shapes.split(","):
        tokens, heads, head_dim, layers = SHAPES[shape]
        local = tokens // world
        tensors = {
            "qkv": _send_buffer((local, 3, heads // world, head_dim), rank, world, device),
            "out": _send_buffer((local, heads // world, head_dim), rank, world, device),
        }
        per_layer = 0.0
        for name, send in tensors.items():
            recv = torch.empty_like(send)
            times = []
            for i in range(args.warmup + args.iters):
                dist.barrier()
                synchronize()
                start = time.perf_counter()
                dist.all_to_all_single(recv, send)
                synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            expected = torch.cat([_rank_values(src, send.shape[1:], rank, world) for src in range(world)])
            if not torch.equal(recv.float(), expected):  # the transfer moved the right slices
                raise RuntimeError(f"all_to_all_single of {name} delivered the wrong data on rank {rank}")
            med = statistics.median(times)
            sent = send.numel() * send.element_size() * (world - 1) / world
            per_layer += med
            if rank == 0:
                row = dict(shape=shape, tensor=name, gpus=world, mbytes=round(send.numel() * 2 / 2**20, 1),
                           median_ms=round(med * 1e3, 3), algbw_gbs=round(sent / med / 1e9, 1),
                           high_priority=os.environ.get("TORCH_NCCL_HIGH_PRIORITY", ""), tag=args.tag)
                print(json.dumps(row), flush=True)
                with open(out_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
        if rank == 0:
            row = dict(shape=shape, gpus=world, forward_ms=round(per_layer * layers * 1e3, 1), layers=layers, tag=args.tag)
            print(json.dumps(row), flush=True)
            with open(out_file, "a") as f:
                f.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 1))
    p.add_argument("--shapes", default="14b-720p,1.3b-480p")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--smoke", action="store_true", help="CPU/gloo at toy sizes, to test this script without GPUs")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    args = p.parse_args()
    if args.smoke:
        args.shapes, args.warmup, args.iters = "smoke", 1, 2
    return spawn_ranks(rank_main, args.gpus, args, Path(args.out) / "alltoall.jsonl")


if __name__ == "__main__":
    sys.exit(main())
