"""What the optional attention-kernel packages (FlashAttention-3 and -4) have in common.

Their checks run on every attention call, inside compiled blocks, so the import check is remembered
by a plain closure (``computed_once``): ``functools.lru_cache`` makes torch.compile warn and trace
around its wrapper, while this traces as what it is, a read of a remembered value.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def computed_once(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn()`` on the first call, the same value after; ``.cache_clear()`` forgets it (tests)."""
    memo: list = []

    @functools.wraps(fn)
    def once() -> T:
        if not memo:
            memo.append(fn())
        return memo[0]

    once.cache_clear = memo.clear  # type: ignore[attr-defined]
    return once


def import_problem_of(module: str, package: str, extra: str) -> str | None:
    """Why ``module`` (from the pip ``package``) cannot be imported here, or None when it can."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or native libraries that fail to load against this torch
        return (f"{package} is not importable ({type(exc).__name__}: {exc}); "
                f"install it with: pip install 'wanserve[{extra}]'")
    return None


def check_cuda_half(name: str, device: torch.device, dtype: torch.dtype, import_problem: Callable[[], str | None]) -> None:
    """Raise ``ValueError`` naming the reason unless kernel ``name`` gets CUDA float16/bfloat16 tensors
    and its package imports."""
    if device.type != "cuda":
        raise ValueError(f"attention kernel {name!r} needs CUDA tensors, got {device.type}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"attention kernel {name!r} supports float16/bfloat16 only, got {dtype}")
    problem = import_problem()
    if problem is not None:
        raise ValueError(f"attention kernel {name!r} is unavailable: {problem}")


def out_and_lse_like(q: torch.Tensor, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty (out ``[B, L, H, D]``, lse ``[B, H, L]`` float32) for ``[B, L, H, D]`` queries: the
    shape-only fake that ``torch.compile`` traces the kernels' custom ops with."""
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse
