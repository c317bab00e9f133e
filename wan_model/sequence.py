"""How the token sequence is split across the ranks of a sequence-parallel group.

The model asks its ``SequenceSharding`` three things: which slice of the (padded) token
sequence this rank holds, to cut that slice out, and to put the full sequence back together
once at the end. ``SequenceSharding`` itself is the one-rank case; the parallel subclass lives
in ``wan_model.parallel``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class SequenceSharding:
    """One rank holds every token (no sequence parallelism)."""

    world_size: int = 1
    rank: int = 0

    def padded_len(self, length: int) -> int:
        """The sequence length rounded up to a multiple of the world size."""
        return -(-length // self.world_size) * self.world_size

    def local_range(self, length: int) -> tuple[int, int]:
        """[start, end) of this rank's tokens, as positions in the padded sequence."""
        chunk = self.padded_len(length) // self.world_size
        return self.rank * chunk, (self.rank + 1) * chunk

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Pad ``x`` along ``dim`` to the padded length (zeros) and return this rank's chunk."""
        length = x.shape[dim]
        pad = self.padded_len(length) - length
        if pad:
            spec = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
            x = F.pad(x, spec)
        start, end = self.local_range(length)
        return x.narrow(dim, start, end - start)

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """Reassemble every rank's chunk along ``dim`` and drop the padding (one collective)."""
        return x.narrow(dim, 0, length)
