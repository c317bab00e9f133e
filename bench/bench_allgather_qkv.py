"""Can q/k/v come from an all-gather of the block input instead of a Ulysses all-to-all?

Ulysses computes q, k and v for this rank's tokens and all heads, then trades them (three
all-to-alls, 2.25x the input's bytes on 4 GPUs). The same tensors come out of the Megatron form:
gather every rank's (modulated, normed) input, then project the whole sequence onto this rank's
heads only (weights split by rows). That moves more bytes (3x the input on 4 GPUs), but the
transfer can be fed to the GEMM shard by shard as it arrives (torch's copy-engine
``fused_all_gather_matmul``), where NCCL's all-to-all kernels have so far slowed the GEMMs they ran
beside. Wan's q/k RMSNorm spans all heads, so this form also needs each token's sum of squares
summed over the ranks (one small all-reduce of 2 x tokens floats per block), counted here.

Arrangements, each over ``--blocks`` blocks in a row at the 14B U4 sizes (18,900 tokens x 5,120
per GPU; every rank lined up first):

- ``gemms``: the three Ulysses GEMMs and layout writes alone (no transfer);
- ``ulysses``: as the model runs today: each tensor's NCCL all-to-all started after its GEMM;
- ``gathered_gemms``: the three head-split GEMMs over the whole sequence, input already gathered
  (no transfer): is the narrower GEMM as fast?
- ``ag_nccl``: NCCL all-gather of the input, then the head-split GEMMs and the norm all-reduce;
- ``ag_fused``: ``torch.ops.symm_mem.fused_all_gather_matmul`` (copy engines, shard by shard),
  then the norm all-reduce.

What arrives is checked against the Ulysses path. A measurement for the lever list
(bench/RESULTS.md), not a product path.

    python3 bench/bench_allgather_qkv.py --gpus 4 --out $OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import probe_parser, enable_symmetric_memory, finish_ranks, join_group, spawn_ranks, time_blocks

DIM, TOKENS = 5120, 75600  # 14B 720p


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_file: str) -> None:
    import json

    device = join_group(rank, world, port)
    group = dist.group.WORLD
    enable_symmetric_memory(group)
    rows: list[dict] = []
    local = TOKENS // world
    part = DIM // world  # this rank's heads, flattened

    g = torch.Generator(device=device).manual_seed(1234)  # same weights on every rank
    weights = [torch.randn(DIM, DIM, generator=g, device=device, dtype=torch.bfloat16) * DIM**-0.5
               for _ in range(3)]  # q, k, v
    mine = [w[rank * part:(rank + 1) * part].contiguous() for w in weights]  # this rank's heads' rows
    mine_t = [w.t() for w in mine]  # B of A @ B
    x = torch.randn(local, DIM, generator=torch.Generator(device=device).manual_seed(rank), device=device,
                    dtype=torch.bfloat16)

    send = torch.empty(3, world, local, part, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)  # [t, source, tokens, part]
    gathered = torch.empty(world * local, DIM, dtype=torch.bfloat16, device=device)
    full_out = [torch.empty(world * local, part, dtype=torch.bfloat16, device=device) for _ in range(3)]
    sums = torch.empty(2, world * local, dtype=torch.float32, device=device)
    out: list[torch.Tensor] = full_out

    def norm_sums(q: torch.Tensor, k: torch.Tensor) -> None:
        """Each token's sum of squares over this rank's channels of q and k, summed over the ranks."""
        torch.sum(q.float().square(), dim=-1, out=sums[0])
        torch.sum(k.float().square(), dim=-1, out=sums[1])
        dist.all_reduce(sums)

    def block(how: str) -> None:
        nonlocal out
        if how in ("gemms", "ulysses"):
            works = []
            for t in (0, 1, 2):
                y = x @ weights[t].T
                send[t].copy_(y.view(local, world, part).transpose(0, 1))
                if how == "ulysses":
                    works.append(dist.all_to_all_single(recv[t], send[t], async_op=True))
            for w in works:
                w.wait()
        elif how == "gathered_gemms":
            for t in range(3):
                torch.mm(gathered, mine_t[t], out=full_out[t])
        elif how == "ag_nccl":
            dist.all_gather_into_tensor(gathered, x)
            for t in range(3):
                torch.mm(gathered, mine_t[t], out=full_out[t])
            out = full_out
            norm_sums(out[0], out[1])
        elif how == "ag_fused":
            _, out = torch.ops.symm_mem.fused_all_gather_matmul(x, mine_t, 0, group.group_name, return_A=False)
            norm_sums(out[0], out[1])
        else:
            raise ValueError(how)

    def emit(**row) -> None:
        if rank == 0:
            row = dict(gpus=world, tag=args.tag, tokens_per_gpu=local, **row)
            print(json.dumps(row), flush=True)
            rows.append(row)

    # Correctness: the Ulysses path delivers, per tensor, the whole sequence of this rank's heads.
    block("ulysses")
    torch.cuda.synchronize()
    reference = [recv[t].reshape(world * local, part).float() for t in range(3)]
    expected_sums = None
    for how in ("ag_nccl", "ag_fused"):
        dist.barrier()
        block(how)
        torch.cuda.synchronize()
        errs = [((out[t].float() - reference[t]).norm() / reference[t].norm()).item() for t in range(3)]
        if expected_sums is None:  # every channel of q and k, from the gathered input (ag_nccl runs first)
            expected_sums = torch.stack([(gathered @ weights[t].T).float().square().sum(-1) for t in (0, 1)])
        sums_err = ((sums - expected_sums).norm() / expected_sums.norm()).item()
        emit(kind="check", how=how, rel_err_qkv=[round(e, 7) for e in errs], rel_err_norm_sums=round(sums_err, 7))
        if max(errs) > 1e-2 or sums_err > 1e-2:
            raise RuntimeError(f"{how} gave other q/k/v than Ulysses on rank {rank}: {errs}, sums {sums_err}")

    order = ("gemms", "ulysses", "gathered_gemms", "ag_nccl", "ag_fused", "ulysses", "ag_fused")
    for how in order:
        emit(kind="per_block", how=how,
             **time_blocks(lambda: block(how), args.blocks, args.warmup, args.iters))
    finish_ranks(rank, rows, out_file)


def main() -> int:
    p = probe_parser(__doc__)
    p.add_argument("--blocks", type=int, default=20, help="blocks in a row per timed iteration")
    args = p.parse_args()
    return spawn_ranks(rank_main, args.gpus, args, Path(args.out) / "allgather_qkv.jsonl", min_world=2)


if __name__ == "__main__":
    sys.exit(main())
