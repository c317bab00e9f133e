"""The VAE decode and encode split by rows over N gloo ranks give the whole-frame pass of one rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_ranks
from wan_model.parallel.vae_rows import row_bands

LATENT = {"frames": 3, "height": 7, "width": 5}  # 7 rows: uneven bands on 2 and 3 ranks


def _vae(kind: str):
    from wan_model.pipeline.tiny import _randomize, _tiny_vae

    vae = _tiny_vae(kind)
    _randomize(vae, 7)
    return vae


def _latents(vae) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(1, vae.config.z_dim, LATENT["frames"], LATENT["height"], LATENT["width"], generator=g)


def _video(vae) -> torch.Tensor:
    """A video of the latents' size: smooth, as images are, with some noise on top."""
    g = torch.Generator().manual_seed(5)
    ratio = vae.config.scale_factor_spatial
    frames, height, width = 4 * (LATENT["frames"] - 1) + 1, LATENT["height"] * ratio, LATENT["width"] * ratio
    coarse = torch.rand(1, 3, frames, LATENT["height"], LATENT["width"], generator=g) * 2 - 1
    video = torch.nn.functional.interpolate(coarse, size=(frames, height, width), mode="trilinear")
    return (video + 0.1 * torch.randn(video.shape, generator=g)).clamp(-1, 1)


def _zero_halo():
    """The control: bands padded with zeros, as independent tiles would be."""
    import wan_model.parallel.vae_rows as vae_rows

    def zeros(x, above, below, band):
        return torch.cat([torch.zeros_like(x[..., :above, :]), x, torch.zeros_like(x[..., :below, :])], dim=-2)
    vae_rows.exchange_rows = zeros


def _split_decode(rank: int, world: int, kind: str, zero_halo: bool):
    from wan_model.parallel.vae_rows import decode_by_rows

    if zero_halo:
        _zero_halo()
    vae = _vae(kind)
    with torch.no_grad():
        video = decode_by_rows(vae, _latents(vae), dist.group.WORLD, dst=world - 1)
    return None if video is None else video.numpy()  # by value: a shared tensor dies with its process


def _split_encode(rank: int, world: int, kind: str, zero_halo: bool):
    from wan_model.parallel.vae_rows import encode_by_rows

    if zero_halo:
        _zero_halo()
    vae = _vae(kind)
    with torch.no_grad():
        return encode_by_rows(vae, _video(vae), dist.group.WORLD).numpy()


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


@pytest.mark.parametrize("kind, world", [("wan2.1", 2), ("wan2.2", 3)])
def test_split_encode_equals_whole_frame_encode(kind, world):
    vae = _vae(kind)
    with torch.no_grad():
        whole = vae.encode(_video(vae)).latent_dist.mode()
    assert tuple(whole.shape[-3:]) == (LATENT["frames"], LATENT["height"], LATENT["width"])
    results = run_ranks(_split_encode, world, kind, False, timeout=180)
    for rank, result in enumerate(results):  # every rank gets the whole latents
        split = torch.from_numpy(result)
        assert split.shape == whole.shape
        err = (split - whole).abs().amax().item()
        print(f"{kind} on {world} ranks, rank {rank}: max abs difference {err:.2e} (latents up to "
              f"{whole.abs().amax():.2f})")
        assert err < 2e-5 * max(1.0, whole.abs().amax().item()), f"rank {rank}: max abs difference {err}"


def test_split_encode_without_halo_differs():
    """The encode check can fail too: zero rows at the band edges, for the convolutions and the
    downsamplers' bottom pad alike."""
    vae = _vae("wan2.1")
    with torch.no_grad():
        whole = vae.encode(_video(vae)).latent_dist.mode()
    split = torch.from_numpy(run_ranks(_split_encode, 2, "wan2.1", True, timeout=180)[0])
    assert (split - whole).abs().amax().item() > 1e-2 * whole.abs().amax().item()


def test_split_encode_refuses_a_height_off_the_stride():
    from wan_model.parallel.vae_rows import encode_by_rows

    vae = _vae("wan2.1")
    with pytest.raises(ValueError, match="multiple of 8; got 60"):
        encode_by_rows(vae, torch.zeros(1, 3, 1, 60, 40), group=dist.group.WORLD)


def test_row_bands():
    assert row_bands(7, 3) == [3, 2, 2]
    assert row_bands(90, 4) == [23, 23, 22, 22]
    assert sum(row_bands(60, 8)) == 60
    with pytest.raises(ValueError, match="cannot split 3 latent rows over 4 ranks"):
        row_bands(3, 4)


def test_split_refuses_tiling():
    from wan_model.parallel.vae_rows import decode_by_rows, encode_by_rows

    vae = _vae("wan2.1")
    vae.enable_tiling()
    with pytest.raises(ValueError, match="decode_by_rows splits the whole frame; disable the VAE's tiling"):
        decode_by_rows(vae, _latents(vae), group=None)
    with pytest.raises(ValueError, match="encode_by_rows splits the whole frame; disable the VAE's tiling"):
        encode_by_rows(vae, _video(vae), group=None)
