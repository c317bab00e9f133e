"""VAE: official .pth vs diffusers layout, strides, latent normalization as diffusers' Wan pipelines do it;
CLIP image encoder: official .pth vs HF folder, penultimate-block features, Wan preprocessing."""
from __future__ import annotations

import pytest
import torch

from wan_model.pipeline.clip import (
    CLIPImageEncoder, clip_config_from_official, hf_clip_to_official, official_clip_to_hf,
)
from wan_model.pipeline.model_dir import detect_model_dir
from wan_model.pipeline.tiny import build_tiny_model_dir
from wan_model.pipeline.vae import (
    WanVAE, diffusers_vae_to_official_key, official_vae_to_diffusers_key, vae_config,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    out = {}
    for variant in ("tiny-t2v", "tiny-ti2v", "tiny-i2v"):
        for layout in ("official", "diffusers"):
            out[variant, layout] = detect_model_dir(build_tiny_model_dir(root / f"{variant}-{layout}", variant, layout))
    return out


def _video(frames, height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1


@pytest.mark.parametrize("variant,kind,stride,z", [("tiny-t2v", "wan2.1", (4, 8, 8), 16),
                                                   ("tiny-ti2v", "wan2.2", (4, 16, 16), 48)])
def test_official_and_diffusers_layouts_agree_and_strides(dirs, variant, kind, stride, z):
    official, diffusers = dirs[variant, "official"], dirs[variant, "diffusers"]
    assert official.vae.is_file() and diffusers.vae.is_dir()
    assert official.vae_kind == diffusers.vae_kind == kind
    a = WanVAE.load(official.vae, kind=kind)
    b = WanVAE.load(diffusers.vae)
    assert a.stride == b.stride == stride and a.z_dim == b.z_dim == z
    size = 2 * stride[1]
    video = _video(5, size, size)
    lat_a, lat_b = a.encode(video), b.encode(video)
    assert lat_a.shape == (1, z, 2, 2, 2)
    assert torch.equal(lat_a, lat_b)
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, z, 2, 2, 2, generator=gen)
    dec_a, dec_b = a.decode(latents), b.decode(latents)
    assert dec_a.shape == (1, 3, 5, size, size)
    assert torch.equal(dec_a, dec_b)
    assert dec_a.min() >= -1 and dec_a.max() <= 1 and dec_a.std() > 0


def test_normalization_matches_diffusers_wan_pipeline_convention(dirs):
    vae = WanVAE.load(dirs["tiny-t2v", "diffusers"].vae)
    model = vae.model
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    assert not torch.allclose(mean, torch.zeros_like(mean))  # the test means something
    video = _video(5, 16, 16, seed=2)
    # WanImageToVideoPipeline.prepare_latents: (argmax latents - mean) * (1 / std).
    raw = model.encode(video).latent_dist.mode()
    torch.testing.assert_close(vae.encode(video), (raw - mean) * (1.0 / std))
    # WanPipeline.__call__ before decode: latents / (1 / std) + mean.
    latents = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    expected = model.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
    torch.testing.assert_close(vae.decode(latents), expected)


def test_tiled_decode_runs_and_shapes(dirs):
    vae = WanVAE.load(dirs["tiny-t2v", "official"].vae)
    latents = torch.randn(1, 16, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    plain = vae.decode(latents)
    vae.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)
    calls = []
    original = vae.model.tiled_decode
    vae.model.tiled_decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    tiled = vae.decode(latents)
    vae.disable_tiling()
    assert calls, "the tiled path did not run"
    assert tiled.shape == plain.shape == (1, 3, 1, 48, 48)
    # Blending overlapping tiles of a random decoder is not exact, but it is the same picture.
    assert (tiled - plain).abs().mean() < 0.5 * plain.abs().mean()


def test_bad_shapes_are_named(dirs):
    vae = WanVAE.load(dirs["tiny-t2v", "official"].vae)
    with pytest.raises(ValueError, match="4n\\+1"):
        vae.encode(_video(4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(_video(5, 12, 16))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 48, 1, 2, 2))
    with pytest.raises(ValueError, match="wan2.1 VAE, not wan2.2"):
        WanVAE.load(dirs["tiny-t2v", "official"].vae, kind="wan2.2")


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_release_key_names(kind):
    """The real-size config maps to the release names (facts of diffusers' convert_wan_to_diffusers.py)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        model = AutoencoderKLWan(**vae_config(kind))
    keys = list(model.state_dict())
    official = {diffusers_vae_to_official_key(k, kind) for k in keys}
    assert len(official) == len(keys)
    assert all(official_vae_to_diffusers_key(diffusers_vae_to_official_key(k, kind), kind) == k for k in keys)
    common = ["conv1.weight", "conv2.bias", "encoder.conv1.weight", "decoder.conv1.weight", "encoder.head.0.gamma",
              "decoder.head.2.weight", "encoder.middle.0.residual.0.gamma", "decoder.middle.1.to_qkv.weight",
              "decoder.middle.2.residual.6.weight"]
    if kind == "wan2.1":
        expected = common + ["encoder.downsamples.0.residual.2.weight", "encoder.downsamples.2.resample.1.weight",
                             "encoder.downsamples.5.time_conv.weight", "decoder.upsamples.3.time_conv.weight",
                             "decoder.upsamples.4.shortcut.weight", "decoder.upsamples.14.residual.6.bias"]
    else:
        expected = common + ["encoder.downsamples.0.downsamples.0.residual.2.weight",
                             "encoder.downsamples.1.downsamples.2.time_conv.weight",
                             "decoder.upsamples.0.upsamples.3.time_conv.weight",
                             "decoder.upsamples.3.upsamples.2.residual.6.weight"]
    missing = [k for k in expected if k not in official]
    assert not missing, missing


# ---- CLIP ---------------------------------------------------------------------------------------


def test_clip_official_and_hf_layouts_agree_and_give_penultimate_states(dirs):
    official, hf = dirs["tiny-i2v", "official"], dirs["tiny-i2v", "diffusers"]
    a = CLIPImageEncoder.load(official.clip)
    b = CLIPImageEncoder.load(hf.clip)
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(5)) * 2 - 1
    fa, fb = a.encode(images), b.encode(images)
    assert fa.shape == (2, 257, 32)  # 1 + (224/14)^2 tokens, width = tiny-i2v image_dim
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    # Penultimate block = run all layers but the last on the pre-normed embeddings, no final norm.
    model = b.model
    vision = getattr(model, "vision_model", model)
    x = vision.pre_layrnorm(vision.embeddings(b.preprocess(images)))
    for layer in vision.encoder.layers[:-1]:
        out = layer(x, None)
        x = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple, 5 a tensor
    torch.testing.assert_close(fa, x, rtol=1e-5, atol=1e-5)


def test_clip_preprocessing_is_wan_resize_and_normalize(dirs):
    enc = CLIPImageEncoder.load(dirs["tiny-i2v", "official"].clip)
    white = torch.ones(1, 3, 40, 60)
    pixels = enc.preprocess(white)
    assert pixels.shape == (1, 3, 224, 224)
    expected = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(pixels[0, :, 100, 100], expected)


def test_clip_key_names_round_trip(dirs):
    state = torch.load(dirs["tiny-i2v", "official"].clip, weights_only=True)
    for key in ["visual.patch_embedding.weight", "visual.cls_embedding", "visual.pos_embedding",
                "visual.pre_norm.weight", "visual.transformer.0.attn.to_qkv.weight", "visual.transformer.2.mlp.2.bias",
                "visual.post_norm.bias"]:
        assert key in state, key
    assert state["visual.cls_embedding"].shape == (1, 1, 32) and state["visual.pos_embedding"].shape == (1, 257, 32)
    hf = official_clip_to_hf(state)
    back = hf_clip_to_official(hf)
    assert back.keys() == {k for k in state if k.startswith("visual.")}
    assert all(torch.equal(back[k], state[k]) for k in back)
    config = clip_config_from_official(state)
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (32, 3, 224, 14)


def test_release_size_clip_vit_h_names_map_both_ways():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                              image_size=224, patch_size=14, hidden_act="gelu")
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    hf = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    official = hf_clip_to_official(hf, prefix)
    assert official["visual.transformer.31.attn.to_qkv.weight"].shape == (3840, 1280)
    assert official["visual.pos_embedding"].shape == (1, 257, 1280)
    assert set(official_clip_to_hf(official, prefix)) == set(hf)
    derived = clip_config_from_official(official)
    assert (derived.hidden_size, derived.num_attention_heads, derived.num_hidden_layers, derived.intermediate_size) == (
        1280, 16, 32, 5120)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_vae_and_clip_close_to_cpu(dirs, monkeypatch):
    # fp32 means fp32 here: cuDNN convolutions default to TF32 on Ampere+ (fine in production, not for 1e-3).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for variant in ("tiny-t2v", "tiny-ti2v"):
        files = dirs[variant, "official"]
        z = 48 if variant == "tiny-ti2v" else 16
        latents = torch.randn(1, z, 2, 2, 2, generator=torch.Generator().manual_seed(9))
        cpu = WanVAE.load(files.vae).decode(latents)
        gpu = WanVAE.load(files.vae, device="cuda").decode(latents)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
    files = dirs["tiny-i2v", "official"]
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(10)) * 2 - 1
    cpu = CLIPImageEncoder.load(files.clip).encode(images)
    gpu = CLIPImageEncoder.load(files.clip, device="cuda").encode(images)
    assert gpu.dtype == torch.float16
    torch.testing.assert_close(gpu.float().cpu(), cpu, rtol=2e-2, atol=2e-2)


def test_clip_matches_official_visual_semantics_on_official_weights(dirs):
    """Peer check of the name mapping: official VisionTransformer(use_31_block=True) written out on the .pth."""
    import torch.nn.functional as F

    files = dirs["tiny-i2v", "official"]
    enc = CLIPImageEncoder.load(files.clip)
    w = {k: v.float() for k, v in torch.load(files.clip, weights_only=True).items()}
    images = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(11)) * 2 - 1
    pixels = enc.preprocess(images)
    b, heads = pixels.shape[0], 2  # tiny tower: width 32, 2 heads
    x = F.conv2d(pixels, w["visual.patch_embedding.weight"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([w["visual.cls_embedding"].expand(b, -1, -1), x], dim=1) + w["visual.pos_embedding"]
    ln = lambda t, name: F.layer_norm(t, t.shape[-1:], w[name + ".weight"], w[name + ".bias"], 1e-5)  # noqa: E731
    x = ln(x, "visual.pre_norm")
    layers = len({k.split(".")[2] for k in w if k.startswith("visual.transformer.")})
    for i in range(layers - 1):  # use_31_block: all blocks but the last
        p = f"visual.transformer.{i}."
        h = ln(x, p + "norm1")
        qkv = F.linear(h, w[p + "attn.to_qkv.weight"], w[p + "attn.to_qkv.bias"]).view(b, x.shape[1], 3, heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, x.shape[1], -1)
        x = x + F.linear(attn, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]))
        x = x + F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    torch.testing.assert_close(enc.encode(images), x, rtol=1e-5, atol=1e-5)


def test_vae_key_mapping_facts():
    """Individual renames stated by diffusers' convert_wan_to_diffusers.py (convert_vae / convert_vae_22)."""
    facts21 = {
        "encoder.middle.0.residual.2.weight": "encoder.mid_block.resnets.0.conv1.weight",
        "decoder.middle.2.residual.3.gamma": "decoder.mid_block.resnets.1.norm2.gamma",
        "encoder.middle.1.to_qkv.weight": "encoder.mid_block.attentions.0.to_qkv.weight",
        "encoder.head.0.gamma": "encoder.norm_out.gamma",
        "decoder.head.2.bias": "decoder.conv_out.bias",
        "conv1.weight": "quant_conv.weight",
        "conv2.bias": "post_quant_conv.bias",
        "encoder.conv1.weight": "encoder.conv_in.weight",
        "encoder.downsamples.3.shortcut.weight": "encoder.down_blocks.3.conv_shortcut.weight",
        "encoder.downsamples.5.time_conv.weight": "encoder.down_blocks.5.time_conv.weight",
        "decoder.upsamples.6.residual.6.weight": "decoder.up_blocks.1.resnets.2.conv2.weight",
        "decoder.upsamples.4.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.upsamples.7.resample.1.weight": "decoder.up_blocks.1.upsamplers.0.resample.1.weight",
        "decoder.upsamples.11.resample.1.bias": "decoder.up_blocks.2.upsamplers.0.resample.1.bias",
        "decoder.upsamples.3.time_conv.weight": "decoder.up_blocks.0.upsamplers.0.time_conv.weight",
        "decoder.upsamples.14.residual.0.gamma": "decoder.up_blocks.3.resnets.2.norm1.gamma",
    }
    facts22 = {
        "encoder.downsamples.0.downsamples.1.residual.6.bias": "encoder.down_blocks.0.resnets.1.conv2.bias",
        "encoder.downsamples.1.downsamples.2.time_conv.weight": "encoder.down_blocks.1.downsampler.time_conv.weight",
        "encoder.downsamples.0.downsamples.2.resample.1.weight": "encoder.down_blocks.0.downsampler.resample.1.weight",
        "decoder.upsamples.0.upsamples.3.resample.1.weight": "decoder.up_blocks.0.upsampler.resample.1.weight",
        "decoder.upsamples.1.upsamples.0.shortcut.weight": "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
        "decoder.middle.1.proj.bias": "decoder.mid_block.attentions.0.proj.bias",
    }
    for kind, facts in (("wan2.1", facts21), ("wan2.2", facts22)):
        for official, diffusers in facts.items():
            assert official_vae_to_diffusers_key(official, kind) == diffusers, (kind, official)
            assert diffusers_vae_to_official_key(diffusers, kind) == official, (kind, diffusers)
