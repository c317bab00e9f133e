"""N ranks give the 1-rank result (gloo, CPU): on 2 ranks Ulysses 2, Ring 2, CFG-parallel 2,
FSDP x Ulysses 2 and FSDP x CFG-parallel 2 (tiny A14B; FSDP loads straight into the shards),
Ulysses 2 with the text encoder on the CPU of rank 0 only, image-to-video with CLIP on CFG-parallel 2
and TI2V on Ulysses 2; on 4 ranks CFG-parallel 2 x Ulysses 2. Every case but two splits the VAE
(decode, and the image encode) by rows over the ranks; in ``cfg2_rank0_vae`` and
``i2v_cfg2_rank0_vae`` rank 0 runs the VAE alone and broadcasts the image latents.

Tolerance: final latents (float32, values of order 1) within 1e-4 absolute -- the ranks run one
thread each, the reference several, so float sums may round differently (seen: up to 1.1e-5) --
and decoded frames within 1 level of 255.
One pair of spawned ranks runs every layout in turn (process start-up is the big cost).
"""
from __future__ import annotations

import numpy as np
import pytest

from _dist import run_ranks
from test_generator import png_bytes, tiny_cache
from wan_model.pipeline.generator import Generator, GeneratorConfig
from wan_model.pipeline.request import GenerationRequest

pytestmark = pytest.mark.slow

LATENT_ATOL = 1e-4
LAYOUTS = {
    "ulysses2": dict(parallel="manual", ulysses=2),
    "ring2": dict(parallel="manual", ring=2, ulysses=1),
    "cfg2": dict(parallel="manual", cfg_parallel=True),
    "fsdp_ulysses2": dict(parallel="manual", ulysses=2, fsdp=True),
    "fsdp_cfg2": dict(parallel="manual", cfg_parallel=True, fsdp=True),
    "cfg2_rank0_vae": dict(parallel="manual", cfg_parallel=True, parallel_vae=False),
    # A CPU text encoder runs on rank 0 only; the other ranks receive the context.
    "ulysses2_t5_cpu": dict(parallel="manual", ulysses=2, text_encoder="cpu"),
}

# Image-to-video: (model, layout).
IMAGE_CASES = {
    "i2v_cfg2": ("tiny-i2v", dict(parallel="manual", cfg_parallel=True)),
    "ti2v_ulysses2": ("tiny-ti2v", dict(parallel="manual", ulysses=2)),
    "i2v_cfg2_rank0_vae": ("tiny-i2v", dict(parallel="manual", cfg_parallel=True, parallel_vae=False)),
}


# (model, layout, request): tiny-a14b with guidance (low 1, high 4): the high-noise steps run CFG-parallel,
# the low-noise steps (guidance 1) the conditional branch alone over both ranks.
GUIDANCE_CASES = {
    "cfg2_guidance1": ("tiny-a14b", dict(parallel="manual", cfg_parallel=True), "guidance1_request"),
}


def guidance1_request(output_dir: str) -> GenerationRequest:
    return GenerationRequest(prompt="a cat surfing a wave", output_dir=output_dir, steps=3, seed=11, width=48,
                             height=48, num_frames=9, guidance=(1.0, 4.0))


def image_request(output_dir: str) -> GenerationRequest:
    return GenerationRequest(prompt="a cat", output_dir=output_dir, image=png_bytes(), steps=2, seed=2, num_frames=5,
                             width=32, height=32)


def request(output_dir: str) -> GenerationRequest:
    # 3 steps cross the tiny-a14b boundary (t >= 875 -> high-noise expert) at shift 12. 9 frames of
    # 48x48 are 3x3x3 = 27 tokens: an odd count, so 2 sequence-parallel ranks pad the sequence.
    return GenerationRequest(prompt="a cat surfing a wave", output_dir=output_dir, steps=3, seed=11, width=48,
                             height=48, num_frames=9)


def run_layouts(rank: int, world_size: int, cache: str, out: str, layouts: dict, image_cases: dict = {},
                other_cases: dict = {}) -> dict:
    cases = {name: ("tiny-a14b", settings, request) for name, settings in layouts.items()}
    cases.update({name: (model, settings, image_request) for name, (model, settings) in image_cases.items()})
    cases.update({name: (model, settings, globals()[make]) for name, (model, settings, make) in other_cases.items()})
    results = {}
    for name, (model, settings, make_request) in cases.items():
        generator = Generator(GeneratorConfig(model=model, cache_dir=cache, **settings))
        ranks_per_call = []  # how many ranks split the sequence in each transformer call
        for expert in generator.parts.experts.values():
            expert.register_forward_pre_hook(lambda module, args: ranks_per_call.append(
                (getattr(getattr(module.attention, "state", None), "sp_world", 1))))
        encoder, encodes = generator.parts.text_encoder, []
        if encoder is not None:  # a CPU text encoder is loaded on rank 0 only
            encode = encoder.encode_with_lengths
            encoder.encode_with_lengths = lambda prompts: encodes.append(len(prompts)) or encode(prompts)
        result = generator.generate(make_request(f"{out}/{name}"))
        results[name] = dict(
            latents=generator.last_latents.numpy(),
            frames=generator.last_frames if rank == 0 else None,
            layout=result.layout if result is not None else None,
            experts=result.experts_per_step if result is not None else None,
            returned=result is not None,
            decode_ranks=result.timings["decode_ranks"] if result is not None else None,
            image_encode_ranks=result.timings.get("image_encode_ranks") if result is not None else None,
            holds_vae=generator.parts.vae is not None,
            text_encodes=len(encodes),
            holds_text_encoder=encoder is not None,
            ranks_per_call=ranks_per_call,
        )
    return results


