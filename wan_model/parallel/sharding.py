"""Sequence sharding over the sequence-parallel group: contiguous chunks, one all-gather back."""
from __future__ import annotations

import torch
import torch.distributed as dist

from wan_model.sequence import SequenceSharding


class SequenceParallelSharding(SequenceSharding):
    """SP rank ``i`` of ``n`` holds chunk ``i`` of the sequence padded to a multiple of ``n``.

    Padding sits at the end of the sequence; ``UlyssesRingAttention`` keeps padded keys out
    of attention given ``valid_len``.
    """

    def __init__(self, state) -> None:
        self.group = state.sp_group
        self.world_size = state.sp_world
        self.rank = state.sp_rank

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """All-gather every rank's chunk along ``dim`` (one collective) and drop the padding."""
        if self.world_size == 1:
            return x.narrow(dim, 0, length)
        dim = dim % x.dim()
        # all_gather_into_tensor stacks along dim 0: put the sequence dim first, then back.
        chunk = x.movedim(dim, 0).contiguous()
        full = chunk.new_empty((chunk.shape[0] * self.world_size, *chunk.shape[1:]))
        _all_gather_single(full, chunk, group=self.group)
        return full.narrow(0, 0, length).movedim(0, dim)

    def __repr__(self) -> str:
        return f"SequenceParallelSharding(rank={self.rank}, world_size={self.world_size})"


# torch >= 2.13 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
