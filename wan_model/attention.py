"""The attention seam: the one swappable piece between the transformer and parallelism.

Self-attention in every block calls ``backend(q, k, v, valid_len=...)`` and nothing else,
so single-device SDPA, Ulysses/Ring sequence parallelism or a faster kernel are swapped
by handing the model another backend (as diffusers' attention processors do).

Layout: ``q, k, v`` are ``[batch, tokens, heads, head_dim]`` holding *this rank's* tokens.
``valid_len`` is the number of real tokens in the whole (global, unpadded) sequence: keys at
global positions ``>= valid_len`` are padding and must not be attended to.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, valid_len: int | None = None
    ) -> torch.Tensor: ...


class LocalAttention:
    """Plain scaled-dot-product attention over the whole sequence held by this process."""

    name = "sdpa"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, valid_len: int | None = None
    ) -> torch.Tensor:
        if valid_len is not None and valid_len < k.shape[1]:
            # Padding sits at the end: dropping it is exact and keeps the fast kernels usable.
            k, v = k[:, :valid_len], v[:, :valid_len]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    def __repr__(self) -> str:
        return "LocalAttention()"