def test_two_ranks_equal_one_rank_in_every_layout(tmp_path_factory, tmp_path):
    cache = tiny_cache(tmp_path_factory)
    reference = Generator(GeneratorConfig(model="tiny-a14b", cache_dir=cache))
    ref_result = reference.generate(request(str(tmp_path / "ref")))
    ref_latents, ref_frames = reference.last_latents.numpy(), reference.last_frames
    assert set(ref_result.experts_per_step) == {"high_noise", "low_noise"}
    assert "image_encode_ranks" not in ref_result.timings  # text-to-video: no image

    image_refs = {}
    for name, (model, _) in IMAGE_CASES.items():
        generator = Generator(GeneratorConfig(model=model, cache_dir=cache))
        generator.generate(image_request(str(tmp_path / f"ref-{name}")))
        image_refs[name] = (generator.last_latents.numpy(), generator.last_frames)

    guidance_refs = {}
    for name, (model, _, make) in GUIDANCE_CASES.items():
        generator = Generator(GeneratorConfig(model=model, cache_dir=cache))
        result = generator.generate(globals()[make](str(tmp_path / f"ref-{name}")))
        guidance_refs[name] = (generator.last_latents.numpy(), result.experts_per_step)

    ranks = run_ranks(run_layouts, 2, cache, str(tmp_path), LAYOUTS, IMAGE_CASES, GUIDANCE_CASES, timeout=400)
    for name, (ref_lat, experts) in guidance_refs.items():
        for rank in ranks:
            np.testing.assert_allclose(rank[name]["latents"], ref_lat, rtol=0, atol=LATENT_ATOL, err_msg=name)
        assert "cfg=2 ulysses=1 ring=1" in ranks[0][name]["layout"]
        assert "guidance1=ulysses2xring1" in ranks[0][name]["layout"]
        # Guidance 4 (high noise): one call per rank on its own CFG half (1 rank per sequence);
        # guidance 1 (low noise): the conditional branch over both ranks (2 per sequence).
        expected = [1 if expert == "high_noise" else 2 for expert in experts]
        assert sorted(set(expected)) == [1, 2], experts  # the case exercises both
        assert ranks[0][name]["ranks_per_call"] == expected and ranks[1][name]["ranks_per_call"] == expected
    for name, (ref_lat, ref_fr) in image_refs.items():
        for rank in ranks:
            np.testing.assert_allclose(rank[name]["latents"], ref_lat, rtol=0, atol=LATENT_ATOL, err_msg=name)
        assert np.abs(ranks[0][name]["frames"].astype(int) - ref_fr.astype(int)).max() <= 1, name
        split = not name.endswith("rank0_vae")
        assert ranks[0][name]["image_encode_ranks"] == (2 if split else 1), name
        assert f"vae={'rows' if split else 'rank0'}" in ranks[0][name]["layout"]
    for name, expected_layout in [("ulysses2", "cfg=1 ulysses=2 ring=1"), ("ring2", "cfg=1 ulysses=1 ring=2"),
                                  ("cfg2", "cfg=2 ulysses=1 ring=1"), ("fsdp_ulysses2", "cfg=1 ulysses=2 ring=1"),
                                  ("fsdp_cfg2", "cfg=2 ulysses=1 ring=1"),
                                  ("cfg2_rank0_vae", "cfg=2 ulysses=1 ring=1"),
                                  ("ulysses2_t5_cpu", "cfg=1 ulysses=2 ring=1")]:
        rank0, rank1 = ranks[0][name], ranks[1][name]
        assert rank0["returned"] and not rank1["returned"], "only rank 0 returns the result"
        # The VAE decode is split by rows over both ranks unless parallel_vae is off.
        split = name != "cfg2_rank0_vae"
        assert f"vae={'rows' if split else 'rank0'}" in rank0["layout"]
        assert rank0["decode_ranks"] == (2 if split else 1) and rank1["holds_vae"] == split
        assert expected_layout in rank0["layout"] and "world=2" in rank0["layout"]
        assert ("fsdp=on" in rank0["layout"]) == name.startswith("fsdp")
        assert rank0["experts"] == ref_result.experts_per_step
        assert rank0["text_encodes"] == 1 and rank1["text_encodes"] == (0 if name.endswith("t5_cpu") else 1), name
        assert rank0["holds_text_encoder"] and rank1["holds_text_encoder"] == (not name.endswith("t5_cpu")), name
        for rank in (rank0, rank1):
            np.testing.assert_allclose(rank["latents"], ref_latents, rtol=0, atol=LATENT_ATOL, err_msg=name)
        diff = np.abs(rank0["frames"].astype(int) - ref_frames.astype(int)).max()
        assert diff <= 1, f"{name}: frames differ by {diff}/255"
        assert (tmp_path / name / "video.mp4").is_file()


