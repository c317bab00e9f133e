"""The Wan VAE split by rows over the ranks of a group (patch parallelism), for decode and encode.

Each rank runs one band of rows through the unchanged diffusers decoder or encoder. Every layer that
pads rows takes its missing rows from the ranks above and below instead of zeros ("halo"), so every
output row is the row the whole-frame pass computes, up to the float rounding of the convolution
algorithms:
- the 3x3x3 causal convolutions and the 3x3 convolutions after each upsampling (one row each side);
- the encoder's downsamplers, a zero pad of one row at the bottom before a stride-2 3x3 convolution:
  the pad takes the first row of the band below. Bands are whole latent rows, so every band starts
  on an even row at every level and the stride-2 windows fall where the whole frame's do.
The rest is per pixel and needs nothing: RMS norm over channels, nearest upsampling, 1x1
convolutions, ``DupUp3D``/``AvgDown3D`` and Wan2.2's (un)patchify. The one attention (the middle
block, one head over each frame) gathers the whole frame's keys and values and attends from this
band's queries. Finally the bands are gathered.

Halos are exchanged with point-to-point sends, one row per neighbour per layer (a few hundred
kilobytes), so the VAE scales with the number of ranks while the video stays the same.

    video = decode_by_rows(vae_model, z, group)   # [B, 3, F, H, W] on rank ``dst`` of group, else None
    mu = encode_by_rows(vae_model, video, group)  # [B, z, F', H', W'] (the posterior mean) on every rank

``z`` (already de-normalized: the decoder's input) and ``video`` must be the same on every rank.
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


def exchange_rows(x: torch.Tensor, above: int, below: int, band: RowBand) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., above + H + below, W]``: the last ``above`` rows of the rank above and
    the first ``below`` rows of the rank below (zeros at the top and bottom of the frame, as the
    layer's own zero padding would give). Every rank of the band's group calls it with the same counts."""
    if x.shape[-2] < max(above, below):
        raise ValueError(f"a band of {x.shape[-2]} rows cannot lend a halo of {max(above, below)} rows")
    # new_zeros, not zeros_like: receive buffers must be contiguous whatever x's strides are.
    top = x.new_zeros((*x.shape[:-2], above, x.shape[-1]))
    bottom = x.new_zeros((*x.shape[:-2], below, x.shape[-1]))
    ops = []
    if band.rank > 0:  # the rank above wants our first ``below`` rows; we want its last ``above``
        if below:
            ops.append(dist.P2POp(dist.isend, x[..., :below, :].contiguous(), band.peer(band.rank - 1), band.group))
        if above:
            ops.append(dist.P2POp(dist.irecv, top, band.peer(band.rank - 1), band.group))
    if band.rank < band.world - 1:
        if above:
            ops.append(dist.P2POp(dist.isend, x[..., -above:, :].contiguous(), band.peer(band.rank + 1), band.group))
        if below:
            ops.append(dist.P2POp(dist.irecv, bottom, band.peer(band.rank + 1), band.group))
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


# ---- the row-mixing layers, each given a halo-taking forward for the duration of a pass ----

def _causal_conv3d_forward(conv: nn.Conv3d, band: RowBand):
    """diffusers ``WanCausalConv3d.forward`` with the row padding taken from the neighbours."""
    def forward(x: torch.Tensor, cache_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = list(conv._padding)  # (W left, W right, H top, H bottom, T front, T back)
        if cache_x is not None and padding[4] > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]
        if padding[2]:
            x = exchange_rows(x, padding[2], padding[3], band)
            padding[2] = padding[3] = 0
        return nn.Conv3d.forward(conv, F.pad(x, padding))
    return forward


def _conv2d_forward(conv: nn.Conv2d, band: RowBand):
    """A stride-1 zero-padded ``nn.Conv2d`` with its row padding taken from the neighbours."""
    pad_h, pad_w = conv.padding

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(exchange_rows(x, pad_h, pad_h, band), conv.weight, conv.bias, conv.stride, (0, pad_w),
                        conv.dilation, conv.groups)
    return forward


