"""LoRA merging: explicit W + scale * (alpha/rank) * B @ A in every supported format, exact unmerge, clear errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wan_model.config import get_variant
from wan_model.loader import load_transformer, save_transformer
from wan_model.lora import LoraError, merge_lora, merged_loras, unmerge_lora
from wan_model.model import WanModel

RANK = 4


def _model(variant: str = "tiny-i2v") -> WanModel:
    torch.manual_seed(0)
    model = WanModel(get_variant(variant).transformer)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    return model.eval()


def _factors(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, in_features, generator=gen), torch.randn(out_features, RANK, generator=gen)


def _snapshot(model: WanModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_only_changed(model: WanModel, before: dict, expected: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    for key, value in after.items():
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, before[key]), f"{key} changed but the LoRA does not touch it"


def test_official_lightx2v_format(tmp_path) -> None:
    model = _model()
    before = _snapshot(model)
    down_q, up_q = _factors(64, 64, 1)
    down_f, up_f = _factors(128, 64, 2)
    down_img, up_img = _factors(64, 64, 3)
    diff_norm, diff_bias, diff_mod = torch.randn(64), torch.randn(64), torch.randn(1, 6, 64)
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": down_q,
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": up_q,
        "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(8.0),
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": down_f,  # no alpha: alpha = rank
        "diffusion_model.blocks.1.ffn.0.lora_up.weight": up_f,
        "diffusion_model.blocks.1.cross_attn.k_img.lora_down.weight": down_img,
        "diffusion_model.blocks.1.cross_attn.k_img.lora_up.weight": up_img,
        "diffusion_model.blocks.0.norm3.diff": diff_norm,
        "diffusion_model.blocks.0.cross_attn.o.diff_b": diff_bias,
        "diffusion_model.blocks.1.modulation.diff": diff_mod,
    }
    save_file(lora, str(tmp_path / "lora.safetensors"))
    scale = 0.7
    changed = merge_lora(model, tmp_path / "lora.safetensors", scale=scale)
    expected = {
        "blocks.0.self_attn.q.weight": before["blocks.0.self_attn.q.weight"] + scale * (8.0 / RANK) * up_q @ down_q,
        "blocks.1.ffn.0.weight": before["blocks.1.ffn.0.weight"] + scale * up_f @ down_f,
        "blocks.1.cross_attn.k_img.weight": before["blocks.1.cross_attn.k_img.weight"] + scale * up_img @ down_img,
        "blocks.0.norm3.weight": before["blocks.0.norm3.weight"] + scale * diff_norm,
        "blocks.0.cross_attn.o.bias": before["blocks.0.cross_attn.o.bias"] + scale * diff_bias,
        "blocks.1.modulation": before["blocks.1.modulation"] + scale * diff_mod,
    }
    assert sorted(changed) == sorted(expected)
    _assert_only_changed(model, before, expected)
    assert merged_loras(model) == [(str(tmp_path / "lora.safetensors"), scale)]
    assert sorted(unmerge_lora(model)) == sorted(expected)
    _assert_only_changed(model, before, {})  # exact restore
    assert merged_loras(model) == []


def test_peft_diffusers_format_with_adapter_config(tmp_path) -> None:
    model = _model()
    before = _snapshot(model)
    down_q, up_q = _factors(64, 64, 4)
    down_k, up_k = _factors(64, 64, 5)
    down_out, up_out = _factors(64, 64, 6)  # proj_out = official head.head (64 = 16 channels * 2 * 2)
    down_t, up_t = _factors(384, 64, 7)  # time_proj = official time_projection.1
    lora = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": down_q,
        "transformer.blocks.0.attn1.to_q.lora_B.weight": up_q,
        "transformer.blocks.1.attn2.add_k_proj.lora_A.weight": down_k,
        "transformer.blocks.1.attn2.add_k_proj.lora_B.weight": up_k,
        "transformer.proj_out.lora_A.weight": down_out,
        "transformer.proj_out.lora_B.weight": up_out,
        "transformer.condition_embedder.time_proj.lora_A.weight": down_t,
        "transformer.condition_embedder.time_proj.lora_B.weight": up_t,
    }
    # Without a config: alpha = rank.
    merge_lora(model, lora, scale=1.5)
    expected = {
        "blocks.0.self_attn.q.weight": before["blocks.0.self_attn.q.weight"] + 1.5 * up_q @ down_q,
        "blocks.1.cross_attn.k_img.weight": before["blocks.1.cross_attn.k_img.weight"] + 1.5 * up_k @ down_k,
        "head.head.weight": before["head.head.weight"] + 1.5 * up_out @ down_out,
        "time_projection.1.weight": before["time_projection.1.weight"] + 1.5 * up_t @ down_t,
    }
    _assert_only_changed(model, before, expected)
    unmerge_lora(model)
    _assert_only_changed(model, before, {})

    # A PEFT folder: adapter_config.json's lora_alpha / r scales the product.
    folder = tmp_path / "peft"
    folder.mkdir()
    unprefixed = {k.removeprefix("transformer."): v for k, v in lora.items()}
    save_file(unprefixed, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": 2}))
    merge_lora(model, folder, scale=1.0)
    halved = {k: before[k] + (2 / RANK) * (v - before[k]) / 1.5 for k, v in expected.items()}
    _assert_only_changed(model, before, halved)
    unmerge_lora(model)

    # A file diffusers saved: the same config in its safetensors metadata, unprefixed
    # (save_lora_adapter) or under the component's name (save_lora_weights).
    for name, config in (("adapter", {"r": RANK, "lora_alpha": 2}),
                         ("pipeline", {"transformer.r": RANK, "transformer.lora_alpha": 2})):
        file = tmp_path / f"{name}.safetensors"
        save_file(lora, str(file), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
        merge_lora(model, file, scale=1.0)
        _assert_only_changed(model, before, halved)
        unmerge_lora(model)
    bad = tmp_path / "rslora.safetensors"
    save_file(lora, str(bad), metadata={"lora_adapter_metadata": json.dumps({"r": RANK, "use_rslora": True})})
    with pytest.raises(LoraError, match="rslora"):
        merge_lora(model, bad)


def test_kohya_underscore_names_and_conv() -> None:
    model = _model("tiny-t2v")
    before = _snapshot(model)
    down_k, up_k = _factors(64, 64, 8)
    gen = torch.Generator().manual_seed(9)
    down_conv = torch.randn(RANK, 16, 1, 2, 2, generator=gen)
    up_conv = torch.randn(64, RANK, 1, 1, 1, generator=gen)
    lora = {
        "lora_unet_blocks_1_self_attn_k.lora_down.weight": down_k,
        "lora_unet_blocks_1_self_attn_k.lora_up.weight": up_k,
        "lora_unet_blocks_1_self_attn_k.alpha": torch.tensor(2.0),
        "lora_unet_patch_embedding.lora_down.weight": down_conv,
        "lora_unet_patch_embedding.lora_up.weight": up_conv,
    }
    merge_lora(model, lora, scale=1.0)
    conv_delta = (up_conv.flatten(1) @ down_conv.flatten(1)).reshape(64, 16, 1, 2, 2)
    _assert_only_changed(model, before, {
        "blocks.1.self_attn.k.weight": before["blocks.1.self_attn.k.weight"] + (2.0 / RANK) * up_k @ down_k,
        "patch_embedding.weight": before["patch_embedding.weight"] + conv_delta,
    })


@pytest.mark.parametrize("spelling", [
    "lora_unet__blocks_1_self_attn_k",  # VideoX-Fun
    "lycoris_blocks_1_self_attn_k",  # LyCORIS
    "pipe.dit.blocks.1.self_attn.k",  # DiffSynth
    "lora_transformer_blocks_1_attn1_to_k",  # diffusers' kohya-style names
])
def test_other_trainers_prefixes_merge_like_official_names(spelling: str) -> None:
    down, up = _factors(64, 64, 20)
    diff_m = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(21))
    official = {
        "diffusion_model.blocks.1.self_attn.k.lora_down.weight": down,
        "diffusion_model.blocks.1.self_attn.k.lora_up.weight": up,
        "diffusion_model.blocks.1.self_attn.k.alpha": torch.tensor(2.0),
        "diffusion_model.blocks.1.modulation.diff": diff_m,
    }
    other = {
        f"{spelling}.lora_down.weight": down,
        f"{spelling}.lora_up.weight": up,
        f"{spelling}.alpha": torch.tensor(2.0),
        "diffusion_model.blocks.1.diff_m": diff_m,  # lightx2v's name for the modulation delta
    }
    reference, model = _model("tiny-t2v"), _model("tiny-t2v")
    before = _snapshot(model)
    merge_lora(reference, official, scale=0.7)
    merge_lora(model, other, scale=0.7)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    assert not torch.equal(model.state_dict()["blocks.1.modulation"], before["blocks.1.modulation"])
    assert not torch.equal(model.state_dict()["blocks.1.self_attn.k.weight"], before["blocks.1.self_attn.k.weight"])


def test_switching_loras_on_a_loaded_bf16_model(tmp_path) -> None:
    save_transformer(_model("tiny-t2v"), tmp_path / "model")
    model = load_transformer(tmp_path / "model", dtype=torch.bfloat16)
    fresh = _snapshot(model)
    lora_a = dict(zip(["blocks.0.self_attn.v.lora_down.weight", "blocks.0.self_attn.v.lora_up.weight"], _factors(64, 64, 10)))
    lora_b = dict(zip(["blocks.1.ffn.2.lora_down.weight", "blocks.1.ffn.2.lora_up.weight"], _factors(64, 128, 11)))
    merge_lora(model, lora_a, scale=0.5)
    assert not torch.equal(model.state_dict()["blocks.0.self_attn.v.weight"], fresh["blocks.0.self_attn.v.weight"])
    assert all(v is None for v in model._lora_originals.values())  # re-read from the file, no copies kept
    unmerge_lora(model)
    merge_lora(model, lora_b, scale=0.5)
    reference = load_transformer(tmp_path / "model", dtype=torch.bfloat16)
    merge_lora(reference, lora_b, scale=0.5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh[key]), key


def test_errors_name_the_key_and_change_nothing(tmp_path) -> None:
    model = _model("tiny-t2v")
    before = _snapshot(model)
    down, up = _factors(64, 64, 12)
    good = {"blocks.0.self_attn.q.lora_down.weight": down, "blocks.0.self_attn.q.lora_up.weight": up}
    with pytest.raises(LoraError, match=r"blocks\.0\.self_attn\.nope\.lora_down\.weight"):
        merge_lora(model, {**good, "blocks.0.self_attn.nope.lora_down.weight": down})
    with pytest.raises(LoraError, match=r"blocks\.7\.self_attn\.q"):  # a block the model does not have
        merge_lora(model, {**good, "blocks.7.self_attn.q.lora_down.weight": down, "blocks.7.self_attn.q.lora_up.weight": up})
    with pytest.raises(LoraError, match="only one of down/up"):
        merge_lora(model, {**good, "blocks.1.self_attn.k.lora_down.weight": down})
    with pytest.raises(LoraError, match=r"blocks\.1\.ffn\.0"):
        merge_lora(model, {**good, "blocks.1.ffn.0.lora_down.weight": down, "blocks.1.ffn.0.lora_up.weight": up})
    _assert_only_changed(model, before, {})
    bad_file = tmp_path / "bad.safetensors"
    bad_file.write_bytes(b"\x00" * 20)
    with pytest.raises(LoraError, match="bad.safetensors"):
        merge_lora(model, bad_file)


def test_transposed_factors_are_rejected() -> None:
    model = _model("tiny-t2v")
    down, up = _factors(128, 64, 13)  # right for ffn.0 [128, 64], transposed for ffn.2 [64, 128]
    with pytest.raises(LoraError, match=r"blocks\.0\.ffn\.2.*\(128, 64\) update for a \(64, 128\) weight"):
        merge_lora(model, {"blocks.0.ffn.2.lora_down.weight": down, "blocks.0.ffn.2.lora_up.weight": up})


def test_official_lora_equals_its_diffusers_conversion() -> None:
    """Peer check of the two formats: diffusers' own converter turns an official (lightx2v-style) LoRA into
    PEFT keys (alpha folded into the factors, diff_b -> lora_B.bias); merging either gives the same weights."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    model = _model("tiny-i2v")
    gen = torch.Generator().manual_seed(14)
    lora: dict[str, torch.Tensor] = {}
    shapes = {"self_attn.q": (64, 64), "self_attn.k": (64, 64), "self_attn.v": (64, 64), "self_attn.o": (64, 64),
              "cross_attn.q": (64, 64), "cross_attn.k": (64, 64), "cross_attn.v": (64, 64), "cross_attn.o": (64, 64),
              "cross_attn.k_img": (64, 64), "cross_attn.v_img": (64, 64), "ffn.0": (128, 64), "ffn.2": (64, 128)}
    for block in range(2):
        for module, (out_features, in_features) in shapes.items():
            name = f"diffusion_model.blocks.{block}.{module}"
            lora[f"{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=gen)
            lora[f"{name}.lora_up.weight"] = torch.randn(out_features, RANK, generator=gen)
            lora[f"{name}.alpha"] = torch.tensor(float(block + 2))
            lora[f"{name}.diff_b"] = torch.randn(out_features, generator=gen)
    # Clones: the converter scales some input tensors in place.
    converted = conversion._convert_non_diffusers_wan_lora_to_diffusers({k: v.clone() for k, v in lora.items()})
    assert any(k.endswith("lora_B.bias") for k in converted) and not any("alpha" in k for k in converted)

    merge_lora(model, lora, scale=0.8)
    from_official = _snapshot(model)
    unmerge_lora(model)
    merge_lora(model, converted, scale=0.8)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, from_official[key], rtol=1e-5, atol=1e-5, msg=key)


