"""3-D rotary position embedding (RoPE) for the video tokens, as in official Wan ``rope_params``/``rope_apply``.

Each head's ``head_dim`` channels form ``head_dim / 2`` interleaved pairs ``(x[2i], x[2i+1])``, read as
complex numbers. The pairs are split between the three axes of the latent grid,
(frame, height, width) = (d - 4(d//6), 2(d//6), 2(d//6)) channels, and each pair is rotated by
``position_on_its_axis * theta ** (-2j / axis_dim)``.

Under sequence parallelism a rank only needs the rotations of its own tokens, so the tables are
built for a range of positions of the flattened (F, H, W) grid, not for the whole video.
"""
from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (frame, height, width) axes, as in official Wan."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def _axis_angles(positions: torch.Tensor, axis_dim: int, theta: float) -> torch.Tensor:
    """[N, axis_dim / 2] rotation angles (float64, as the official tables are built)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64, device=positions.device) / axis_dim)
    return torch.outer(positions.to(torch.float64), inv_freq)


def rope_frequencies(
    head_dim: int,
    grid: tuple[int, int, int],
    start: int,
    end: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Complex rotations ``[end - start, head_dim / 2]`` (complex64) for flattened grid positions [start, end).

    ``grid`` is the token grid (frames, height, width) after patchify; position ``p`` is token
    ``(p // (H*W), (p // W) % H, p % W)``. Positions past the grid (sequence-parallel padding) are
    clamped to the last token: their outputs are discarded, they only need valid numbers.
    """
    frames, height, width = grid
    length = frames * height * width
    positions = torch.arange(start, end, device=device).clamp(max=length - 1)
    f_pos, h_pos, w_pos = positions // (height * width), (positions // width) % height, positions % width
    f_dim, h_dim, w_dim = rope_axis_dims(head_dim)
    angles = torch.cat(
        [_axis_angles(f_pos, f_dim, theta), _axis_angles(h_pos, h_dim, theta), _axis_angles(w_pos, w_dim, theta)],
        dim=1,
    )
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, L, heads, head_dim] by ``freqs`` [L, head_dim / 2]; computed in fp32.

    ``freqs`` is the complex table of ``rope_frequencies`` or its ``torch.view_as_real`` form
    [L, head_dim / 2, 2] (cos, sin). The rotation is written in real arithmetic so that
    ``torch.compile`` fuses it with the neighbouring casts (Inductor has no complex kernels).
    """
    if freqs.is_complex():
        freqs = torch.view_as_real(freqs)
    cos, sin = freqs[None, :, None, :, 0], freqs[None, :, None, :, 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)
