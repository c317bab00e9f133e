"""Loading and saving transformer checkpoints: layouts, shards, prefixes, configs, and clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wan_model.config import WanConfig, get_variant
from wan_model.loader import (
    CheckpointError,
    config_from_json,
    config_from_shapes,
    detect_variant,
    load_transformer,
    save_transformer,
)
from wan_model.keymap import diffusers_to_official, official_to_diffusers
from wan_model.model import WanModel


def _random_model(variant: str = "tiny-i2v", seed: int = 0) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(get_variant(variant).transformer)
    with torch.no_grad():
        for param in model.parameters():  # no all-zero / all-one tensors: every key is distinguishable
            param.normal_()
    return model


def _assert_same_parameters(a: WanModel, b: WanModel) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_official_and_diffusers_layouts_load_identically(tmp_path) -> None:
    model = _random_model("tiny-i2v")
    save_transformer(model, tmp_path / "official", layout="official")
    save_transformer(model, tmp_path / "diffusers", layout="diffusers")
    keys = set(json.loads((tmp_path / "diffusers" / "config.json").read_text()))
    assert "num_attention_heads" in keys
    from_official = load_transformer(tmp_path / "official")
    from_diffusers = load_transformer(tmp_path / "diffusers")
    assert from_official.config == from_diffusers.config == model.config
    _assert_same_parameters(from_official, model)
    _assert_same_parameters(from_diffusers, model)
    assert not any(p.is_meta for p in from_diffusers.parameters())


def test_our_diffusers_folder_loads_in_diffusers(tmp_path) -> None:
    diffusers = pytest.importorskip("diffusers")
    model = _random_model("tiny-i2v")
    save_transformer(model, tmp_path, layout="diffusers")
    reference = diffusers.WanTransformer3DModel.from_pretrained(tmp_path)
    ours = official_to_diffusers(model.state_dict())
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_key_maps_are_inverse() -> None:
    state = _random_model("tiny-i2v").state_dict()
    assert diffusers_to_official(official_to_diffusers(state)).keys() == state.keys()
    assert "blocks.1.norm2.weight" in official_to_diffusers(state)  # official norm3 (cross-attn norm)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_sharded_checkpoint_with_index(tmp_path, layout: str) -> None:
    model = _random_model("tiny-t2v")
    save_transformer(model, tmp_path, layout=layout, max_shard_bytes=100_000)
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    _assert_same_parameters(load_transformer(tmp_path), model)


def test_prefixed_single_file_with_dtype(tmp_path) -> None:
    model = _random_model("tiny-t2v")
    state = {f"model.diffusion_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "wan_tiny.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"dim": 64, "num_heads": 4, "ffn_dim": 128, "num_layers": 2,
                                                      "text_dim": 32, "freq_dim": 32, "model_type": "t2v"}))
    loaded = load_transformer(tmp_path / "wan_tiny.safetensors", dtype=torch.bfloat16)
    assert loaded.config == model.config
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, model.state_dict()[key].to(torch.bfloat16)), key


def test_config_from_shapes_without_config_json(tmp_path) -> None:
    config = WanConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=1, text_dim=16, freq_dim=16)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in WanModel(config).state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert load_transformer(tmp_path / "w.safetensors").config == config
    # Tiny widths cannot be told apart by shapes: without config.json the loader says so.
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    save_file({k: v.contiguous() for k, v in _random_model("tiny-t2v").state_dict().items()}, str(tiny / "w.safetensors"))
    with pytest.raises(CheckpointError, match="num_heads"):
        load_transformer(tiny / "w.safetensors")
    # An explicit variant settles it.
    assert load_transformer(tiny / "w.safetensors", variant="tiny-t2v").config == get_variant("tiny-t2v").transformer


def test_real_config_jsons_map_to_variants() -> None:
    diffusers_13b = {"_class_name": "WanTransformer3DModel", "attention_head_dim": 128, "cross_attn_norm": True,
                     "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None, "added_kv_proj_dim": None,
                     "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
                     "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                     "text_dim": 4096}
    assert detect_variant(config_from_json(diffusers_13b)) == "wan2.1-t2v-1.3b"
    official_5b = {"_class_name": "WanModel", "dim": 3072, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256,
                   "in_dim": 48, "model_type": "ti2v", "num_heads": 24, "num_layers": 30, "out_dim": 48, "text_len": 512}
    assert detect_variant(config_from_json(official_5b)) == "wan2.2-ti2v-5b"
    official_i2v = {"_class_name": "WanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
                    "in_dim": 36, "model_type": "i2v", "num_heads": 40, "num_layers": 40, "out_dim": 16, "text_len": 512}
    # Same json for Wan2.1 I2V and a Wan2.2 I2V expert: the img_emb weights tell them apart.
    assert detect_variant(config_from_json(official_i2v, {"img_emb.proj.0.weight": (1280,)})) == "wan2.1-i2v-14b"
    assert detect_variant(config_from_json(official_i2v, {})) == "wan2.2-i2v-a14b"
    shapes = {"patch_embedding.weight": (5120, 16, 1, 2, 2), "head.head.weight": (64, 5120),
              "blocks.0.ffn.0.weight": (13824, 5120), "text_embedding.0.weight": (5120, 4096),
              "time_embedding.0.weight": (5120, 256), "blocks.0.self_attn.norm_q.weight": (5120,),
              "blocks.0.norm3.weight": (5120,), **{f"blocks.{i}.modulation": (1, 6, 5120) for i in range(40)}}
    assert detect_variant(config_from_shapes(shapes)) == "wan2.1-t2v-14b"


def test_the_wan_familys_other_transformers_are_refused_by_name() -> None:
    """VACE and Animate share T2V/I2V-14B's base fields; their configs (as released) are refused up front."""
    base = {"attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
            "num_attention_heads": 40, "num_layers": 40, "out_channels": 16, "patch_size": [1, 2, 2],
            "qk_norm": "rms_norm_across_heads", "text_dim": 4096, "rope_max_seq_len": 1024}
    assert detect_variant(config_from_json(dict(base, _class_name="WanTransformer3DModel", in_channels=16))) \
        == "wan2.1-t2v-14b"
    vace = dict(base, _class_name="WanVACETransformer3DModel", in_channels=16, vace_layers=[0, 5, 10],
                vace_in_channels=96)
    animate = dict(base, _class_name="WanAnimateTransformer3DModel", in_channels=36, image_dim=1280,
                   added_kv_proj_dim=5120, motion_encoder_size=512, inject_face_latents_blocks=5)
    for config, name in ((vace, "WanVACETransformer3DModel"), (animate, "WanAnimateTransformer3DModel")):
        with pytest.raises(CheckpointError, match=f"unsupported transformer {name}"):
            config_from_json(config)
    unnamed_vace = {k: v for k, v in vace.items() if k != "_class_name"}
    with pytest.raises(CheckpointError, match="vace_layers"):
        config_from_json(unnamed_vace)
    official_vace = {"_class_name": "VaceWanModel", "dim": 5120, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
                     "in_dim": 16, "model_type": "vace", "num_heads": 40, "num_layers": 40, "out_dim": 16,
                     "text_len": 512, "vace_layers": [0, 5, 10], "vace_in_dim": 96}
    with pytest.raises(CheckpointError, match="unsupported transformer VaceWanModel"):
        config_from_json(official_vace)


