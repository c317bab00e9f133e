"""What the multi-GPU probes in bench/ share: spawning one process per rank, joining the group, and
symmetric memory."""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def probe_parser(description: str) -> argparse.ArgumentParser:
    """The flags every multi-GPU probe takes: --gpus, --warmup, --iters, --tag, --out (default $OUT)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tag", default="")
    p.add_argument("--out", default=os.environ.get("OUT", ".out/bench"))
    return p


def spawn_ranks(rank_main: Callable, world: int, args, out_file: Path, min_world: int = 1) -> int:
    """``rank_main(rank, world, port, args, out_file)`` in ``world`` processes, rendezvous on a free local
    port, with ``out_file``'s folder created. Returns the script's exit code: 0, or 2 (with a message)
    when ``world`` is below ``min_world``."""
    if world < min_world:
        print(f"{Path(sys.argv[0]).stem} needs at least {min_world} ranks (GPUs)", file=sys.stderr)
        return 2
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(world, port, args, str(out_file)), nprocs=world, join=True)
    return 0


def join_group(rank: int, world: int, port: int, cpu: bool = False) -> torch.device:
    """Join the process group ``spawn_ranks`` set up; returns this rank's device: ``cuda:rank`` under NCCL
    (bound to the group from the start), or the CPU under gloo for ``--smoke`` runs."""
    if cpu:
        device, backend = torch.device("cpu"), "gloo"
    else:
        torch.cuda.set_device(rank)
        device, backend = torch.device("cuda", rank), "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device


def enable_symmetric_memory(group: dist.ProcessGroup) -> None:
    """Older torch (2.11 on the GPU image) wants symmetric memory enabled per group; newer warns that
    it is not needed, so both the call and its warning are optional."""
    import warnings

    import torch.distributed._symmetric_memory as symm_mem

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            symm_mem.enable_symm_mem_for_group(group.group_name)
    except Exception:  # noqa: BLE001
        pass


def finish_ranks(rank: int, rows: list[dict], out_file: str) -> None:
    """Rank 0 appends its JSON rows to ``out_file``; then every rank leaves the process group together."""
    import json

    if rank == 0:
        with open(out_file, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def time_blocks(step: Callable[[], None], blocks: int, warmup: int, iters: int) -> dict:
    """Median and spread (ms) of one ``step``, timed ``blocks`` in a row after every rank has lined up
    (barrier + synchronize), ``warmup`` timings dropped, ``iters`` kept."""
    times = []
    for i in range(warmup + iters):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(blocks):
            step()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) / blocks)
    return {"median_ms": round(statistics.median(times) * 1e3, 3),
            "spread_ms": round((max(times) - min(times)) * 1e3, 3)}