def test_four_ranks_cfg_parallel_times_ulysses_equal_one_rank(tmp_path_factory, tmp_path):
    cache = tiny_cache(tmp_path_factory)
    reference = Generator(GeneratorConfig(model="tiny-a14b", cache_dir=cache))
    ref_result = reference.generate(request(str(tmp_path / "ref")))
    layouts = {"cfg2_ulysses2": dict(parallel="manual", cfg_parallel=True, ulysses=2)}
    ranks = run_ranks(run_layouts, 4, cache, str(tmp_path), layouts, timeout=400)
    assert "world=4 cfg=2 ulysses=2 ring=1" in ranks[0]["cfg2_ulysses2"]["layout"]
    assert ranks[0]["cfg2_ulysses2"]["decode_ranks"] == 4
    assert ranks[0]["cfg2_ulysses2"]["experts"] == ref_result.experts_per_step
    for rank in ranks:
        np.testing.assert_allclose(rank["cfg2_ulysses2"]["latents"], reference.last_latents.numpy(), rtol=0,
                                   atol=LATENT_ATOL)
    diff = np.abs(ranks[0]["cfg2_ulysses2"]["frames"].astype(int) - reference.last_frames.astype(int)).max()
    assert diff <= 1


def write_lora(path, variant_name: str = "tiny-a14b") -> str:
    """A LoRA touching a sharded weight (low rank), a bias (diff_b) and a bare parameter (modulation diff)."""
    import torch
    from safetensors.torch import save_file

    from wan_model.config import get_variant

    cfg = get_variant(variant_name).transformer
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, cfg.dim, generator=gen),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(cfg.dim, 4, generator=gen),
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": torch.randn(4, cfg.dim, generator=gen),
        "diffusion_model.blocks.1.ffn.0.lora_up.weight": torch.randn(cfg.ffn_dim, 4, generator=gen),
        "diffusion_model.blocks.1.ffn.0.diff_b": torch.randn(cfg.ffn_dim, generator=gen),
        "diffusion_model.blocks.0.modulation.diff": 0.1 * torch.randn(1, 6, cfg.dim, generator=gen),
    }
    save_file(tensors, str(path))
    return str(path)


def run_lora_jobs(rank: int, world_size: int, cache: str, out: str, lora: str, settings: dict) -> dict:
    from dataclasses import replace

    generator = Generator(GeneratorConfig(model="tiny-a14b", cache_dir=cache, **settings))
    plain = request(f"{out}/plain")
    latents = {}
    for name, job in (("plain", plain), ("lora", replace(plain, lora=lora)), ("after", plain)):
        generator.generate(replace(job, output_dir=f"{out}/{name}"))
        latents[name] = generator.last_latents.numpy()
    return latents


def test_lora_on_fsdp_sharded_weights_equals_one_rank(tmp_path_factory, tmp_path):
    """Under FSDP every rank merges its shard of the update: 2 ranks give the 1-rank LoRA result,
    and taking the LoRA out restores the exact weights (the next plain job is bit-identical)."""
    from dataclasses import replace

    cache = tiny_cache(tmp_path_factory)
    lora = write_lora(tmp_path / "style.safetensors")
    reference = Generator(GeneratorConfig(model="tiny-a14b", cache_dir=cache))
    reference.generate(replace(request(str(tmp_path / "ref")), lora=lora))
    expected = reference.last_latents.numpy()
    settings = dict(parallel="manual", ulysses=2, fsdp=True)
    ranks = run_ranks(run_lora_jobs, 2, cache, str(tmp_path / "fsdp"), lora, settings, timeout=400)
    for rank in ranks:
        assert np.abs(rank["lora"] - rank["plain"]).max() > 1e-3, "the LoRA changed nothing"
        np.testing.assert_allclose(rank["lora"], expected, rtol=0, atol=LATENT_ATOL)
        np.testing.assert_array_equal(rank["after"], rank["plain"])