def _zero_pad2d_forward(pad: nn.ZeroPad2d, band: RowBand):
    """``nn.ZeroPad2d`` (the encoder's downsamplers) with its row padding taken from the neighbours."""
    left, right, top, bottom = pad.padding

    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.pad(exchange_rows(x, top, bottom, band), (left, right, 0, 0))
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
def rows_split(coder: nn.Module, band: RowBand, latent_sizes: list[int]) -> Iterator[None]:
    """Within the block, ``coder`` (diffusers ``WanDecoder3d`` or ``WanEncoder3d``) runs this rank's band
    of rows. ``latent_sizes``: every rank's band in latent rows (the middle block's resolution)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanCausalConv3d

    patched: list[nn.Module] = []
    try:
        for module in coder.modules():
            if isinstance(module, WanCausalConv3d):
                if module.stride[1] != 1:
                    raise ValueError(f"row split needs stride 1 along rows; {module} has {module.stride}")
                module.forward = _causal_conv3d_forward(module, band)
            elif isinstance(module, nn.Conv2d) and module.padding[0] > 0:
                # (The encoder's stride-2 convolutions pad nothing themselves: a ZeroPad2d before them does.)
                if module.stride[0] != 1 or module.padding_mode != "zeros":
                    raise ValueError(f"row split needs stride-1 zero-padded convolutions; got {module}")
                module.forward = _conv2d_forward(module, band)
            elif isinstance(module, nn.ZeroPad2d):
                module.forward = _zero_pad2d_forward(module, band)
            elif isinstance(module, WanAttentionBlock):
                # The middle block runs at the latent resolution (between the samplers and the head).
                module.forward = _frame_attention_forward(module, band, latent_sizes)
            else:
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _band(vae_model: nn.Module, group: dist.ProcessGroup, what: str) -> RowBand:
    if getattr(vae_model, "use_tiling", False):
        raise ValueError(f"{what} splits the whole frame; disable the VAE's tiling first")
    return RowBand(group, dist.get_rank(group), dist.get_world_size(group))


def decode_by_rows(vae_model: nn.Module, z: torch.Tensor, group: dist.ProcessGroup, dst: int = 0
                   ) -> Optional[torch.Tensor]:
    """``vae_model.decode(z)`` (diffusers ``AutoencoderKLWan``) with the rows split over ``group``.

    Collective: every rank of ``group`` calls it with the same ``z`` ``[B, z, F, H', W']``. Returns the
    clamped video ``[B, C, F, H, W]`` on group rank ``dst`` and None on the others.
    """
    band = _band(vae_model, group, "decode_by_rows")
    sizes = row_bands(z.shape[-2], band.world)
    start = sum(sizes[:band.rank])
    ratio = vae_model.config.scale_factor_spatial
    with rows_split(vae_model.decoder, band, sizes):
        video = vae_model.decode(z[..., start:start + sizes[band.rank], :], return_dict=False)[0]
    return gather_rows(video, band, [rows * ratio for rows in sizes], dst=dst)


def encode_by_rows(vae_model: nn.Module, video: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``vae_model.encode(video).latent_dist.mode()`` (the posterior mean) with the rows split over ``group``.

    Collective: every rank of ``group`` calls it with the same ``video`` ``[B, C, F, H, W]``, ``H`` a
    multiple of the VAE's spatial stride. Every rank gets the latents ``[B, z, F', H', W']``.
    """
    ratio = vae_model.config.scale_factor_spatial
    if video.shape[-2] % ratio:
        raise ValueError(f"encode_by_rows needs a height that is a multiple of {ratio}; got {video.shape[-2]}")
    band = _band(vae_model, group, "encode_by_rows")
    sizes = row_bands(video.shape[-2] // ratio, band.world)  # whole latent rows: see the module doc
    start = sum(sizes[:band.rank]) * ratio
    with rows_split(vae_model.encoder, band, sizes):
        posterior = vae_model.encode(video[..., start:start + sizes[band.rank] * ratio, :], return_dict=False)[0]
    return gather_rows(posterior.mode(), band, sizes)
