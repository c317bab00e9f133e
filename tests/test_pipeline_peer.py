"""Peer checks of whole generations: our pipeline against diffusers' Wan pipelines on the same weights.

Each test writes one tiny model folder in the diffusers release layout, generates with our
``Generator`` from it, then runs diffusers' own pipeline (``WanPipeline`` or
``WanImageToVideoPipeline``) from the same folder with the same noise, the same official sigmas,
prompt, negative prompt and guidance, and compares the final latents (float32 on the CPU). This
covers what each variant adds to text-to-video: the A14B expert switch and its guidance pair, the
Wan2.1 I2V image conditioning (CLIP features, mask, VAE-encoded first frame) and TI2V-5B's per-token
timesteps with the image latent held in frame 0.

Images are given at the video's size so that neither side resizes them (the two resize with different
filters when they do).
"""
from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from wan_model.config import VARIANTS, get_variant
from wan_model.pipeline.components import ensure_tiny_model_dir
from wan_model.pipeline.generator import Generator, GeneratorConfig
from wan_model.pipeline.model_dir import detect_model_dir
from wan_model.pipeline.request import GenerationRequest
from wan_model.pipeline.schedulers import base_sigmas

from test_generator import png_bytes, tiny_cache

pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "a cat surfing", "blurry"
ATOL = 1e-4


