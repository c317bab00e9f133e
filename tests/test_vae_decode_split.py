"""The VAE decode split by rows over N gloo ranks gives the whole-frame decode of one rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_ranks
from wan_model.parallel.vae_decode import row_bands

LATENT = {"frames": 3, "height": 7, "width": 5}  # 7 rows: uneven bands on 2 and 3 ranks


def _vae(kind: str):
    from wan_model.pipeline.tiny import _randomize, _tiny_vae

    vae = _tiny_vae(kind)
    _randomize(vae, 7)
    return vae


def _latents(vae) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, vae.config.z_dim, LATENT["frames"], LATENT["height"], LATENT["width"], generator=g)


def _split_decode(rank: int, world: int, kind: str, zero_halo: bool):
    import wan_model.parallel.vae_decode as vae_decode

    if zero_halo:  # the control: bands padded with zeros, as independent tiles would be
        def zeros(x, halo, band):
            pad = torch.zeros_like(x[..., :halo, :])
            return torch.cat([pad, x, pad], dim=-2)
        vae_decode.exchange_halo = zeros
    vae = _vae(kind)
    with torch.no_grad():
        video = vae_decode.decode_by_rows(vae, _latents(vae), dist.group.WORLD, dst=world - 1)
    return None if video is None else video.numpy()  # by value: a shared tensor dies with its process


@pytest.mark.parametrize("kind, world", [("wan2.1", 3), ("wan2.2", 2)])
def test_split_decode_equals_whole_frame_decode(kind, world):
    vae = _vae(kind)
    with torch.no_grad():
        whole = vae.decode(_latents(vae), return_dict=False)[0]
    results = run_ranks(_split_decode, world, kind, False, timeout=180)
    assert all(r is None for r in results[:-1])  # only the destination rank gets the video
    split = torch.from_numpy(results[-1])
    assert split.shape == whole.shape
    assert whole.abs().amax() > 0.05  # a video, not a blank frame
    err = (split - whole).abs().amax().item()
    print(f"{kind} on {world} ranks: max abs difference {err:.2e}")
    assert err < 2e-5, f"{kind} on {world} ranks: max abs difference {err}"


def test_split_decode_without_halo_differs():
    """The check above can fail: zero padding at the band edges instead of the neighbours' rows."""
    vae = _vae("wan2.1")
    with torch.no_grad():
        whole = vae.decode(_latents(vae), return_dict=False)[0]
    split = torch.from_numpy(run_ranks(_split_decode, 2, "wan2.1", True, timeout=180)[-1])
    assert (split - whole).abs().amax().item() > 1e-2


def test_row_bands():
    assert row_bands(7, 3) == [3, 2, 2]
    assert row_bands(90, 4) == [23, 23, 22, 22]
    assert sum(row_bands(60, 8)) == 60
    with pytest.raises(ValueError, match="cannot split 3 latent rows over 4 ranks"):
        row_bands(3, 4)


def test_split_decode_refuses_tiling():
    from wan_model.parallel.vae_decode import decode_by_rows

    vae = _vae("wan2.1")
    vae.enable_tiling()
    with pytest.raises(ValueError, match="disable the VAE's tiling"):
        decode_by_rows(vae, _latents(vae), group=None)
