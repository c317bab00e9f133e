"""Load every model a generator needs, once, from a model folder (or a cached tiny one)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from wan_model.config import VARIANTS, VariantSpec, get_variant


@dataclass
class Components:
    variant: VariantSpec
    model_dir: Path
    experts: dict  # expert name -> WanModel ("" for single-expert models)
    text_encoder: Optional[object]  # TextEncoder; with placement "cpu", on rank 0 only
    vae: Optional[object]  # WanVAE: on rank 0, and on every rank when parallel_vae splits it by rows
    clip: Optional[object]  # CLIPImageEncoder, Wan2.1 I2V only


def tiny_variant_name(model: str, variant: Optional[str] = None) -> Optional[str]:
    """The tiny variant ``model`` names, or None for a model folder.

    ``"tiny"`` -> ``variant`` when that is a tiny variant, else ``"tiny-t2v"``; ``"tiny-<x>"`` -> itself.
    """
    tiny = sorted(n for n, v in VARIANTS.items() if v.tiny)
    if model == "tiny":
        if variant is None:
            return "tiny-t2v"
        if variant in VARIANTS and VARIANTS[variant].tiny:
            return variant
        raise ValueError(f"model 'tiny' runs tiny variants only ({', '.join(tiny)}); got variant {variant!r}")
    if model.startswith("tiny-"):
        if model not in VARIANTS or not VARIANTS[model].tiny:
            raise ValueError(f"unknown tiny model {model!r}; choose one of tiny, {', '.join(tiny)}")
        if variant is not None and variant != model:
            raise ValueError(f"model {model!r} is variant {model}, but variant {variant!r} was requested")
        return model
    return None


def ensure_tiny_model_dir(variant: str, cache_dir: Optional[str] = None, layout: str = "official") -> Path:
    """The tiny random-weight model folder for ``variant``: built once (seeded, so every rank and
    every run gets the same weights) into ``cache_dir`` (default ``~/.cache/wanserve``), then reused."""
    from .tiny import build_tiny_model_dir

    path = Path(cache_dir).expanduser() / f"{variant}-{layout}" if cache_dir else None
    return build_tiny_model_dir(path, variant, layout)


def text_encoder_dtype(device: torch.device) -> torch.dtype:
    """T5 in bfloat16 on GPUs (official t5_dtype); float32 on the CPU-only path so tiny runs are exact."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_components(config, device: torch.device, dtype: torch.dtype, rank: int = 0) -> Components:
    """Everything ``config.model`` names, loaded through the real loaders onto ``device``.

    With ``config.offload`` the transformers stay on the CPU until their turn.
    """
    from wan_model.loader import load_transformer

    from .clip import CLIPImageEncoder
    from .model_dir import detect_model_dir
    from .text_encoder import TextEncoder
    from .vae import WanVAE

    tiny = tiny_variant_name(config.model, config.variant)
    if tiny is not None:
        model_dir = ensure_tiny_model_dir(tiny, config.cache_dir)
        files = detect_model_dir(model_dir, variant=tiny)
    else:
        files = detect_model_dir(config.model, variant=config.variant)
    variant = get_variant(files.variant)
    if set(files.transformer) != set(variant.experts):
        raise ValueError(f"{files.root}: transformer experts {sorted(files.transformer)} do not match "
                         f"{variant.name}'s {list(variant.experts)}")

    expert_device = torch.device("cpu") if config.offload else device
    shard = None
    if config.fsdp:  # shard while loading: a rank never holds a whole expert (14B: 28.6 GB) on its GPU
        from .fsdp import shard_transformer

        def shard(model):
            return shard_transformer(model, device)
    experts = {}
    for name in variant.experts:
        model = load_transformer(files.transformer[name], variant=variant.name, device=expert_device, dtype=dtype,
                                 shard=shard)
        experts[name] = model.eval().requires_grad_(False)

    text_encoder = None
    if config.text_encoder != "cpu" or rank == 0:  # a CPU encoder runs on rank 0 alone (the generator broadcasts)
        text_encoder = TextEncoder.load(files.text_encoder, files.tokenizer, dtype=text_encoder_dtype(device),
                                        device=device, placement=config.text_encoder)
    if config.offload and config.text_encoder == "replicated":
        text_encoder.model.to("cpu")  # the generator brings it to the GPU for each encode
    vae = None
    if rank == 0 or config.parallel_vae:  # a split VAE needs it on every rank
        vae_device = torch.device("cpu") if config.offload else device
        vae = WanVAE.load(files.vae, kind=files.vae_kind, dtype=torch.float32, device=vae_device)
    clip = CLIPImageEncoder.load(files.clip, device=device) if variant.uses_clip else None
    return Components(variant=variant, model_dir=Path(files.root), experts=experts, text_encoder=text_encoder,
                      vae=vae, clip=clip)
