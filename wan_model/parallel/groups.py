"""Process-group setup: the default group, then the SP (Ulysses x Ring) and CFG groups.

Rank layout (world = cfg * ulysses * ring), as yunchang's ``set_seq_parallel_pg`` builds it
with ``use_ulysses_low=True``:

* CFG half ``h`` holds the consecutive ranks ``[h * sp_world, (h + 1) * sp_world)``;
  its sequence-parallel rank is ``sp_rank = rank - h * sp_world``.
* Within a half, a Ulysses group is ``ulysses`` consecutive SP ranks and a Ring group takes
  every ``ulysses``-th SP rank: ``ulysses_rank = sp_rank % ulysses``,
  ``ring_rank = sp_rank // ulysses``.
* A CFG group holds the ranks with the same ``sp_rank`` in the two halves (same sequence chunk).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .degrees import ParallelConfig


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str = "127.0.0.1",
    master_port: int = 29500,
    backend: str | None = None,
    timeout_s: float = 600.0,
    local_rank: int | None = None,
) -> torch.device:
    """Join the default process group and return this rank's device.

    NCCL on CUDA (device = ``local_rank``, else ``$LOCAL_RANK``, else ``rank % device_count``),
    gloo on CPU. ``timeout_s`` bounds every collective,
    so a rank that never arrives turns into an error instead of a hang.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA, but torch.cuda.is_available() is False")
        if local_rank is None:
            # torchrun and our own launchers set LOCAL_RANK; otherwise ranks fill the visible GPUs in order.
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    elif backend == "gloo":
        device = torch.device("cpu")
    else:
        raise ValueError(f"unknown backend {backend!r}; use 'nccl' (CUDA) or 'gloo' (CPU)")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return device


@dataclass
class ParallelState:
    """This rank's place in every group the model and the pipeline use."""

    config: ParallelConfig
    rank: int
    world_size: int
    # Sequence parallelism: the ulysses * ring ranks that split one sequence.
    sp_group: dist.ProcessGroup
    sp_rank: int
    sp_world: int
    sp_ranks: list[int]
    ulysses_group: dist.ProcessGroup
    ulysses_rank: int
    ring_group: dist.ProcessGroup
    ring_rank: int
    # CFG-parallel: ranks holding the same sequence chunk in each CFG half (None when cfg_parallel == 1).
    cfg_group: dist.ProcessGroup | None
    cfg_rank: int
    cfg_world: int
    cfg_ranks: list[int]

    @property
    def ulysses(self) -> int:
        return self.config.ulysses

    @property
    def ring(self) -> int:
        return self.config.ring

    def sharding(self):
        """The ``SequenceSharding`` over this rank's SP group."""
        from .sharding import SequenceParallelSharding

        return SequenceParallelSharding(self)

    def attention(self, kernel: str = "auto", head_chunks: int = 1):
        """The ``AttentionBackend`` over this rank's Ulysses and Ring groups."""
        from .ulysses_ring import UlyssesRingAttention

        return UlyssesRingAttention(self, kernel=kernel, head_chunks=head_chunks)


def setup_sequence_parallel(config: ParallelConfig) -> ParallelState:
    """Create the Ulysses, Ring, SP and CFG groups (collective: every rank must call it)."""
    from yunchang.globals import PROCESS_GROUP, set_seq_parallel_pg

    if not dist.is_initialized():
        raise RuntimeError("call init_distributed(...) before setup_sequence_parallel(...)")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if config.world_size != world_size:
        raise ValueError(
            f"{config} needs cfg_parallel * ulysses * ring = {config.world_size} ranks, "
            f"but the process group has {world_size}"
        )
    sp_world = config.sp_world
    # yunchang builds Ulysses/Ring groups inside each block of sp_world consecutive ranks.
    set_seq_parallel_pg(config.ulysses, config.ring, rank, world_size, use_ulysses_low=True)
    ulysses_group, ring_group = PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG

    # new_group is collective over the default group: every rank creates every group, in order.
    sp_group = None
    for half in range(config.cfg_parallel):
        ranks = list(range(half * sp_world, (half + 1) * sp_world))
        group = dist.new_group(ranks)
        if rank in ranks:
            sp_group, sp_ranks = group, ranks
    cfg_group, cfg_ranks = None, [rank]
    if config.cfg_parallel > 1:
        for sp_index in range(sp_world):
            ranks = [half * sp_world + sp_index for half in range(config.cfg_parallel)]
            group = dist.new_group(ranks)
            if rank in ranks:
                cfg_group, cfg_ranks = group, ranks

    sp_rank = rank % sp_world
    state = ParallelState(
        config=config,
        rank=rank,
        world_size=world_size,
        sp_group=sp_group,
        sp_rank=sp_rank,
        sp_world=sp_world,
        sp_ranks=sp_ranks,
        ulysses_group=ulysses_group,
        ulysses_rank=sp_rank % config.ulysses,
        ring_group=ring_group,
        ring_rank=sp_rank // config.ulysses,
        cfg_group=cfg_group,
        cfg_rank=rank // sp_world,
        cfg_world=config.cfg_parallel,
        cfg_ranks=cfg_ranks,
    )
    _check_layout(state)
    return state


def _check_layout(state: ParallelState) -> None:
    """The ranks yunchang put in our Ulysses/Ring groups must be the ones the layout above assumes."""
    base = state.cfg_rank * state.sp_world
    expected_ulysses = [base + state.ring_rank * state.ulysses + u for u in range(state.ulysses)]
    expected_ring = [base + r * state.ulysses + state.ulysses_rank for r in range(state.ring)]
    got_ulysses = dist.get_process_group_ranks(state.ulysses_group)
    got_ring = dist.get_process_group_ranks(state.ring_group)
    if got_ulysses != expected_ulysses or got_ring != expected_ring:
        raise RuntimeError(
            f"unexpected yunchang group layout on rank {state.rank}: ulysses {got_ulysses} "
            f"(expected {expected_ulysses}), ring {got_ring} (expected {expected_ring})"
        )
