"""Wan2.1 / Wan2.2 video VAE through ``diffusers.AutoencoderKLWan``, with Wan's latent normalization.

    vae = WanVAE.load(path, dtype=torch.float32, device="cuda:0")   # kind detected
    latents = vae.encode(video)     # video [B, 3, F, H, W] in [-1, 1], F = 4n+1 -> [B, z, n+1, H/s, W/s]
    video = vae.decode(latents)     # -> [B, 3, F, H, W] in [-1, 1], float32
    vae.enable_tiling()             # optional: bound decode memory with diffusers' spatial tiling

``path`` is the official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` (keys renamed here, facts taken
from diffusers' ``scripts/convert_wan_to_diffusers.py``) or a diffusers ``vae/`` folder.

kinds: "wan2.1": z 16, stride (4, 8, 8). "wan2.2": z 48, stride (4, 16, 16) (a 2x2 pixel patchify
in front of a residual encoder, ``is_residual``, ``patch_size=2``).

Latents are normalized per channel as the official ``WanVAE`` and diffusers' Wan pipelines do:
encode returns ``(mu - mean) / std`` (the posterior mean, no sampling), decode takes
``z * std + mean`` before the decoder. The means/stds are the ``latents_mean``/``latents_std``
of the diffusers config; for official files they are the release constants below.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .pth import load_pth

VAE_KINDS = ("wan2.1", "wan2.2")
OFFICIAL_VAE_FILES = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}

WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]


def vae_config(kind: str, *, base_dim: int | None = None, decoder_base_dim: int | None = None) -> dict:
    """``AutoencoderKLWan`` keyword arguments for a release VAE (or a narrower one of the same structure)."""
    if kind == "wan2.1":
        return dict(base_dim=base_dim or 96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                    temperal_downsample=[False, True, True], latents_mean=list(WAN21_LATENTS_MEAN),
                    latents_std=list(WAN21_LATENTS_STD))
    if kind == "wan2.2":
        return dict(base_dim=base_dim or 160, decoder_base_dim=decoder_base_dim or 256, z_dim=48, dim_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], is_residual=True,
                    in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
                    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))
    raise ValueError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")


# ---- official <-> diffusers key names -------------------------------------------------------------

_RESIDUAL_RENAMES = {  # inside one residual block: official nn.Sequential index -> diffusers name
    "residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight", "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma", "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias",
}
_RESIDUAL_RENAMES_INV = {v: k for k, v in _RESIDUAL_RENAMES.items()}
_TOP_RENAMES = {  # keys outside the down/up sample stacks
    "conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
    "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias",
}
# Decoder of Wan2.1: a flat list of (3 residual blocks + 1 upsampler) per level.
_WAN21_UP_GROUP = 4


def _rename_common(key: str) -> str | None:
    """Renames shared by both kinds (stems, middle, heads); None when ``key`` is in a sample stack."""
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    m = re.fullmatch(r"(encoder|decoder)\.(conv1|head\.0|head\.2|middle\.(\d)\.(.+))\.(\w+)", key)
    if not m:
        return None
    side, what, param = m.group(1), m.group(2), m.group(5)
    if what == "conv1":
        return f"{side}.conv_in.{param}"
    if what == "head.0":
        return f"{side}.norm_out.{param}"
    if what == "head.2":
        return f"{side}.conv_out.{param}"
    index, rest = int(m.group(3)), f"{m.group(4)}.{param}"
    if index == 1:  # the attention block
        return f"{side}.mid_block.attentions.0.{rest}"
    return f"{side}.mid_block.resnets.{index // 2}.{_RESIDUAL_RENAMES[rest]}"


def _rename_common_inv(key: str) -> str | None:
    inv_top = {v: k for k, v in _TOP_RENAMES.items()}
    if key in inv_top:
        return inv_top[key]
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(\w+)", key)
    if m:
        name = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}[m.group(2)]
        return f"{m.group(1)}.{name}.{m.group(3)}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(attentions|resnets)\.(\d)\.(.+)", key)
    if m:
        side, kind, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if kind == "attentions":
            return f"{side}.middle.1.{rest}"
        return f"{side}.middle.{2 * index}.{_RESIDUAL_RENAMES_INV[rest]}"
    return None


def official_vae_to_diffusers_key(key: str, kind: str) -> str:
    """The ``AutoencoderKLWan`` name of one key of ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth``."""
    common = _rename_common(key)
    if common is not None:
        return common
    if kind == "wan2.1":
        m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)
        if m:  # the encoder stays one flat list, residual blocks and downsamplers alike
            rest = m.group(2)
            return f"encoder.down_blocks.{m.group(1)}.{_RESIDUAL_RENAMES.get(rest, rest)}"
        m = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
        if m:
            index, rest = int(m.group(1)), m.group(2)
            group, pos = divmod(index, _WAN21_UP_GROUP)
            if pos == _WAN21_UP_GROUP - 1:
                return f"decoder.up_blocks.{group}.upsamplers.0.{rest}"
            return f"decoder.up_blocks.{group}.resnets.{pos}.{_RESIDUAL_RENAMES[rest]}"
    elif kind == "wan2.2":
        m = re.fullmatch(r"(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.\2\.(\d+)\.(.+)", key)
        if m:
            side, level, sub, rest = m.group(1), m.group(3), m.group(4), m.group(5)
            block = "down_blocks" if side == "encoder" else "up_blocks"
            if rest in _RESIDUAL_RENAMES:
                return f"{side}.{block}.{level}.resnets.{sub}.{_RESIDUAL_RENAMES[rest]}"
            sampler = "downsampler" if side == "encoder" else "upsampler"
            return f"{side}.{block}.{level}.{sampler}.{rest}"
    else:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")
    raise KeyError(f"unexpected key {key!r} in an official {kind} VAE checkpoint")


def diffusers_vae_to_official_key(key: str, kind: str) -> str:
    """Inverse of :func:`official_vae_to_diffusers_key` (used to write official-layout files)."""
    common = _rename_common_inv(key)
    if common is not None:
        return common
    if kind == "wan2.1":
        m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)
        if m:
            rest = m.group(2)
            return f"encoder.downsamples.{m.group(1)}.{_RESIDUAL_RENAMES_INV.get(rest, rest)}"
        m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
        if m:
            group, rest = int(m.group(1)), m.group(4)
            if m.group(3) is None:
                return f"decoder.upsamples.{group * _WAN21_UP_GROUP + _WAN21_UP_GROUP - 1}.{rest}"
            return f"decoder.upsamples.{group * _WAN21_UP_GROUP + int(m.group(3))}.{_RESIDUAL_RENAMES_INV[rest]}"
    elif kind == "wan2.2":
        m = re.fullmatch(
            r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)|downsampler|upsampler)\.(.+)", key)
        if m:
            side, level, rest = m.group(1), m.group(3), m.group(6)
            stack = "downsamples" if side == "encoder" else "upsamples"
            if m.group(5) is not None:
                return f"{side}.{stack}.{level}.{stack}.{m.group(5)}.{_RESIDUAL_RENAMES_INV[rest]}"
            # The sampler is the last entry of the level's list, after num_res_blocks (+1 in the decoder) blocks.
            sub = 2 if side == "encoder" else 3
            return f"{side}.{stack}.{level}.{stack}.{sub}.{rest}"
    else:
        raise ValueError(f"unknown VAE kind {kind!r}; expected one of {VAE_KINDS}")
    raise KeyError(f"unexpected key {key!r} in a diffusers {kind} VAE state dict")


def official_vae_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """"wan2.2" when the stacks are nested per level (``encoder.downsamples.0.downsamples.0``), else "wan2.1"."""
    return "wan2.2" if any(k.startswith("encoder.downsamples.0.downsamples.") for k in state_dict) else "wan2.1"


def _config_from_official(state_dict: dict[str, torch.Tensor], kind: str) -> dict:
    # Widths are read from the stems so that narrower test VAEs of the same structure load too.
    base_dim = state_dict["encoder.conv1.weight"].shape[0]
    decoder_base_dim = state_dict["decoder.conv1.weight"].shape[0] // 4  # dim_mult[-1] == 4
    z_dim = state_dict["conv2.weight"].shape[0]
    config = vae_config(kind, base_dim=base_dim, decoder_base_dim=decoder_base_dim)
    if z_dim != config["z_dim"]:
        raise ValueError(f"official {kind} VAE with z_dim {z_dim}; expected {config['z_dim']}")
    if kind == "wan2.1" and decoder_base_dim != base_dim:
        config["decoder_base_dim"] = decoder_base_dim
    return config


def load_vae_model(path: str | Path, *, kind: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An ``AutoencoderKLWan`` on CPU, eval mode, from an official ``.pth`` or a diffusers ``vae/`` folder."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    if path.is_dir():
        model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
        found = "wan2.2" if model.config.z_dim == 48 else "wan2.1"
        if kind is not None and kind != found:
            raise ValueError(f"{path} holds a {found} VAE, not {kind}")
    else:
        state = load_pth(path)
        found = official_vae_kind(state)
        if kind is not None and kind != found:
            raise ValueError(f"{path} holds a {found} VAE, not {kind}")
        model = AutoencoderKLWan(**_config_from_official(state, found))
        renamed = {official_vae_to_diffusers_key(k, found): v for k, v in state.items()}
        model.load_state_dict(renamed, strict=True)
    if next(model.parameters()).dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def save_official_vae(model: nn.Module, path: str | Path, kind: str) -> None:
    """Write an ``AutoencoderKLWan``'s weights as an official-layout ``.pth`` (official key names)."""
    state = {diffusers_vae_to_official_key(k, kind): v.detach().clone().contiguous()
             for k, v in model.state_dict().items()}
    torch.save(state, path)


