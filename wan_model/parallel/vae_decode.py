"""The Wan VAE decode split by rows over the ranks of a group (patch parallelism).

Each rank decodes one band of latent rows through the unchanged diffusers decoder. Every
convolution that pads rows (the 3x3x3 causal convolutions and the 3x3 convolutions after each
upsampling) takes its missing rows from the ranks above and below instead of zeros ("halo"), so
every output row is the row the whole-frame decode computes, up to the float rounding of the
convolution algorithms. The rest of the decoder is per pixel and needs nothing: RMS norm over
channels, nearest upsampling, 1x1 convolutions, ``DupUp3D`` and Wan2.2's unpatchify. The one
attention (the middle block, one head over each frame) gathers the whole frame's keys and values
and attends from this band's queries. The destination rank gathers the bands.

Halos are exchanged with point-to-point sends, one row per neighbour per convolution (a few hundred
kilobytes), so the decode scales with the number of ranks while the video stays the same.

    video = decode_by_rows(vae_model, z, group)   # [B, 3, F, H, W] on rank ``dst`` of group, else None

``z`` (already de-normalized: the decoder's input) must be the same on every rank.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def row_bands(height: int, parts: int) -> list[int]:
    """Rows per rank: ``height`` split as evenly as possible, the first ranks taking one more."""
    if parts < 1 or height < parts:
        raise ValueError(f"cannot split {height} latent rows over {parts} ranks")
    base, extra = divmod(height, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


@dataclass(frozen=True)
class RowBand:
    """This rank's band of rows in ``group``; the band's neighbours are the ranks above and below."""

    group: dist.ProcessGroup
    rank: int
    world: int

    def peer(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)


def exchange_halo(x: torch.Tensor, halo: int, band: RowBand) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., halo + H + halo, W]``: the ``halo`` rows of the ranks above and below
    (zeros at the top and bottom of the frame, as the convolution's own padding would give)."""
    if x.shape[-2] < halo:
        raise ValueError(f"a band of {x.shape[-2]} rows cannot lend a halo of {halo} rows")
    top = torch.zeros_like(x[..., :halo, :])
    bottom = torch.zeros_like(x[..., :halo, :])
    ops = []
    if band.rank > 0:
        ops += [dist.P2POp(dist.isend, x[..., :halo, :].contiguous(), band.peer(band.rank - 1), band.group),
                dist.P2POp(dist.irecv, top, band.peer(band.rank - 1), band.group)]
    if band.rank < band.world - 1:
        ops += [dist.P2POp(dist.isend, x[..., -halo:, :].contiguous(), band.peer(band.rank + 1), band.group),
                dist.P2POp(dist.irecv, bottom, band.peer(band.rank + 1), band.group)]
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return torch.cat([top, x, bottom], dim=-2)


def gather_rows(x: torch.Tensor, band: RowBand, sizes: list[int], dst: Optional[int] = None
                ) -> Optional[torch.Tensor]:
    """Every rank's band of ``[..., h, W]`` (``sizes`` rows each, in rank order) -> ``[..., H, W]``:
    on every rank, or with ``dst`` on that group rank only (None on the others)."""
    padded = F.pad(x, (0, 0, 0, max(sizes) - x.shape[-2])).contiguous()  # collectives want equal shapes
    parts = [torch.empty_like(padded) for _ in range(band.world)] if dst in (None, band.rank) else None
    if dst is None:
        dist.all_gather(parts, padded, group=band.group)
    else:
        dist.gather(padded, parts, dst=band.peer(dst), group=band.group)
    if parts is None:
        return None
    return torch.cat([part[..., :rows, :] for part, rows in zip(parts, sizes)], dim=-2)


# ---- the decoder's row-mixing layers, each given a halo-taking forward for the duration of a decode ----

def _causal_conv3d_forward(conv: nn.Conv3d, band: RowBand):
    """diffusers ``WanCausalConv3d.forward`` with the row padding taken from the neighbours."""
    def forward(x: torch.Tensor, cache_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = list(conv._padding)  # (W left, W right, H top, H bottom, T front, T back)
        if cache_x is not None and padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        if padding[2]:
            x = exchange_halo(x, padding[2], band)
            padding[2] = padding[3] = 0
        return nn.Conv3d.forward(conv, F.pad(x, padding))
    return forward


def _conv2d_forward(conv: nn.Conv2d, band: RowBand):
    """A stride-1 zero-padded ``nn.Conv2d`` with its row padding taken from the neighbours."""
    pad_h, pad_w = conv.padding

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(exchange_halo(x, pad_h, band), conv.weight, conv.bias, conv.stride, (0, pad_w),
                        conv.dilation, conv.groups)
    return forward


def _frame_attention_forward(block: nn.Module, band: RowBand, sizes: list[int]):
    """diffusers' VAE ``WanAttentionBlock`` (one head over each frame's pixels) for a band of rows:
    keys and values of the whole frame, queries of this band."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        identity = x
        batch, channels, frames, height, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        q, k, v = block.to_qkv(block.norm(x)).chunk(3, dim=1)
        k, v = gather_rows(k, band, sizes), gather_rows(v, band, sizes)
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (q, k, v))  # [BF, 1, pixels, C]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).transpose(1, 2).reshape(batch * frames, channels, height, width)
        x = block.proj(x).view(batch, frames, channels, height, width).permute(0, 2, 1, 3, 4)
        return x + identity
    return forward


@contextlib.contextmanager
def rows_split(decoder: nn.Module, band: RowBand, latent_sizes: list[int]) -> Iterator[None]:
    """Within the block, ``decoder`` (diffusers ``WanDecoder3d``) decodes this rank's band of rows."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

    patched: list[nn.Module] = []
    try:
        for module in decoder.modules():
            if isinstance(module, WanCausalConv3d):
                if module.stride[1] != 1:
                    raise ValueError(f"row split needs stride 1 along rows; {module} has {module.stride}")
                module.forward = _causal_conv3d_forward(module, band)
            elif isinstance(module, nn.Conv2d) and module.padding[0] > 0:
                if module.stride[0] != 1 or module.padding_mode != "zeros":
                    raise ValueError(f"row split needs stride-1 zero-padded convolutions; got {module}")
                module.forward = _conv2d_forward(module, band)
            elif isinstance(module, WanAttentionBlock):
                # The middle block runs at the latent resolution (the decoder upsamples after it).
                module.forward = _frame_attention_forward(module, band, latent_sizes)
            else:
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def decode_by_rows(vae_model: nn.Module, z: torch.Tensor, group: dist.ProcessGroup, dst: int = 0
                   ) -> Optional[torch.Tensor]:
    """``vae_model.decode(z)`` (diffusers ``AutoencoderKLWan``) with the rows split over ``group``.

    Collective: every rank of ``group`` calls it with the same ``z`` ``[B, z, F, H', W']``. Returns the
    clamped video ``[B, C, F, H, W]`` on group rank ``dst`` and None on the others.
    """
    if getattr(vae_model, "use_tiling", False):
        raise ValueError("decode_by_rows splits the whole frame; disable the VAE's tiling first")
    band = RowBand(group, dist.get_rank(group), dist.get_world_size(group))
    sizes = row_bands(z.shape[-2], band.world)
    start = sum(sizes[:band.rank])
    ratio = vae_model.config.scale_factor_spatial
    with rows_split(vae_model.decoder, band, sizes):
        video = vae_model.decode(z[..., start:start + sizes[band.rank], :], return_dict=False)[0]
    return gather_rows(video, band, [rows * ratio for rows in sizes], dst=dst)
