"""Run a function on N gloo ranks in spawned processes, with every wait bounded.

    results = run_ranks(fn, world_size, *args, timeout=120)

``fn(rank, world_size, *args)`` runs on each rank after ``torch.distributed`` is initialized
(gloo, through a TCP store that this process serves on 127.0.0.1); it must be importable by name (a module-level function) and
return something picklable. The per-rank return values come back as a list in rank order. If a
rank raises, ``run_ranks`` raises ``RankFailed`` with that rank's traceback; if the ranks do not
all finish within ``timeout`` seconds it raises ``TimeoutError``. The processes are always
cleaned up.
"""
from __future__ import annotations

import datetime
import queue as queue_module
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    pass


def _rank_main(fn, rank, world_size, port, timeout, results, args) -> None:
    import torch
    import torch.distributed as dist

    # Ranks share 2 cores in CI: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)
    try:
        limit = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=limit)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=limit)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results in rank order."""
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The store's server listens here, on a port the OS picks, before any rank starts: a port chosen
    # free and bound later by rank 0 could be taken in between (EADDRINUSE, seen in CI).
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=timeout))
    port = server.port
    procs = [
        ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, timeout, results, args), daemon=True)
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    try:
        for proc in procs:
            proc.start()
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            values[rank] = value
        return [values[rank] for rank in range(world_size)]
    finally:
        for proc in procs:
            proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())) if len(values) == world_size else 0.1)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        results.close()
        results.join_thread()
        del server  # stops listening
