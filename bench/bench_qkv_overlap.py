"""Can the Ulysses q/k/v all-to-all hide behind the q/k/v projection GEMMs?

Today a block computes q, k and v (three GEMMs, then the fused norm + RoPE kernel that writes
them into the all-to-all's layout) and only then sends all three in one all-to-all: 1.35 ms per
block at 14B 720p on 4 GPUs, 54 ms per forward, nothing overlapping it. The GEMMs are 4.1 ms.
If v's transfer ran during q's GEMM, and q's during k's, only k's transfer would stay exposed.

The arrangements timed here, each over ``--blocks`` blocks in a row at the 14B U4 sizes
(18,900 tokens x 5,120 per GPU; every rank lined up first):

- ``gemms``: the three GEMMs and layout writes alone (no transfer);
- ``serial``: as the model runs today: the three, then one all-to-all of all three (NCCL);
- ``nccl_pipelined``: v, q, k each sent by its own async NCCL all-to-all as soon as it is written;
- ``ce_pipelined``: the same sends as copy-engine pushes into the peers' symmetric-memory
  receive buffers (one stream per peer, no SMs), then one symmetric-memory barrier per block.

The received data is checked against the serial path's. A measurement for the lever list
(bench/RESULTS.md), not a product path.

    python3 bench/bench_qkv_overlap.py --gpus 4 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import probe_parser, enable_symmetric_memory, finish_ranks, join_group, spawn_ranks, time_blocks

DIM, HEAD_DIM, TOKENS = 5120, 128, 75600  # 14B 720p


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    import torch.distributed._symmetric_memory as symm_mem

    device = join_group(rank, world, port)
    group = dist.group.WORLD
    rows: list[dict] = []
    local = TOKENS // world
    part = DIM // world  # one rank's heads, flattened (heads / world * head_dim)

    g = torch.Generator(device=device).manual_seed(rank)
    x = torch.randn(local, DIM, generator=g, device=device, dtype=torch.bfloat16)
    weights = [torch.randn(DIM, DIM, generator=g, device=device, dtype=torch.bfloat16) * DIM**-0.5
               for _ in range(3)]  # q, k, v

    enable_symmetric_memory(group)
    # Receive buffer [3 (q, k, v), world (source rank), local, part] in symmetric memory: peers push into it.
    recv_symm = symm_mem.empty(3 * world * local * part, dtype=torch.bfloat16, device=device)
    handle = symm_mem.rendezvous(recv_symm, group)
    recv_symm = recv_symm.view(3, world, local, part)
    peer_recv = [handle.get_buffer(p, (3, world, local, part), torch.bfloat16) for p in range(world)]
    send = torch.empty(3, world, local, part, dtype=torch.bfloat16, device=device)  # [t, dest, tokens, part]
    recv_nccl = torch.empty_like(send)  # [t, source, tokens, part]
    recv_serial = torch.empty(world, 3, local, part, dtype=torch.bfloat16, device=device)  # [source, t, ...]
    peer_streams = [torch.cuda.Stream(device) for _ in range(world)]

    def project(t: int) -> None:
        """GEMM of tensor t, written in the all-to-all layout (the model's fused norm/RoPE kernel does this)."""
        y = x @ weights[t].T
        send[t].copy_(y.view(local, world, part).transpose(0, 1))

    def push(t: int) -> None:
        current = torch.cuda.current_stream()
        for step in range(1, world):
            dst = (rank + step) % world
            s = peer_streams[dst]
            s.wait_stream(current)
            with torch.cuda.stream(s):
                peer_recv[dst][t, rank].copy_(send[t, dst])
        recv_symm[t, rank].copy_(send[t, rank])

    def block(how: str) -> None:
        if how == "gemms":
            for t in (2, 0, 1):
                project(t)
        elif how == "serial":
            for t in (0, 1, 2):
                project(t)
            # [3, dest, tokens, part] -> dest-major, as yunchang's stacked all-to-all sends it
            dist.all_to_all_single(recv_serial, send.transpose(0, 1).contiguous())
        elif how == "nccl_pipelined":
            works = []
            for t in (2, 0, 1):
                project(t)
                works.append(dist.all_to_all_single(recv_nccl[t], send[t], async_op=True))
            for w in works:
                w.wait()
        elif how == "ce_pipelined":
            current = torch.cuda.current_stream()
            for t in (2, 0, 1):
                project(t)
                push(t)
            for s in peer_streams:
                current.wait_stream(s)
            handle.barrier(channel=0)  # every peer's pushes into this rank have landed
        else:
            raise ValueError(how)

    def emit(**row) -> None:
        if rank == 0:
            row = dict(gpus=world, tag=args.tag, tokens_per_gpu=local, **row)
            print(json.dumps(row), flush=True)
            rows.append(row)

    # Correctness: the serial path is the reference for what must arrive.
    block("serial")
    serial_recv = recv_serial.transpose(0, 1)
    for how in ("nccl_pipelined", "ce_pipelined"):
        recv_nccl.zero_()
        recv_symm.zero_()
        torch.cuda.synchronize()
        dist.barrier()
        block(how)
        torch.cuda.synchronize()
        got = recv_nccl if how == "nccl_pipelined" else recv_symm
        ok = torch.equal(got, serial_recv)
        dist.barrier()
        emit(kind="check", how=how, equal_to_serial=ok)
        if not ok:
            raise RuntimeError(f"{how} delivered other data than the serial all-to-all on rank {rank}")

    for how in ("gemms", "serial", "nccl_pipelined", "ce_pipelined", "gemms", "serial"):
        emit(kind="per_block", how=how,
             **time_blocks(lambda: block(how), args.blocks, args.warmup, args.iters))
    finish_ranks(rank, rows, out_file)


def main() -> int:
    p = probe_parser(__doc__)
    p.add_argument("--blocks", type=int, default=20, help="blocks in a row per timed iteration")
    args = p.parse_args()
    return spawn_ranks(rank_main, args.gpus, args, Path(args.out) / "qkv_overlap.jsonl", min_world=2)


if __name__ == "__main__":
    sys.exit(main())
