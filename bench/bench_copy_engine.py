"""Could the Ulysses all-to-all run on the GPUs' copy engines, beside attention, instead of on SMs?

NCCL's all-to-all runs as kernels: when it overlaps FlashAttention-3, both slow down (third
session, ``head_chunks``). A copy engine moves memory without SMs. Here every rank keeps its send
buffer in PyTorch symmetric memory (mapped into its peers' address space; NVLink multicast stays
off) and *pulls* its slice from each peer with ``copy_`` (a ``cudaMemcpyAsync``), one stream per
peer. This measures, at the 14B 720p sizes on 4 GPUs:

1. ``alone``: the q/k/v and output all-to-alls by copy engine, against NCCL's ``all_to_all_single``
   (every rank lined up first), and that the right bytes arrive;
2. ``beside FA3``: FA3 at the 14B U4 shape on one stream while a loop of copy-engine all-to-alls
   runs on others: FA3's time against FA3 alone, and how much of the transfer it hid. Also with
   ``sm_margin`` 2 and with a symmetric-memory barrier (a one-block kernel) after every transfer,
   as a real pipeline needs; and NCCL in the same place, for comparison.

    python3 bench/bench_copy_engine.py --gpus 4 --out $OUT

A measurement for the lever list (bench/RESULTS.md), not a product path.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import probe_parser, enable_symmetric_memory, finish_ranks, join_group, spawn_ranks

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKENS, HEADS, HEAD_DIM = 75600, 40, 128  # 14B 720p


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    device = join_group(rank, world, port)
    group = dist.group.WORLD
    rows: list[dict] = []

    def emit(**row) -> None:
        if rank == 0:
            row = dict(gpus=world, tag=args.tag, **row)
            print(json.dumps(row), flush=True)
            rows.append(row)

    local, heads = TOKENS // world, HEADS // world
    sizes = {"qkv": local * 3 * heads * HEAD_DIM, "out": local * heads * HEAD_DIM}  # elements per peer slice
    biggest = max(sizes.values())
    # Send buffer: slice j (one per destination rank) at offset j * biggest; a constant naming (src, dst).
    enable_symmetric_memory(group)
    send = symm_mem.empty(world * biggest, dtype=torch.bfloat16, device=device)
    handle = symm_mem.rendezvous(send, group)
    for dst in range(world):
        send[dst * biggest:(dst + 1) * biggest].fill_(float(rank * world + dst))
    recv = torch.empty(world, biggest, dtype=torch.bfloat16, device=device)
    streams = [torch.cuda.Stream(device) for _ in range(world)]
    dist.barrier()
    torch.cuda.synchronize()

    def pull(n: int, with_barrier: bool = False) -> None:
        """Copy my slice of every peer's send buffer into ``recv`` (one stream per peer), then join."""
        current = torch.cuda.current_stream()
        for step in range(1, world):
            src = (rank + step) % world
            s = streams[src]
            s.wait_stream(current)
            with torch.cuda.stream(s):
                recv[src, :n].copy_(handle.get_buffer(src, (n,), torch.bfloat16, rank * biggest))
            current.wait_stream(s)
        recv[rank, :n].copy_(send[rank * biggest:rank * biggest + n])
        if with_barrier:
            handle.barrier(channel=0)

    # 1. alone ------------------------------------------------------------------------------------
    for name, n in sizes.items():
        per_peer_bytes = n * 2
        nccl_send = torch.empty(world * n, dtype=torch.bfloat16, device=device)
        nccl_recv = torch.empty_like(nccl_send)
        for how in ("copy_engine", "nccl"):
            times = []
            for i in range(args.warmup + args.iters):
                dist.barrier()
                torch.cuda.synchronize()
                start = time.perf_counter()
                if how == "copy_engine":
                    pull(n)
                else:
                    dist.all_to_all_single(nccl_recv, nccl_send)
                torch.cuda.synchronize()
                if i >= args.warmup:
                    times.append(time.perf_counter() - start)
            med = statistics.median(times)
            emit(kind="alone", tensor=name, how=how, mbytes=round(world * per_peer_bytes / 2**20, 1),
                 median_ms=round(med * 1e3, 3), algbw_gbs=round((world - 1) * per_peer_bytes / med / 1e9, 1))
        expected = torch.tensor([float(src * world + rank) for src in range(world)], device=device)
        if not torch.equal(recv[:, :n].float().amax(dim=1), expected) or not torch.equal(recv[:, :n].float().amin(dim=1), expected):
            raise RuntimeError(f"copy-engine all-to-all of {name} delivered the wrong data on rank {rank}")
    dist.barrier()

    # 2. beside FA3 -------------------------------------------------------------------------------
    from wan_model.parallel import fa3

    g = torch.Generator(device=device).manual_seed(rank)
    q, k, v = (torch.randn(1, heads, TOKENS, HEAD_DIM, generator=g, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    attn_stream = torch.cuda.Stream(device)
    comm_stream = torch.cuda.Stream(device)
    nccl_send = torch.empty(world * sizes["qkv"], dtype=torch.bfloat16, device=device)
    nccl_recv = torch.empty_like(nccl_send)

    def fa3_once(margin: int) -> None:
        fa3.sm_margin = margin
        fa3.fa3_attention(q, k, v)

    def transfers(how: str, count: int) -> None:
        for _ in range(count):
            if how == "nccl":
                dist.all_to_all_single(nccl_recv, nccl_send)
            else:
                pull(sizes["qkv"], with_barrier=(how == "copy_engine+barrier"))

    # The same transfer loops with no attention beside them (margin -1 = FA3 not run).
    for margin in (-1, 0, 2):
        for how in ("none", "copy_engine", "copy_engine+barrier", "nccl"):
            if (how == "nccl" and margin > 0) or (how == "none" and margin < 0):
                continue
            attn_ms, comm_ms, wall_ms = [], [], []
            for i in range(args.warmup + args.iters):
                dist.barrier()
                torch.cuda.synchronize()
                a0, a1 = _events()
                c0, c1 = _events()
                start = time.perf_counter()
                with torch.cuda.stream(attn_stream):
                    a0.record()
                    if margin >= 0:
                        fa3_once(margin)
                    a1.record()
                if how != "none":
                    with torch.cuda.stream(comm_stream):
                        c0.record()
                        transfers(how, args.transfers)
                        c1.record()
                torch.cuda.synchronize()
                if i >= args.warmup:
                    wall_ms.append((time.perf_counter() - start) * 1e3)
                    attn_ms.append(a0.elapsed_time(a1))
                    if how != "none":
                        comm_ms.append(c0.elapsed_time(c1))
            emit(kind="beside_fa3" if margin >= 0 else "loop_alone", how=how, sm_margin=max(margin, 0), transfers=args.transfers if how != "none" else 0,
                 fa3_ms=round(statistics.median(attn_ms), 2) if margin >= 0 else None,
                 transfers_ms=round(statistics.median(comm_ms), 2) if comm_ms else None,
                 wall_ms=round(statistics.median(wall_ms), 2))
    fa3.sm_margin = 0
    finish_ranks(rank, rows, out_file)


def main() -> int:
    p = probe_parser(__doc__)
    p.add_argument("--transfers", type=int, default=20, help="q/k/v all-to-alls run beside one FA3 call")
    args = p.parse_args()
    return spawn_ranks(rank_main, args.gpus, args, Path(args.out) / "copy_engine.jsonl", min_world=2)


if __name__ == "__main__":
    sys.exit(main())