def official_unipc(shift: float):
    """diffusers' UniPC on the official schedule: its default flow sigmas start at 1.0, official Wan's
    (ours) at 1 - 1/1000."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                        num_train_timesteps=1000, solver_order=2, final_sigmas_type="zero")
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(sigmas=base_sigmas(n), device=device)
    return scheduler


def ours_then_theirs(folder, cache: str, pipeline_class, tmp_path, *, image=None, variant: str | None = None,
                     guidance, steps: int = 6, shift: float = 3.0, seed: int = 3, **video):
    """Final latents of our generator and of diffusers' ``pipeline_class`` from ``folder``, and our result.
    ``image``: PNG bytes; diffusers gets the decoded image."""
    g = Generator(GeneratorConfig(model=str(folder), variant=variant, cache_dir=cache))
    result = g.generate(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, output_dir=str(tmp_path),
                                          steps=steps, shift=shift, seed=seed, guidance=guidance,
                                          image=image, **video))
    ours = g.last_latents

    pipe = pipeline_class.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = official_unipc(shift)
    noise = torch.randn(ours.shape, generator=torch.Generator().manual_seed(seed))
    # Ours takes guidance (low-noise, high-noise) for A14B; diffusers takes the high-noise expert's
    # (`transformer`) as guidance_scale and the low-noise one's (`transformer_2`) as guidance_scale_2.
    extra = {"guidance_scale": guidance}
    if isinstance(guidance, tuple):
        extra = {"guidance_scale": guidance[1], "guidance_scale_2": guidance[0]}
    if image is not None:
        from PIL import Image

        extra["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    theirs = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, latents=noise,
                  output_type="latent", height=video["height"], width=video["width"],
                  num_frames=video["num_frames"], **extra).frames
    return ours, theirs.float(), result


def assert_same_latents(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.abs().mean() > 0.1, "the latents must carry signal for the comparison to mean anything"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_t2v_matches_diffusers_wan_pipeline(tmp_path_factory, tmp_path):
    from diffusers import WanPipeline

    cache = tiny_cache(tmp_path_factory)
    folder = ensure_tiny_model_dir("tiny-t2v", cache, layout="diffusers")
    ours, theirs, _ = ours_then_theirs(folder, cache, WanPipeline, tmp_path, guidance=5.0, steps=3, shift=5.0,
                                       num_frames=5, width=32, height=32)
    assert_same_latents(ours, theirs)


def test_a14b_matches_diffusers_with_both_experts_and_their_guidance(tmp_path_factory, tmp_path):
    """Wan2.2 T2V A14B: the high-noise expert (diffusers' ``transformer``) above the boundary, the
    low-noise one (``transformer_2``) below it, each with its own guidance scale."""
    from diffusers import WanPipeline

    cache = tiny_cache(tmp_path_factory)
    folder = ensure_tiny_model_dir("tiny-a14b", cache, layout="diffusers")
    ours, theirs, result = ours_then_theirs(folder, cache, WanPipeline, tmp_path, guidance=(2.0, 6.0),
                                            num_frames=5, width=32, height=32)
    assert set(result.experts_per_step) == {"high_noise", "low_noise"}, "the schedule must cross the boundary"
    assert_same_latents(ours, theirs)


def test_wan21_i2v_matches_diffusers_image_to_video(tmp_path_factory, tmp_path):
    """Wan2.1 I2V: CLIP image features in cross-attention, the first-frame mask and the VAE-encoded
    image (then zero frames) as 20 extra input channels."""
    from diffusers import WanImageToVideoPipeline

    cache = tiny_cache(tmp_path_factory)
    folder = ensure_tiny_model_dir("tiny-i2v", cache, layout="diffusers")
    # 224 x 224: CLIP's own input size, so neither side resizes the image for CLIP either.
    ours, theirs, _ = ours_then_theirs(folder, cache, WanImageToVideoPipeline, tmp_path, image=png_bytes(224, 224),
                                       guidance=5.0, steps=4, num_frames=5, width=224, height=224)
    assert_same_latents(ours, theirs)


@pytest.fixture
def tiny_i2v_a14b(monkeypatch):
    """A tiny Wan2.2 I2V A14B (two experts, image latents as extra channels, no CLIP) as a variant."""
    base = get_variant("tiny-a14b")
    spec = replace(base, name="tiny-i2v-a14b", task="i2v", boundary=0.9, guidance=(3.5, 3.5), shift=5.0,
                   transformer=replace(base.transformer, model_type="i2v", in_dim=36))
    monkeypatch.setitem(VARIANTS, spec.name, spec)
    return spec


def test_wan22_i2v_a14b_matches_diffusers_image_to_video(tmp_path_factory, tmp_path, tiny_i2v_a14b):
    from diffusers import WanImageToVideoPipeline

    cache = tiny_cache(tmp_path_factory)
    folder = ensure_tiny_model_dir(tiny_i2v_a14b.name, cache, layout="diffusers")
    ours, theirs, result = ours_then_theirs(folder, cache, WanImageToVideoPipeline, tmp_path,
                                            image=png_bytes(32, 32), variant=tiny_i2v_a14b.name,
                                            guidance=(2.0, 6.0), shift=5.0, num_frames=5, width=32, height=32)
    assert set(result.experts_per_step) == {"high_noise", "low_noise"}, "the schedule must cross the boundary"
    assert_same_latents(ours, theirs)


def test_ti2v_with_an_image_matches_diffusers_expand_timesteps(tmp_path_factory, tmp_path):
    """Wan2.2 TI2V-5B with an image: per-token timesteps (0 on the first latent frame) and the image
    latent held in frame 0, through diffusers' ``expand_timesteps`` path."""
    from diffusers import WanImageToVideoPipeline

    cache = tiny_cache(tmp_path_factory)
    folder = ensure_tiny_model_dir("tiny-ti2v", cache, layout="diffusers")
    ours, theirs, _ = ours_then_theirs(folder, cache, WanImageToVideoPipeline, tmp_path, image=png_bytes(64, 64),
                                       guidance=5.0, shift=5.0, num_frames=9, width=64, height=64)
    assert_same_latents(ours, theirs)


def test_ti2v_without_an_image_matches_diffusers_wan_pipeline(tmp_path_factory, tmp_path):
    from diffusers import WanPipeline

    cache = tiny_cache(tmp_path_factory)
    folder = ensure_tiny_model_dir("tiny-ti2v", cache, layout="diffusers")
    ours, theirs, _ = ours_then_theirs(folder, cache, WanPipeline, tmp_path, guidance=5.0, shift=5.0,
                                       num_frames=9, width=64, height=64)
    assert_same_latents(ours, theirs)


@pytest.mark.parametrize("variant, image_size", [("tiny-t2v", None), ("tiny-a14b", None), ("tiny-i2v", 224),
                                                 ("tiny-ti2v", 64)])
def test_official_and_diffusers_folders_of_the_same_weights_generate_the_same_latents(
        tmp_path_factory, tmp_path, variant, image_size):
    """The official release layout loads through other code (the T5 and VAE ``.pth`` files, the CLIP
    ``.pth``, the expert subfolders); on the same weights it must end where the diffusers layout
    does, which the tests above tie to diffusers' own pipelines."""
    cache = tiny_cache(tmp_path_factory)
    size = image_size or 32
    image = png_bytes(size, size) if image_size else None
    latents = {}
    for layout in ("official", "diffusers"):
        folder = ensure_tiny_model_dir(variant, cache, layout=layout)
        assert detect_model_dir(folder).layout == layout
        g = Generator(GeneratorConfig(model=str(folder), cache_dir=cache))
        g.generate(GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, output_dir=str(tmp_path / layout),
                                     steps=4, shift=3.0, seed=5, guidance=(2.0, 6.0) if "a14b" in variant else 5.0,
                                     image=image, num_frames=5, width=size, height=size))
        latents[layout] = g.last_latents
    assert latents["official"].abs().mean() > 0.1
    torch.testing.assert_close(latents["official"], latents["diffusers"], rtol=0, atol=ATOL)
