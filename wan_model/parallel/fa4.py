"""FlashAttention-4 (the ``flash-attn-4`` package, CuTe DSL kernels) as an LSE-returning kernel.

On Hopper it runs a warp-specialized wgmma kernel that is faster than cuDNN's SDPA at the
long, non-causal sequences of video models, and it returns the true log-sum-exp, so the ring
merge stays exact. It is optional (``pip install 'wanserve[fa4]'``): picking the ``fa4`` kernel
without it raises, it never falls back to another kernel.

The call is a ``torch.library`` custom op with a shape-only fake, so ``torch.compile`` of a
block treats it as one opaque kernel instead of tracing into the DSL.
"""
from __future__ import annotations

import torch

from .optional_kernel import check_cuda_half, computed_once, import_problem_of, out_and_lse_like

# FA4's forward kernels exist for Ampere (8), Hopper (9), Blackwell (10, 11) and consumer Blackwell
# (12). "auto" prefers it only where its warp-specialized kernels run (Hopper, measured faster than
# cuDNN on H200; Blackwell, the architecture it was written for); a named "fa4" runs on all of them.
SUPPORTED_MAJOR = (8, 9, 10, 11, 12)
AUTO_MAJOR = (9, 10, 11)


@computed_once
def import_problem() -> str | None:
    """Why FlashAttention-4 cannot be imported here, or None when it can."""
    return import_problem_of("flash_attn.cute", "flash-attn-4", "fa4")


def head_dim_problem(major: int, head_dim: int) -> str | None:
    """Why FA4 cannot take ``head_dim`` on compute capability ``major`` (half precision), or None."""
    if head_dim % 8:
        return f"head_dim must be a multiple of 8, got {head_dim}"
    if major in (10, 11):
        ok = 8 <= head_dim <= 128 or head_dim == 256
    else:
        ok = 8 <= head_dim <= 256
    return None if ok else f"head_dim {head_dim} is not supported on sm{major}x"


def check(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> int:
    """Raise ``ValueError`` naming the reason if FA4 cannot run on ``device``/``dtype`` (and ``head_dim``);
    else return the GPU's compute-capability major."""
    check_cuda_half("fa4", device, dtype, import_problem)
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJOR:
        raise ValueError(f"attention kernel 'fa4' needs an sm80+ GPU, got sm{major}{minor}")
    problem = head_dim_problem(major, head_dim) if head_dim is not None else None
    if problem is not None:
        raise ValueError(f"attention kernel 'fa4': {problem}")
    return major


def usable(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """Whether the ``auto`` kernel choice takes FA4 here: it runs, and on Hopper or Blackwell."""
    try:
        return check(device, dtype, head_dim) in AUTO_MAJOR
    except ValueError:
        return False


@torch.library.custom_op("wanserve::fa4_attention", mutates_args=())
def _fa4_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L, H, D]`` q/k/v -> (out ``[B, L, H, D]``, lse ``[B, H, L]`` float32)."""
    from flash_attn.cute import flash_attn_func

    with torch.no_grad():  # inference: no autograd state saved by FA4's autograd.Function
        out, lse = flash_attn_func(q, k, v, return_lse=True)
    return out, lse


@_fa4_blhd.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return out_and_lse_like(q)


def fa4_attention_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 in its native ``[B, L, H, D]`` layout: (out, lse ``[B, H, L]``)."""
    return _fa4_blhd(q, k, v)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``LseKernel`` form, ``[B, H, L, D]`` in and out (views; FA4 takes strided heads)."""
    out, lse = _fa4_blhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), lse