def test_updates_are_built_one_at_a_time(monkeypatch) -> None:
    """A LoRA on every layer of a 14B model would need tens of GB if all deltas existed at once:
    each is built, applied and dropped before the next (checked with weak references)."""
    import gc
    import weakref

    import wan_model.lora as lora_module

    model = _model("tiny-t2v")
    state = {}
    for i, block in enumerate(model.blocks):
        for name in ("self_attn.q", "self_attn.k", "ffn.0"):
            layer = block.get_submodule(name)
            down, up = _factors(layer.out_features, layer.in_features, seed=i)
            state[f"blocks.{i}.{name}.lora_down.weight"] = down
            state[f"blocks.{i}.{name}.lora_up.weight"] = up
    alive, most = [], [0]
    original = lora_module._Planned.delta

    def tracked(self):
        gc.collect()
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        delta = original(self)
        alive.append(weakref.ref(delta))
        return delta

    monkeypatch.setattr(lora_module._Planned, "delta", tracked)
    changed = merge_lora(model, state)
    assert len(alive) == len(changed) == 3 * len(model.blocks)
    assert most[0] == 0, f"{most[0]} earlier deltas were still alive when the next was built"


def test_fp8_layers_take_a_lora_as_a_merged_checkpoint_quantized(tmp_path) -> None:
    """fp8 blocks: the LoRA merges into the original weight re-read from the file, and the sum is
    quantized again: exactly what quantizing a model with the LoRA merged in bf16 gives. Unmerging
    gives back the exact fp8 weights of the start."""
    from wan_model.fp8 import quantize_blocks_fp8

    save_transformer(_model("tiny-t2v"), tmp_path / "model")
    model = load_transformer(tmp_path / "model", dtype=torch.bfloat16)
    quantize_blocks_fp8(model)
    fresh = _snapshot(model)
    lora = dict(zip(["blocks.0.self_attn.v.lora_down.weight", "blocks.0.self_attn.v.lora_up.weight"],
                    _factors(64, 64, 10)))
    lora["blocks.1.ffn.0.diff_b"] = torch.randn(128, generator=torch.Generator().manual_seed(4))  # an fp8 layer's bias
    changed = merge_lora(model, lora, scale=0.5)
    assert sorted(changed) == ["blocks.0.self_attn.v.weight", "blocks.1.ffn.0.bias"]

    reference = load_transformer(tmp_path / "model", dtype=torch.bfloat16)  # merged in bf16, then quantized
    merge_lora(reference, lora, scale=0.5)
    quantize_blocks_fp8(reference)
    merged = model.state_dict()
    for key, value in reference.state_dict().items():
        assert torch.equal(merged[key].float(), value.float()), key
    assert not torch.equal(merged["blocks.0.self_attn.v.weight_fp8"].float(),
                           fresh["blocks.0.self_attn.v.weight_fp8"].float())

    with pytest.raises(LoraError, match="fp8 layers take one LoRA at a time"):
        merge_lora(model, lora, scale=1.0)
    unmerge_lora(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value.float(), fresh[key].float()), key


