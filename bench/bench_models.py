"""Model builders for the forward benchmark: ours and diffusers', random bf16 weights made on the target device.

Both are built on the ``meta`` device, cast there (free), then materialised with ``to_empty`` straight
on the GPU and filled with random values, so a 14B model never exists in fp32 or on the host.
Values do not matter for timing, but they must be finite and keep activations O(1) so the
ours-vs-diffusers comparison is meaningful: linear/conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.01),
norm weights 1, modulation tables ~ N(0, 1/dim) (official's init for those).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from wan_model.config import VARIANTS, WanConfig

# name -> (transformer config, default (width, height), default frames)
MODELS: dict[str, tuple[WanConfig, tuple[int, int], int]] = {
    "14b": (VARIANTS["wan2.1-t2v-14b"].transformer, (1280, 720), 81),
    "1.3b": (VARIANTS["wan2.1-t2v-1.3b"].transformer, (832, 480), 81),
    "tiny": (VARIANTS["tiny-t2v"].transformer, (64, 64), 5),
}

VAE_STRIDE = (4, 8, 8)  # Wan2.1 VAE: time x height x width


@dataclass(frozen=True)
class Shape:
    """One input shape: video size in pixels and frames, and what the transformer sees."""

    width: int
    height: int
    frames: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"

    def latent(self) -> tuple[int, int, int]:
        """(latent frames, latent height, latent width)."""
        return ((self.frames - 1) // VAE_STRIDE[0] + 1, self.height // VAE_STRIDE[1], self.width // VAE_STRIDE[2])

    def tokens(self, config: WanConfig) -> int:
        f, h, w = self.latent()
        pt, ph, pw = config.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    def check(self, config: WanConfig) -> None:
        if self.frames < 1 or (self.frames - 1) % VAE_STRIDE[0]:
            raise ValueError(f"frames must be 4k+1 (e.g. 33, 81, 121), got {self.frames}")
        multiple = VAE_STRIDE[1] * config.patch_size[1]
        if self.width % multiple or self.height % multiple:
            raise ValueError(f"width and height must be multiples of {multiple}, got {self.width}x{self.height}")


def get_model_config(name: str) -> WanConfig:
    try:
        return MODELS[name][0]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def diffusers_kwargs(config: WanConfig) -> dict:
    """``WanTransformer3DModel`` constructor arguments for a T2V ``WanConfig``."""
    if config.model_type != "t2v":
        raise ValueError(f"the benchmark covers T2V models only, got model_type {config.model_type!r}")
    return dict(
        patch_size=tuple(config.patch_size),
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        in_channels=config.in_dim,
        out_channels=config.out_dim,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if config.qk_norm else None,
        eps=config.eps,
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (FSDP2 parameters are DTensors)."""
    return t.to_local() if hasattr(t, "to_local") else t


# Gain of the q/k RMS norms: logits of std ~QK_NORM_GAIN**2 make attention peaked, as in trained models,
# so that the ours-vs-diffusers check notices position (RoPE/sharding) errors; 1 gives near-uniform attention.
QK_NORM_GAIN = float(os.environ.get("BENCH_QK_NORM_GAIN", "2.0"))


@torch.no_grad()
def random_init_(model: nn.Module, seed: int) -> None:
    """Fill every parameter (this rank's shard, under FSDP) with finite random values in place."""
    gen_device = next(iter(_local(p) for p in model.parameters())).device
    generator = torch.Generator(device=gen_device).manual_seed(seed)
    for module_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        norm_gain = QK_NORM_GAIN if module_name.endswith(("norm_q", "norm_k")) else 1.0
        for name, param in module.named_parameters(recurse=False):
            local = _local(param)
            if local.numel() == 0:
                continue
            if is_norm:
                local.fill_(norm_gain if name == "weight" else 0.0)
            elif name in ("modulation", "scale_shift_table"):
                local.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
            elif param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                local.normal_(0.0, fan_in**-0.5, generator=generator)
            else:
                local.normal_(0.0, 0.01, generator=generator)


def _materialise(model: nn.Module, device: torch.device, seed: int) -> nn.Module:
    model.to_empty(device=device)
    random_init_(model, seed)
    return model.requires_grad_(False).eval()


def build_ours(config: WanConfig, device: torch.device, dtype: torch.dtype, seed: int, fsdp: bool = False) -> nn.Module:
    """``WanModel`` with random weights on ``device``; ``fsdp``: FSDP2-shard each block over the world first."""
    from wan_model.model import WanModel

    with torch.device("meta"):
        model = WanModel(config)
    model = model.to(dtype)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # to_empty would leave them uninitialised
        raise RuntimeError(f"WanModel has buffers the benchmark cannot rebuild after meta init: {buffers}")
    if fsdp:
        from wan_model.pipeline.fsdp import shard_transformer

        shard_transformer(model, device)  # shards while still on meta: no rank ever holds the full weights
    return _materialise(model, device, seed)


def build_diffusers(config: WanConfig, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """diffusers ``WanTransformer3DModel`` with random weights, dtypes as ``from_pretrained(torch_dtype=dtype)`` gives."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    kwargs = diffusers_kwargs(config)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs)
    nn.Module.to(model, dtype)  # ModelMixin.to warns about its fp32 modules: they are upcast below, as from_pretrained does
    _materialise(model, device, seed)
    # RoPE tables are non-persistent buffers computed in __init__: rebuild them (small) for real.
    model.rope = WanRotaryPosEmbed(kwargs["attention_head_dim"], kwargs["patch_size"], model.config.rope_max_seq_len)
    model.rope.to(device)
    others = [name for name, _ in model.named_buffers() if not name.startswith("rope.")]
    if others:
        raise RuntimeError(f"diffusers model has buffers the benchmark does not rebuild after meta init: {others}")
    # from_pretrained keeps these modules in fp32 (values stay bf16-representable: initialised in bf16 above).
    keep = tuple(model._keep_in_fp32_modules or ())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in keep for part in name.split(".")):
                param.data = param.data.float()
    return model


def ours_from_diffusers(diffusers_model: nn.Module, config: WanConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``WanModel`` holding exactly diffusers' weights, renamed by ``wan_model.keymap`` (the loader's mapping)."""
    from wan_model.keymap import diffusers_to_official
    from wan_model.model import WanModel

    state = diffusers_to_official(diffusers_model.state_dict())
    with torch.device("meta"):
        model = WanModel(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"key mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.requires_grad_(False).eval()


def make_inputs(config: WanConfig, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int,
                batch: int = 1):
    """(latents [B, C, F, H, W], timestep [B], context [B, text_len, text_dim]); identical on every rank.
    ``batch`` 2 stands for the cond and uncond passes of CFG batched into one forward."""
    generator = torch.Generator().manual_seed(seed)
    f, h, w = shape.latent()
    x = torch.randn(batch, config.in_dim, f, h, w, generator=generator).to(device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, config.text_len, config.text_dim, generator=generator).to(device=device, dtype=dtype)
    return x, t, context


def with_layers(config: WanConfig, num_layers: int | None) -> WanConfig:
    """``config`` with fewer blocks (quick smoke runs); None keeps it."""
    return config if num_layers is None else replace(config, num_layers=num_layers)
