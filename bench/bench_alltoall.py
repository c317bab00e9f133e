"""The Ulysses all-to-alls alone, at the real per-GPU sizes, on N GPUs (NCCL): pure transfer time.

The forward profile's NCCL time includes waiting for the slowest rank. This times the same two
collectives with every rank lined up first (barrier + synchronize), so what remains is the
transfer: q/k/v stacked ``[L/N, 3, H, D]`` and the attention output ``[L, H/N, D]``, bf16.

    python3 bench/bench_alltoall.py --gpus 4 --out $OUT     # env such as TORCH_NCCL_HIGH_PRIORITY=1 applies

Prints median ms per call, the algorithm bandwidth (bytes a rank sends to others / time) and the
time of one forward's worth (x layers).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# name -> (tokens, heads, head_dim, layers)
SHAPES = {"14b-720p": (75600, 40, 128, 40), "1.3b-480p": (32760, 12, 128, 30)}


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    device = torch.device("cuda", rank)
    for shape in args.shapes.split(","):
        tokens, heads, head_dim, layers = SHAPES[shape]
        local = tokens // world
        tensors = {
            "qkv": torch.randn(world, local, 3, heads // world, head_dim, device=device, dtype=torch.bfloat16),
            "out": torch.randn(world, local, heads // world, head_dim, device=device, dtype=torch.bfloat16),
        }
        per_layer = 0.0
        for name, send in tensors.items():
            recv = torch.empty_like(send)
            times = []
            for i in range(args.warmup + args.iters):
                dist.barrier()
                torch.cuda.synchronize()
                start = time.perf_counter()
                dist.all_to_all_single(recv, send)
                torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
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
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--shapes", default="14b-720p,1.3b-480p")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(args.gpus, port, args, str(Path(args.out) / "alltoall.jsonl")), nprocs=args.gpus, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