def test_fp8_layers_of_a_model_without_checkpoint_refuse_a_lora() -> None:
    from wan_model.fp8 import quantize_blocks_fp8

    model = _model("tiny-t2v")
    quantize_blocks_fp8(model)
    before = _snapshot(model)
    lora = dict(zip(["blocks.0.self_attn.v.lora_down.weight", "blocks.0.self_attn.v.lora_up.weight"],
                    _factors(64, 64, 10)))
    with pytest.raises(LoraError, match="not loaded from a checkpoint file"):
        merge_lora(model, lora)
    for key, value in model.state_dict().items():
        assert torch.equal(value.float(), before[key].float()), key


def test_a_lora_in_a_format_that_is_not_read_is_refused_before_the_job_runs(tmp_path):
    from wan_model.config import get_variant
    from wan_model.pipeline.request import GenerationRequest, InvalidRequest
    from wan_model.pipeline.validation import resolve_request

    pickled = tmp_path / "style.pth"
    pickled.write_bytes(b"not read")
    with pytest.raises(InvalidRequest) as info:
        resolve_request(GenerationRequest(prompt="a", output_dir=str(tmp_path), lora=str(pickled)),
                        get_variant("tiny-t2v"))
    assert "not a .safetensors file" in info.value.errors["lora"]
