"""Attention kernels that return the softmax log-sum-exp along with the output.

A ring step sees one chunk of keys at a time; merging the partial outputs is exact only when
each is weighted by its chunk's true log-sum-exp. Some kernels do not return one (or return
zeros), which makes a ring merge silently wrong, so every kernel here returns a real LSE and
is picked by name; nothing falls back silently.

Layout here is ``[batch, heads, tokens, head_dim]``; the LSE is ``[batch, heads, tokens]``
in float32, natural log.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import fa3, fa4
from .fa3 import fa3_attention, fa3_fp8_attention  # optional fa3-fwd, imported on first call
from .fa4 import fa4_attention  # optional flash-attn-4, imported on first call

KERNEL_NAMES = ("auto", "cudnn", "fa3", "fa3_fp8", "fa4", "flash", "efficient", "cpu", "math")

# What "auto" takes on a GPU for half precision, first that is installed and runs here; cuDNN when
# none is. Measured on H200 at the Wan shapes (bench/RESULTS.md): FA3 > FA4 > cuDNN > torch flash.
# The lossy fa3_fp8 is never picked automatically.
AUTO_FAST_KERNELS = (("fa3", fa3), ("fa4", fa4))

# (q, k, v) -> (out, lse)
LseKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _lse_shape(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    # cuDNN returns [B, H, L, 1] in some versions; some kernels pad L up to a block size.
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[..., : q.shape[2]].float()


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    return out, _lse_shape(lse, q)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    return out, _lse_shape(lse, q)


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-efficient (xformers-style) CUDA kernel: the one LSE-returning CUDA kernel with float32."""
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
    return out, _lse_shape(lse, q)


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out, _lse_shape(lse, q)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path in float32 on any device (materializes the score matrix: small inputs only)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


_LSE_KERNELS: dict[str, LseKernel] = {
    "cudnn": cudnn_attention,
    "fa3": fa3_attention,
    "fa3_fp8": fa3_fp8_attention,
    "fa4": fa4_attention,
    "flash": flash_attention,
    "efficient": efficient_attention,
    "cpu": cpu_attention,
    "math": math_attention,
}


# Kernel choice runs on every attention call, inside compiled blocks. Its checks (imports, the
# GPU's compute capability) are not traceable: torch.compile would split the block into five graphs
# around the attention call, and the Ulysses transfers could then not start while the projections
# compute (``wan_model.compile``). ``assume_constant_result`` makes Dynamo call these two once while
# tracing and keep the answer, a constant for that graph (device, dtype and head_dim are guarded by
# the graph anyway). They return instead of raising, because an exception inside them would reach
# the caller wrapped in a Dynamo error.


@torch.compiler.assume_constant_result
def fast_kernel(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """The optional fast kernel ``auto`` takes here (``fa3``/``fa4``), or None when none is installed and runs."""
    if device.type != "cuda":
        return None
    for name, module in AUTO_FAST_KERNELS:
        if module.usable(device, dtype, head_dim):
            return name
    return None


@torch.compiler.assume_constant_result
def kernel_problem(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """Why the named (not ``auto``) ``kernel`` cannot run on ``device``/``dtype``/``head_dim``, or None."""
    if kernel in ("cudnn", "flash"):
        if device.type != "cuda":
            return f"attention kernel {kernel!r} needs CUDA tensors, got {device.type}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"attention kernel {kernel!r} supports float16/bfloat16 only, got {dtype}"
    try:
        if kernel in ("fa3", "fa3_fp8"):
            fa3.check(device, dtype, head_dim, name=kernel)
        if kernel == "fa4":
            fa4.check(device, dtype, head_dim)
    except ValueError as exc:
        return str(exc)
    if kernel == "efficient" and device.type != "cuda":
        return f"attention kernel 'efficient' needs CUDA tensors, got {device.type}"
    if kernel == "cpu" and device.type != "cpu":
        return f"attention kernel 'cpu' needs CPU tensors, got {device.type}"
    return None


def resolve_kernel_name(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The concrete kernel ``kernel`` means on ``device``/``dtype`` (and ``head_dim``, when known);
    raise if it cannot run there."""
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {', '.join(KERNEL_NAMES)}")
    if kernel == "auto":
        if device.type == "cuda":
            # FA3/FA4 (when installed) beat cuDNN for half precision, and cuDNN beats torch's
            # flash; none of them has fp32.
            if dtype not in (torch.float16, torch.bfloat16):
                return "efficient"
            return fast_kernel(device, dtype, head_dim) or "cudnn"
        return "cpu" if device.type == "cpu" else "math"
    problem = kernel_problem(kernel, device, dtype, head_dim)
    if problem is not None:
        raise ValueError(problem)
    return kernel


def get_lse_kernel(name: str) -> LseKernel:
    return _LSE_KERNELS[name]


def plain_attention(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention without LSE (Ulysses only: the whole sequence is local), on the named kernel."""
    if name == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, False, False)[0]
    if name == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[0]
    if name in ("fa3", "fa3_fp8", "fa4"):
        return _LSE_KERNELS[name](q, k, v)[0]
    if name == "efficient":
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, False)[0]
    if name == "math":
        return math_attention(q, k, v)[0]
    # "sdpa" / "cpu": PyTorch's own dispatch.
    return F.scaled_dot_product_attention(q, k, v)