# --- errors ---------------------------------------------------------------------------------------


def _save_state(tmp_path, state: dict) -> None:
    save_transformer(state, tmp_path, config=get_variant("tiny-t2v").transformer)


def test_missing_key_is_named(tmp_path) -> None:
    state = dict(_random_model("tiny-t2v").state_dict())
    del state["blocks.1.cross_attn.o.bias"]
    _save_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): blocks\.1\.cross_attn\.o\.bias"):
        load_transformer(tmp_path)


def test_unexpected_key_is_named(tmp_path) -> None:
    state = dict(_random_model("tiny-t2v").state_dict())
    state["blocks.0.self_attn.extra.weight"] = torch.zeros(3)
    _save_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): blocks\.0\.self_attn\.extra\.weight"):
        load_transformer(tmp_path)


def test_shape_mismatch_is_named(tmp_path) -> None:
    state = dict(_random_model("tiny-t2v").state_dict())
    state["blocks.0.ffn.0.weight"] = torch.zeros(100, 64)
    _save_state(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*blocks\.0\.ffn\.0\.weight \(100, 64\)"):
        load_transformer(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_file_is_named(tmp_path, damage: str) -> None:
    save_transformer(_random_model("tiny-t2v"), tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[100:])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        load_transformer(tmp_path)


def test_missing_shard_and_empty_folder_are_named(tmp_path) -> None:
    save_transformer(_random_model("tiny-t2v"), tmp_path / "sharded", max_shard_bytes=100_000)
    next((tmp_path / "sharded").glob("*-00002-of-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        load_transformer(tmp_path / "sharded")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
        load_transformer(tmp_path / "empty")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)")
def test_load_straight_to_cuda_in_bf16(tmp_path) -> None:
    model = _random_model("tiny-t2v")
    save_transformer(model, tmp_path, layout="diffusers", max_shard_bytes=100_000)
    on_gpu = load_transformer(tmp_path, device="cuda", dtype=torch.bfloat16)
    on_cpu = load_transformer(tmp_path, dtype=torch.bfloat16)
    for key, value in on_gpu.state_dict().items():
        assert value.is_cuda and value.dtype == torch.bfloat16, key
        assert torch.equal(value.cpu(), on_cpu.state_dict()[key]), key
