"""Peer check: our WanModel (loaded through our loader) against diffusers.WanTransformer3DModel on the same weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wan_model.config import get_variant
from wan_model.loader import config_to_json, detect_variant, load_transformer
from wan_model.model import WanModel

diffusers = pytest.importorskip("diffusers")

FRAMES, HEIGHT, WIDTH = 3, 6, 8  # non-square latent; tokens = 3 * 3 * 4
TOKENS = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
CONTEXT_LEN = 7  # shorter than text_len: both models see it zero-padded to 512


def _random_diffusers_model(config, seed: int) -> "diffusers.WanTransformer3DModel":
    kwargs = {k: v for k, v in config_to_json(config, "diffusers").items() if not k.startswith("_")}
    model = diffusers.WanTransformer3DModel(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Re-initialise everything (norm weights are ones, biases zeros by default) so no term is trivial.
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            elif param.dim() == 1 or "scale_shift_table" in name:
                param.copy_(0.2 * noise)
            else:
                param.copy_(noise / math.sqrt(param[0].numel()))
    return model.eval()


def _relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-i2v", "tiny-ti2v"])
def test_matches_diffusers(variant: str, tmp_path) -> None:
    torch.manual_seed(0)
    config = get_variant(variant).transformer
    reference = _random_diffusers_model(config, seed=1)
    reference.save_pretrained(tmp_path, safe_serialization=True)

    ours = load_transformer(tmp_path)
    assert ours.config == config
    assert detect_variant(ours.config) == variant

    batch = 2
    latent_channels = config.out_dim
    x = torch.randn(batch, latent_channels, FRAMES, HEIGHT, WIDTH)
    context = torch.randn(batch, CONTEXT_LEN, config.text_dim)
    y = clip_fea = None
    if config.in_dim > latent_channels:
        y = torch.randn(batch, config.in_dim - latent_channels, FRAMES, HEIGHT, WIDTH)
    if config.has_image_branch:
        clip_fea = torch.randn(batch, 257, config.image_dim)
    if variant == "tiny-ti2v":
        timestep = torch.rand(batch, TOKENS) * 1000  # per-token timesteps
        timestep[:, :4] = 0.0  # first-frame tokens clean, as TI2V image conditioning does
    else:
        timestep = torch.tensor([937.0, 211.0])

    with torch.no_grad():
        out = ours(x, timestep, context, clip_fea=clip_fea, y=y)
        ref = reference(
            hidden_states=torch.cat([x, y], dim=1) if y is not None else x,
            timestep=timestep,
            encoder_hidden_states=F.pad(context, (0, 0, 0, config.text_len - CONTEXT_LEN)),
            encoder_hidden_states_image=clip_fea,
            return_dict=False,
        )[0]
    assert out.dtype == torch.float32
    assert out.shape == (batch, config.out_dim, FRAMES, HEIGHT, WIDTH)
    assert ref.abs().max() > 0.1
    assert _relative_error(out, ref) <= 1e-4


def _tiny_t2v_with_inputs() -> tuple[WanModel, torch.Tensor, torch.Tensor]:
    """Seeded tiny T2V model (head not zero, so outputs are non-trivial), latents and a short context."""
    config = get_variant("tiny-t2v").transformer
    torch.manual_seed(0)
    model = WanModel(config).eval()
    torch.nn.init.normal_(model.head.head.weight, std=0.1)
    x = torch.randn(1, 16, FRAMES, HEIGHT, WIDTH)
    return model, x, torch.randn(1, CONTEXT_LEN, config.text_dim)


def test_shorter_context_is_zero_padded() -> None:
    """Passing 7 text tokens is the same as passing them zero-padded to text_len (official behaviour)."""
    model, x, context = _tiny_t2v_with_inputs()
    config = model.config
    t = torch.tensor([500.0])
    with torch.no_grad():
        short = model(x, t, context)
        full = model(x, t, F.pad(context, (0, 0, 0, config.text_len - CONTEXT_LEN)))
    assert short.abs().max() > 0
    torch.testing.assert_close(short, full)


def test_low_precision_parameters_run_close_to_fp32() -> None:
    model, x, context = _tiny_t2v_with_inputs()
    t = torch.tensor([700.0])
    with torch.no_grad():
        ref = model(x, t, context)
        out = model.to(torch.bfloat16)(x, t, context)
    assert out.dtype == torch.float32
    assert _relative_error(out, ref) < 5e-2


def test_bad_inputs_are_named() -> None:
    model = WanModel(get_variant("tiny-t2v").transformer)
    x = torch.randn(1, 16, 2, 4, 4)
    ctx = torch.randn(1, 3, 32)
    with pytest.raises(ValueError, match="latents"):
        model(torch.randn(1, 17, 2, 4, 4), torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match="height"):
        model(torch.randn(1, 16, 2, 5, 4), torch.tensor([1.0]), ctx)
    with pytest.raises(ValueError, match="text_len"):
        model(x, torch.tensor([1.0]), torch.randn(1, 513, 32))
    with pytest.raises(ValueError, match="per token"):
        model(x, torch.ones(1, 5), ctx)
    with pytest.raises(ValueError, match="no image branch"):
        model(x, torch.tensor([1.0]), ctx, clip_fea=torch.randn(1, 257, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
@pytest.mark.parametrize("variant", ["tiny-t2v", "tiny-ti2v"])
def test_matches_diffusers_bf16_on_cuda(variant: str, tmp_path) -> None:
    """Both models in bf16 on the GPU (diffusers keeps its fp32 modules, as from_pretrained does)."""
    config = get_variant(variant).transformer
    _random_diffusers_model(config, seed=1).save_pretrained(tmp_path, safe_serialization=True)
    reference = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).cuda().eval()
    ours = load_transformer(tmp_path, device="cuda", dtype=torch.bfloat16)
    exact = load_transformer(tmp_path, device="cuda", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, config.out_dim, FRAMES, HEIGHT, WIDTH, generator=gen).cuda()
    context = torch.randn(1, config.text_len, config.text_dim, generator=gen).cuda()
    timestep = (torch.rand(1, TOKENS, generator=gen) * 1000 if variant == "tiny-ti2v" else torch.tensor([700.0])).cuda()
    with torch.no_grad():
        truth = exact(x, timestep, context)
        out = ours(x, timestep, context)
        ref = reference(hidden_states=x.bfloat16(), timestep=timestep, encoder_hidden_states=context.bfloat16(),
                        return_dict=False)[0].float()
    # Ours keeps the residual stream in fp32 (like official autocast); it must be at least as close to fp32.
    assert _relative_error(out, truth) <= max(_relative_error(ref, truth), 1e-3) * 1.5
    assert _relative_error(out, truth) < 5e-2
