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
    """Plain scaled-dot-product attention over the whole sequence held by this process.

    ``kernel`` "sdpa": PyTorch's SDPA dispatch picks flash/cuDNN/efficient itself. "auto"
    (default): FlashAttention-3 or -4 where installed and able to run (Hopper/Blackwell, half
    precision; ``kernels.fast_kernel``), otherwise "sdpa", as the Ulysses backend does at ring
    degree 1. A named kernel ("cudnn", "fa3", "fa3_fp8", "fa4", "flash", "efficient", "cpu",
    "math"; see ``wan_model.parallel.kernels``) runs exactly
    that kernel and raises if it cannot run on these tensors: it is never swapped for another.
    ``kernel_name`` says which one ran in the last call.
    """

    def __init__(self, kernel: str = "auto"):
        from .parallel.kernels import KERNEL_NAMES, fast_kernel, plain_attention, resolve_kernel_name

        if kernel not in (*KERNEL_NAMES, "sdpa"):
            raise ValueError(f"unknown attention kernel {kernel!r}; choose one of sdpa, {', '.join(KERNEL_NAMES)}")
        self.kernel = kernel
        self.kernel_name: str | None = None
        # Held here so that the call path has no import (it may run under torch.compile).
        self._plain_attention, self._resolve = plain_attention, resolve_kernel_name
        self._fast_kernel = fast_kernel

    @property
    def name(self) -> str:
        return self.kernel

    def check(self, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
        """The kernel that will run on ``device``/``dtype``; raises ``ValueError`` if it cannot run there."""
        if self.kernel == "auto":
            return self._fast_kernel(device, dtype, head_dim) or "sdpa"
        if self.kernel == "sdpa":
            return "sdpa"
        return self._resolve(self.kernel, device, dtype, head_dim)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, valid_len: int | None = None
    ) -> torch.Tensor:
        if valid_len is not None and valid_len < k.shape[1]:
            # Padding sits at the end: dropping it is exact and keeps the fast kernels usable.
            k, v = k[:, :valid_len], v[:, :valid_len]
        q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        name = self.check(q.device, q.dtype, q.shape[-1])
        if name == "sdpa":
            out = F.scaled_dot_product_attention(q_, k_, v_)
        else:
            out = self._plain_attention(name, q_, k_, v_)
        self.kernel_name = name
        return out.transpose(1, 2)

    def __repr__(self) -> str:
        return f"LocalAttention(kernel={self.kernel!r})"
