"""fp8 GEMMs for the transformer blocks: an opt-in, lossy speed mode.

``quantize_blocks_fp8(model)`` swaps every ``nn.Linear`` inside ``model.blocks`` (attention
projections and FFN: nearly all of the GEMM FLOPs) for ``Fp8Linear``:

* the weight is stored once as float8 e4m3 with one scale per output channel (amax / 448);
* each call scales every activation row by its own amax (one scale per token), casts to e4m3,
  and multiplies with ``torch._scaled_mm`` (row-wise scales, bf16 output, bias fused), which
  runs on the fp8 tensor cores of Hopper (sm89+) at about twice the bf16 rate.

Results differ from bf16 by the e4m3 rounding of both operands (3 mantissa bits): expect a
relative error of a few percent on one forward. Embeddings, the time MLP and the head stay
in their own precision. It replaces the weights, so FSDP is refused with it. A LoRA merges into
the original weights re-read from the checkpoint, then re-quantizes them (``wan_model.lora``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["Fp8Linear", "quantize_blocks_fp8", "blocks_fp8", "quantize_fp8"]

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
_MIN_SCALE = 1e-12  # an all-zero row or channel gets this scale instead of 0 (no division by zero)


def quantize_fp8(x: torch.Tensor, dim: int | tuple[int, ...] = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 tensor, float32 scale) with ``x ~= q * scale``: one scale per slice along ``dim`` (kept
    as size-1 dims), chosen so that the slice's largest magnitude maps to the fp8 maximum. Rows of
    [M, K] with ``dim=-1``; the attention kernels use it per head as well (``parallel.fa3``)."""
    scale = (x.abs().amax(dim=dim, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with W and x in float8 e4m3 (per-channel and per-token scales), y in ``out_dtype``."""

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype | None = None):
        super().__init__()
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = out_dtype or weight.dtype
        w_q, w_scale = quantize_fp8(weight)
        self.register_buffer("weight_fp8", w_q)
        self.register_buffer("weight_scale", w_scale.view(1, -1).contiguous())  # [1, N] as _scaled_mm wants
        bias = linear.bias.detach().to(self.out_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` ``[out, in]`` into this layer's buffers, in place (compiled graphs keep them)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {tuple(weight.shape)} for a {self.out_features}x{self.in_features} fp8 layer")
        w_q, w_scale = quantize_fp8(weight.to(self.weight_fp8.device))
        self.weight_fp8.copy_(w_q)
        self.weight_scale.copy_(w_scale.view(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x_q, x_scale = quantize_fp8(x.reshape(-1, self.in_features))
        # On CUDA, _scaled_mm takes a bias only for a 16-bit output: a float32 model adds it afterwards.
        fused_bias = self.bias if self.out_dtype != torch.float32 else None
        out = torch._scaled_mm(x_q, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=fused_bias, out_dtype=self.out_dtype)
        if self.bias is not None and fused_bias is None:
            out = out + self.bias
        return out.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3, out_dtype={self.out_dtype}"


def quantize_blocks_fp8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model.blocks`` by ``Fp8Linear`` in place; returns how many.

    Raises ``ValueError`` where fp8 GEMMs cannot run: CUDA devices below sm89 (no fp8 tensor
    cores). CPU runs the same arithmetic (for tests; it is not faster there).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"fp8 needs a model with a non-empty ModuleList `blocks`, got {type(model).__name__}")
    device = next(blocks.parameters()).device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"fp8 GEMMs need an sm89+ GPU (Ada, Hopper, Blackwell), got sm{major}{minor}")
    count = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Fp8Linear(child))
                    count += 1
    return count


def blocks_fp8(model: nn.Module) -> bool:
    """Whether the blocks of ``model`` run fp8 GEMMs."""
    blocks = getattr(model, "blocks", ())
    return len(blocks) > 0 and any(isinstance(m, Fp8Linear) for m in blocks.modules())