class WanVAE:
    """Encode videos to normalized latents and back; see the module doc."""

    def __init__(self, model: nn.Module, *, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.dtype = next(model.parameters()).dtype
        config = model.config
        self.z_dim = config.z_dim
        self.kind = "wan2.2" if config.z_dim == 48 else "wan2.1"
        self.stride = (config.scale_factor_temporal, config.scale_factor_spatial, config.scale_factor_spatial)
        self.latents_mean = torch.tensor(config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def load(cls, path: str | Path, *, kind: str | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> "WanVAE":
        return cls(load_vae_model(path, kind=kind, dtype=dtype), device=device)

    def enable_tiling(self, **kwargs) -> None:
        """Spatial tiling in encode/decode (diffusers ``enable_tiling`` arguments) to bound memory."""
        self.model.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(z, F', H', W') of the latents of a ``num_frames`` x ``height`` x ``width`` video."""
        st, sh, sw = self.stride
        if (num_frames - 1) % st or height % sh or width % sw:
            raise ValueError(f"video {num_frames}x{height}x{width} does not fit the VAE stride {self.stride}: "
                             f"frames must be {st}n+1, height and width multiples of {sh}")
        return (self.z_dim, (num_frames - 1) // st + 1, height // sh, width // sw)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalized latents [B, z, (F-1)/4+1, H/s, W/s] in float32."""
        self._check_video(video)
        return self._normalize(self.model.encode(video.to(self.device, self.dtype)).latent_dist.mode())

    @torch.no_grad()
    def encode_by_rows(self, video: torch.Tensor, group) -> torch.Tensor:
        """``encode`` with the rows split over the ranks of ``group`` (``wan_model.parallel.vae_rows``).

        Collective: every rank calls it with the same video and gets the latents (the whole-frame
        encode's, up to float rounding)."""
        from wan_model.parallel.vae_rows import encode_by_rows

        self._check_video(video)
        return self._normalize(encode_by_rows(self.model, video.to(self.device, self.dtype), group))

    def _check_video(self, video: torch.Tensor) -> None:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W]; got {tuple(video.shape)}")
        self.latent_shape(*video.shape[2:])

    def _normalize(self, mu: torch.Tensor) -> torch.Tensor:
        mu = mu.float()
        return (mu - self.latents_mean.to(mu.device)) / self.latents_std.to(mu.device)

    def _decoder_input(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, F, H, W]; got {tuple(latents.shape)}")
        z = latents.float().to(self.device)
        return (z * self.latents_std.to(z.device) + self.latents_mean.to(z.device)).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents [B, z, F', H', W'] -> video [B, 3, 4(F'-1)+1, H, W] in [-1, 1], float32."""
        return self.model.decode(self._decoder_input(latents), return_dict=False)[0].float()

    @torch.no_grad()
    def decode_by_rows(self, latents: torch.Tensor, group, dst: int = 0) -> Optional[torch.Tensor]:
        """``decode`` with the rows split over the ranks of ``group`` (``wan_model.parallel.vae_rows``).

        Collective: every rank calls it with the same latents. The video (the whole-frame decode's,
        up to float rounding) comes back on group rank ``dst``; the others get None.
        """
        from wan_model.parallel.vae_rows import decode_by_rows

        video = decode_by_rows(self.model, self._decoder_input(latents), group, dst=dst)
        return None if video is None else video.float()
