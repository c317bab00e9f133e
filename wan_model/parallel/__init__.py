"""Sequence parallelism (USP: Ulysses x Ring, on yunchang's process groups) and CFG-parallel groups.

Typical use on every rank::

    device = init_distributed(rank, world_size, addr, port)
    state = setup_sequence_parallel(pick_parallel_degrees(world_size, config.num_heads))
    model.set_parallel(state.sharding(), state.attention(kernel="auto"))
"""
from .degrees import ParallelConfig, pick_parallel_degrees, valid_ulysses_degrees
from .groups import ParallelState, init_distributed, setup_sequence_parallel
from .kernels import KERNEL_NAMES
from .sharding import SequenceParallelSharding
from .ulysses_ring import UlyssesRingAttention

__all__ = [
    "KERNEL_NAMES",
    "ParallelConfig",
    "ParallelState",
    "SequenceParallelSharding",
    "UlyssesRingAttention",
    "init_distributed",
    "pick_parallel_degrees",
    "setup_sequence_parallel",
    "valid_ulysses_degrees",
]
