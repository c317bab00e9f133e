"""FlashAttention-3 (the ``fa3-fwd`` package: FA3's Hopper kernels, forward only) as LSE kernels.

FA3 is the attention kernel written for Hopper's wgmma/TMA units. It returns the true log-sum-exp,
so the ring merge stays exact. It is optional (``pip install 'wanserve[fa3]'``); picking ``fa3``
without it raises, it never falls back to another kernel.

Two kernels:

* ``fa3``: bfloat16 (the published wheel is built without float16).
* ``fa3_fp8``: an opt-in lossy mode. q, k (centred) and v are quantized to float8 e4m3 with one
  scale per (batch, head), and FA3's fp8 kernel takes the scales back out (``*_descale``). The LSE
  it returns is in the true (de-scaled) logits, so it still merges exactly across ring steps; the
  loss is the rounding of q, k and v (and of the probabilities, inside the kernel).

Each call is a ``torch.library`` custom op with a shape-only fake, so ``torch.compile`` of a block
treats the kernel as opaque and fuses the fp8 quantization into the kernels around it.
"""
from __future__ import annotations

import torch

from ..fp8 import quantize_fp8
from .optional_kernel import check_cuda_half, computed_once, import_problem_of, out_and_lse_like

# FA3's kernels use Hopper-only instructions (wgmma, TMA): sm90 only.
SUPPORTED_MAJOR = (9,)

# SMs FA3 leaves idle (its ``sm_margin``), so that a collective overlapped with attention
# (``head_chunks``) finds SMs to run on instead of queueing behind every attention block. Read at
# call time; 0 = all SMs. See bench/RESULTS.md for what it gave.
sm_margin = 0


@computed_once
def import_problem() -> str | None:
    """Why FlashAttention-3 cannot be imported here, or None when it can."""
    return import_problem_of("fa3_fwd_interface", "fa3-fwd", "fa3")


@computed_once
def float16_built() -> bool:
    """Whether the installed FA3 build has its float16 kernels (the published ``fa3-fwd`` has not)."""
    try:
        from fa3_fwd_config import CONFIG
    except ImportError:
        return True  # an upstream build without the config module: FA3 ships fp16 by default
    return not CONFIG.get("build_flags", {}).get("FLASHATTENTION_DISABLE_FP16", False)


def check(device: torch.device, dtype: torch.dtype, head_dim: int | None = None, *, name: str = "fa3") -> int:
    """Raise ``ValueError`` naming the reason if kernel ``name`` (``fa3``/``fa3_fp8``) cannot run on
    ``device``/``dtype`` (and ``head_dim``); else return the GPU's compute-capability major."""
    check_cuda_half(name, device, dtype, import_problem)
    # The fp8 kernel writes its output in bfloat16 (cast to the model's dtype after), so only the
    # plain kernel in a float16 model needs the float16 build.
    if name == "fa3" and dtype == torch.float16 and not float16_built():
        raise ValueError(f"attention kernel {name!r}: this fa3-fwd build has no float16 kernels; "
                         "run the model in bfloat16")
    major, minor = torch.cuda.get_device_capability(device)
    if major not in SUPPORTED_MAJOR:
        raise ValueError(f"attention kernel {name!r} needs a Hopper (sm90) GPU, got sm{major}{minor}")
    if head_dim is not None and (head_dim % 8 or not 8 <= head_dim <= 256):
        raise ValueError(f"attention kernel {name!r}: head_dim must be a multiple of 8 in [8, 256], got {head_dim}")
    return major


def usable(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """Whether the ``auto`` kernel choice can take (bf16) FA3 here."""
    try:
        check(device, dtype, head_dim)
    except ValueError:
        return False
    return True


def _fa3_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **descales) -> tuple[torch.Tensor, torch.Tensor]:
    from fa3_fwd_interface import _flash_attn_forward  # FA3's own op: (out, lse, accumulators...)

    with torch.no_grad():
        out, lse = _flash_attn_forward(q, k, v, **descales, sm_margin=sm_margin)[:2]
    return out, lse


@torch.library.custom_op("wanserve::fa3_attention", mutates_args=())
def _fa3_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L, H, D]`` q/k/v -> (out ``[B, L, H, D]``, lse ``[B, H, L]`` float32)."""
    return _fa3_forward(q, k, v)


@torch.library.custom_op("wanserve::fa3_fp8_attention", mutates_args=())
def _fa3_fp8_blhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_descale: torch.Tensor,
                  k_descale: torch.Tensor, v_descale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 ``[B, L, H, D]`` q/k/v and ``[B, H]`` float32 descales -> (bf16 out, lse ``[B, H, L]``)."""
    return _fa3_forward(q, k, v, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)


def _fake(q: torch.Tensor, *_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return out_and_lse_like(q, torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype)


_fa3_blhd.register_fake(_fake)
_fa3_fp8_blhd.register_fake(_fake)


def quantize_fp8_per_head(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L, H, D]`` -> (float8 e4m3 of the same shape, ``[B, H]`` float32 descale), one scale per
    (batch, head) so that the head's largest magnitude maps to the fp8 maximum."""
    quantized, scale = quantize_fp8(x, dim=(1, 3))  # scale [B, 1, H, 1]
    return quantized, scale[:, 0, :, 0]


def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``LseKernel`` form, ``[B, H, L, D]`` in and out (views; FA3 takes strided heads)."""
    out, lse = _fa3_blhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2), lse


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossy fp8 FA3 in the ``LseKernel`` form; the output is in q's dtype.

    The keys are centred first (their mean over the tokens, per head and channel, subtracted, as
    SageAttention does): every score of a query row then shifts by the same ``q . mean``, which
    softmax ignores, while fp8's few mantissa bits go to what differs between keys instead of to a
    shared offset. The shift is added back to the LSE, so the LSE stays the true one (ring merge).
    """
    k_mean = k.float().mean(dim=2, keepdim=True)  # [B, H, 1, D]
    (q8, qd), (k8, kd), (v8, vd) = (quantize_fp8_per_head(t.transpose(1, 2)) for t in (q, k.float() - k_mean, v))
    out, lse = _fa3_fp8_blhd(q8, k8, v8, qd, kd, vd)
    shift = torch.matmul(q.float(), k_mean.transpose(-1, -2)).squeeze(-1) * q.shape[-1] ** -0.5  # [B, H, L]
    return out.to(q.dtype).transpose(1, 2), lse + shift
