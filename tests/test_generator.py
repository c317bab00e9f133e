"""The Generator on one rank: tiny models built in the real file layouts, loaded by the real loaders."""
from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from wan_model.config import VARIANTS, get_variant
from wan_model.pipeline.generator import Generator, GeneratorConfig
from wan_model.pipeline.request import GenerationRequest, InvalidRequest, JobCancelled
from wan_model.pipeline.schedulers import make_sampler
from wan_model.pipeline.validation import resolve_request


def tiny_cache(tmp_path_factory) -> str:
    # One cache per test session, shared by every module (the tiny builder is seeded).
    path = tmp_path_factory.getbasetemp() / "wanserve-tiny-cache"
    path.mkdir(exist_ok=True)
    return str(path)


def png_bytes(width: int = 80, height: int = 60) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def read_video_pyav(path: str):
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), stream.codec_context.name, stream.codec_context.pix_fmt, float(stream.average_rate)


class CallRecorder:
    """Records each model call's inputs (shapes, timesteps) through a forward pre-hook."""

    def __init__(self, generator: Generator):
        self.calls: list[dict] = []
        self.handles = []
        for name, model in generator.parts.experts.items():
            self.handles.append(model.register_forward_pre_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(module, args, kwargs):
            x, timestep, context = args[:3]
            self.calls.append(dict(expert=name, x=x.detach().clone(), t=timestep.detach().clone(),
                                   y=kwargs.get("y"), clip_fea=kwargs.get("clip_fea")))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


# Tests that look at latents or model calls, not at the video: one frame, small, cheap to decode.
SMALL = dict(num_frames=1, width=32, height=32)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
    return Generator(GeneratorConfig(model="tiny", cache_dir=tiny_cache(tmp_path_factory)))


# --- request validation -----------------------------------------------------------------------


@pytest.mark.parametrize("changes,field", [
    (dict(num_frames=6), "num_frames"),
    (dict(num_frames=0), "num_frames"),
    (dict(width=72), "width"),
    (dict(height=40), "height"),
    (dict(steps=0), "steps"),
    (dict(steps=100000), "steps"),
    (dict(prompt="   "), "prompt"),
    (dict(sampler="ddim"), "sampler"),
    (dict(guidance=(3.0, 4.0)), "guidance"),
    (dict(shift=-1.0), "shift"),
    (dict(image=b"not an image"), "image"),
])
def test_bad_request_is_refused_before_any_compute(t2v, tmp_path, changes, field):
    calls = []
    recorder = CallRecorder(t2v)
    request = replace(GenerationRequest(prompt="a cat", output_dir=str(tmp_path / "out")), **changes)
    try:
        with pytest.raises(InvalidRequest) as info:
            t2v.generate(request, lambda p: calls.append(p))
    finally:
        recorder.close()
    assert field in info.value.errors, info.value.errors
    assert field in str(info.value)
    assert calls == [] and recorder.calls == [], "work started before the request was validated"
    assert not (tmp_path / "out").exists()


def test_validation_lists_every_problem_and_names_the_fix():
    spec = get_variant("tiny-t2v")
    bad = GenerationRequest(prompt="", output_dir="/tmp/x", num_frames=6, width=70, steps=0)
    with pytest.raises(InvalidRequest) as info:
        resolve_request(bad, spec)
    errors = info.value.errors
    assert set(errors) == {"prompt", "num_frames", "width", "steps"}
    assert "4n+1" in errors["num_frames"] and "multiple of 16" in errors["width"]


def test_image_to_video_models_need_an_image():
    for name in ("tiny-i2v", "wan2.2-i2v-a14b", "wan2.1-i2v-14b"):
        with pytest.raises(InvalidRequest) as info:
            resolve_request(GenerationRequest(prompt="a cat", output_dir="/tmp/x"), get_variant(name))
        assert "image" in info.value.errors
    # TI2V-5B does both: no image is text-to-video.
    resolve_request(GenerationRequest(prompt="a cat", output_dir="/tmp/x"), get_variant("tiny-ti2v"))


def test_wan21_i2v_samples_480p_with_shift_3_as_official():
    spec = get_variant("wan2.1-i2v-14b")
    image = png_bytes(104, 60)

    def shift(**size):
        return resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=image, **size), spec).shift

    assert shift(width=832, height=480) == shift(width=480, height=832) == 3.0
    # official --size 832*480 sizes a 16:9 image 832x464 and still samples it with 3.0
    assert shift(width=832) == 3.0
    assert shift(width=1280, height=720) == shift() == 5.0  # no size: 720p area
    assert resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=image, width=832, height=480,
                                             shift=7.0), spec).shift == 7.0  # asked for: kept
    t2v = get_variant("wan2.1-t2v-14b")
    assert resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", width=832, height=480), t2v).shift == t2v.shift


def test_an_image_with_an_exif_orientation_is_turned_upright():
    from PIL import Image

    from wan_model.pipeline.conditioning import decode_image

    sideways = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", exif=exif)
    upright = decode_image(buffer.getvalue())
    assert upright.size == (20, 40) and upright.mode == "RGB"


def test_image_sets_the_aspect_ratio_when_no_size_is_given():
    from wan_model.pipeline.conditioning import size_for_image

    # Official Wan2.1 I2V at 720p: a 16:9 image keeps 1280x720; a 4:3 one gets 1104x816.
    assert size_for_image(1280, 720, 1280 * 720, 16) == (1280, 720)
    assert size_for_image(1024, 768, 1280 * 720, 16) == (1104, 816)
    spec = get_variant("tiny-i2v")  # default 64x64, multiple 16
    portrait = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(60, 104)), spec)
    assert (portrait.width, portrait.height) == (48, 80)  # about 64*64 pixels, taller than wide
    landscape = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(104, 60)), spec)
    assert (landscape.width, landscape.height) == (80, 48)
    # A size in the request wins; the image is then cropped to it.
    explicit = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(60, 104),
                                                 width=64, height=32), spec)
    assert (explicit.width, explicit.height) == (64, 32)
    ti2v = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(60, 104)),
                           get_variant("tiny-ti2v"))
    # TI2V keeps the closest ratio within the area (official Wan2.2): at 64x64 with a 32 multiple the
    # choices are 32x128 and 64x64, and a 60x104 image is closer to the square.
    assert (ti2v.width, ti2v.height) == (64, 64)
    with pytest.raises(InvalidRequest, match="image") as info:
        resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(4000, 1)),
                        get_variant("wan2.1-i2v-14b"))
    assert "give width and height" in info.value.errors["image"]


def test_ti2v_sizes_an_image_as_official_wan2_2_does():
    from wan_model.pipeline.conditioning import closest_ratio_size

    # Official Wan2.2 best_output_size at 1280x704 with a 32 multiple (values from the reference
    # algorithm): the height-first rounding wins ties, so a square image is 960x928, not 928x960.
    expected = {(1000, 1000): (960, 928), (1920, 1080): (1248, 704), (1080, 1920): (704, 1248),
                (1024, 768): (1088, 800), (3000, 1250): (1472, 608)}
    for (w, h), size in expected.items():
        assert closest_ratio_size(w, h, 1280 * 704, 32) == size
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(100, 100)),
                          get_variant("wan2.2-ti2v-5b"))
    assert (job.width, job.height) == (960, 928)
    # Wan2.1 I2V keeps its own rounding (each side down): a square image at 1280x720's area.
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(100, 100)),
                          get_variant("wan2.1-i2v-14b"))
    assert (job.width, job.height) == (960, 960)


def test_one_side_given_takes_the_other_from_the_image():
    spec = get_variant("wan2.1-i2v-14b")  # default 832x480, multiple 16
    wide = png_bytes(192, 108)  # 16:9
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=wide, width=832), spec)
    assert (job.width, job.height) == (832, 464)  # 832 * 9/16 = 468 -> nearest multiple of 16; not 480
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=wide, height=720), spec)
    assert (job.width, job.height) == (1280, 720)
    tall = png_bytes(108, 192)
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=tall, width=480), spec)
    assert (job.width, job.height) == (480, 848)
    with pytest.raises(InvalidRequest) as info:  # the derived side is held to the same limit
        resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", image=png_bytes(400, 10), height=480),
                        spec)
    assert "19200x480" in info.value.errors["image"]


def test_guidance_pair_maps_low_and_high_noise_experts():
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x", guidance=(3.0, 4.0)),
                          get_variant("tiny-a14b"))
    assert job.guidance == {"low_noise": 3.0, "high_noise": 4.0}
    job = resolve_request(GenerationRequest(prompt="a", output_dir="/tmp/x"), get_variant("wan2.2-t2v-a14b"))
    assert job.guidance == {"low_noise": 3.0, "high_noise": 4.0}  # official (low, high) = (3.0, 4.0)


# --- text-to-video ------------------------------------------------------------------------------


def test_tiny_t2v_writes_a_playable_mp4(t2v, tmp_path):
    progress = []
    request = GenerationRequest(prompt="a cat surfing", output_dir=str(tmp_path), num_frames=9, width=48,
                                height=32, steps=3, seed=3)
    result = t2v.generate(request, lambda p: progress.append(p))
    assert (result.num_frames, result.width, result.height, result.fps) == (9, 48, 32, 16)
    frames, codec, pix_fmt, fps = read_video_pyav(result.video_path)
    assert frames.shape == (9, 32, 48, 3)
    assert (codec, pix_fmt, fps) == ("h264", "yuv420p", 16.0)
    from PIL import Image

    with Image.open(result.preview_path) as preview:
        assert preview.size == (48, 32)
        # The preview is the first decoded frame, losslessly.
        np.testing.assert_array_equal(np.asarray(preview.convert("RGB")), t2v.last_frames[0])
    # H.264 + 4:2:0 chroma is lossy on noise: the decoded MP4 is still far closer to the frames that
    # went in than to those frames in another order.
    sent = t2v.last_frames.astype(int)
    error = np.abs(frames.astype(int) - sent).mean()
    assert error < 0.5 * np.abs(frames.astype(int) - sent[::-1]).mean(), error
    assert sorted(os.listdir(tmp_path)) == ["preview.png", "video.mp4"]  # no temp files left
    for key in ("text_encode", "denoise", "decode", "encode", "total"):
        assert result.timings[key] >= 0
    assert len(result.timings["step_s"]) == 3
    steps = [p.step for p in progress if p.stage == "denoise" and p.step > 0]
    assert steps == [1, 2, 3]
    assert [p.stage for p in progress if p.stage != "denoise"] == ["text_encode", "decode", "encode"]
    assert "world=1" in result.layout and "ulysses=1" in result.layout
    assert result.encoder in ("imageio-ffmpeg", "pyav")  # the result says which encoder wrote the MP4
    assert t2v.last_latents.shape == (1, 16, 3, 4, 6)


def test_same_seed_same_video_other_seed_other_video(t2v, tmp_path):
    request = GenerationRequest(prompt="a cat", output_dir=str(tmp_path / "a"), steps=2, seed=5, **SMALL)
    t2v.generate(request)
    first = t2v.last_latents.clone()
    t2v.generate(replace(request, output_dir=str(tmp_path / "b")))
    torch.testing.assert_close(t2v.last_latents, first, rtol=0, atol=0)
    t2v.generate(replace(request, output_dir=str(tmp_path / "c"), seed=6))
    assert (t2v.last_latents - first).abs().max() > 1e-3


def test_guidance_one_skips_the_unconditional_pass(t2v, tmp_path):
    recorder = CallRecorder(t2v)
    try:
        t2v.generate(GenerationRequest(prompt="a", output_dir=str(tmp_path / "g1"), steps=2, guidance=1.0, **SMALL))
        assert len(recorder.calls) == 2
        recorder.calls.clear()
        t2v.generate(GenerationRequest(prompt="a", output_dir=str(tmp_path / "g5"), steps=2, guidance=5.0, **SMALL))
        assert len(recorder.calls) == 4
    finally:
        recorder.close()


def test_a_prompt_longer_than_the_text_encoder_reads_is_reported(t2v, tmp_path):
    limit = t2v.parts.text_encoder.text_len
    long = "a red fox runs through deep snow under a pale sky " * (limit // 4)
    result = t2v.generate(GenerationRequest(prompt=long, negative_prompt=long, output_dir=str(tmp_path / "long"),
                                            steps=1, **SMALL))
    fields = [w.split(" ")[0] for w in result.warnings]
    assert fields == ["prompt", "negative_prompt"] and f"only the first {limit}" in result.warnings[0]
    # a negative prompt that guidance 1 never encodes is not reported; a short prompt gets no warning
    result = t2v.generate(GenerationRequest(prompt=long, negative_prompt=long, guidance=1.0,
                                            output_dir=str(tmp_path / "g1"), steps=1, **SMALL))
    assert [w.split(" ")[0] for w in result.warnings] == ["prompt"]
    result = t2v.generate(GenerationRequest(prompt="a fox", output_dir=str(tmp_path / "short"), steps=1, **SMALL))
    assert result.warnings == []


def test_lightning_preset_fields_run_euler_without_cfg(t2v, tmp_path):
    from wan_model.pipeline.schedulers import LIGHTNING_PRESET

    recorder = CallRecorder(t2v)
    try:
        result = t2v.generate(GenerationRequest(prompt="a", output_dir=str(tmp_path), **SMALL, **LIGHTNING_PRESET))
    finally:
        recorder.close()
    assert len(recorder.calls) == 4 and len(result.timings["step_s"]) == 4
    expected_t = make_sampler("euler", 4, LIGHTNING_PRESET["shift"]).timesteps
    got_t = torch.stack([c["t"].reshape(()) for c in recorder.calls])
    torch.testing.assert_close(got_t, expected_t.float(), rtol=0, atol=1e-3)


def test_cancel_stops_every_rank_between_steps(t2v, tmp_path):
    def cancel_after_two(progress):
        return progress.stage == "denoise" and progress.step >= 2

    with pytest.raises(JobCancelled):
        t2v.generate(GenerationRequest(prompt="a", output_dir=str(tmp_path), steps=4), cancel_after_two)
    assert not (tmp_path / "video.mp4").exists()


def test_lora_is_merged_for_the_job_and_taken_out_after(t2v, tmp_path):
    from safetensors.torch import save_file

    dim = t2v.variant.transformer.dim
    gen = torch.Generator().manual_seed(0)
    lora = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, dim, generator=gen),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(dim, 4, generator=gen),
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": torch.randn(4, dim, generator=gen),
        "diffusion_model.blocks.1.ffn.0.lora_up.weight": torch.randn(t2v.variant.transformer.ffn_dim, 4, generator=gen),
    }
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    request = GenerationRequest(prompt="a cat", output_dir=str(tmp_path / "o"), steps=2, seed=1, **SMALL)
    t2v.generate(request)
    plain = t2v.last_latents.clone()
    t2v.generate(replace(request, lora=str(path)))
    with_lora = t2v.last_latents.clone()
    t2v.generate(request)
    assert (with_lora - plain).abs().max() > 1e-3
    torch.testing.assert_close(t2v.last_latents, plain, rtol=0, atol=0)
    # A LoRA that does not fit the model is a bad request, and leaves the weights untouched.
    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.0.nope.lora_down.weight": torch.ones(4, dim),
               "diffusion_model.blocks.0.nope.lora_up.weight": torch.ones(dim, 4)}, str(bad))
    with pytest.raises(InvalidRequest) as info:
        t2v.generate(replace(request, lora=str(bad)))
    assert "lora" in info.value.errors and "nope" in info.value.errors["lora"]
    t2v.generate(request)
    torch.testing.assert_close(t2v.last_latents, plain, rtol=0, atol=0)


def test_a_lora_file_replaced_under_its_name_and_a_peft_folder_are_merged_as_they_are(t2v, tmp_path):
    """The merged LoRA is cached between jobs: a file replaced under the same name must be merged
    again (not the old one kept), and a PEFT folder's lora_alpha must scale it (alpha / r)."""
    import json
    import os

    from safetensors.torch import save_file

    dim = t2v.variant.transformer.dim

    def factors(seed, scale=1.0):
        gen = torch.Generator().manual_seed(seed)
        return {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, dim, generator=gen),
                "diffusion_model.blocks.0.self_attn.q.lora_up.weight": scale * torch.randn(dim, 4, generator=gen)}

    request = GenerationRequest(prompt="a cat", output_dir=str(tmp_path / "o"), steps=2, seed=1, **SMALL)
    path = tmp_path / "style.safetensors"
    save_file(factors(1), str(path))
    t2v.generate(replace(request, lora=str(path)))
    first = t2v.last_latents.clone()
    save_file(factors(2), str(path))  # a new version under the same name
    os.utime(path, ns=(0, 10**18))  # a clearly different mtime, whatever the clock's resolution
    t2v.generate(replace(request, lora=str(path)))
    replaced = t2v.last_latents.clone()
    other = tmp_path / "fresh.safetensors"
    save_file(factors(2), str(other))
    t2v.generate(replace(request, lora=str(other)))
    assert (replaced - first).abs().max() > 1e-3
    torch.testing.assert_close(replaced, t2v.last_latents, rtol=0, atol=0)  # the new file, as if new

    # A PEFT folder with lora_alpha = r / 2 merges like the same factors with the up half as large.
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file(factors(3), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    t2v.generate(replace(request, lora=str(folder)))
    peft = t2v.last_latents.clone()
    halved = tmp_path / "halved.safetensors"
    save_file(factors(3, scale=0.5), str(halved))
    t2v.generate(replace(request, lora=str(halved)))
    torch.testing.assert_close(peft, t2v.last_latents, rtol=1e-5, atol=1e-5)


# --- Wan2.2 A14B: two experts -------------------------------------------------------------------


def test_a14b_switches_expert_at_the_boundary_with_its_own_guidance(tmp_path_factory, tmp_path):
    g = Generator(GeneratorConfig(model="tiny-a14b", cache_dir=tiny_cache(tmp_path_factory), offload=True))
    spec = g.variant
    steps, shift = 8, 3.0
    timesteps = make_sampler("unipc", steps, shift).timesteps
    expected = ["high_noise" if t >= spec.boundary * 1000 else "low_noise" for t in timesteps.tolist()]
    assert 0 < expected.count("high_noise") < steps, "the schedule must cross the boundary for this test"
    recorder = CallRecorder(g)
    try:
        # Guidance (low, high) = (1, 4): low-noise steps run one pass, high-noise steps two.
        result = g.generate(GenerationRequest(prompt="a cat", output_dir=str(tmp_path), steps=steps, shift=shift,
                                              guidance=(1.0, 4.0), **SMALL))
    finally:
        recorder.close()
    assert result.experts_per_step == expected
    calls_per_step = {"high_noise": 2, "low_noise": 1}
    assert [c["expert"] for c in recorder.calls] == [e for e in expected for _ in range(calls_per_step[e])]
    # Offload: after the job both experts wait on the CPU.
    assert all(next(m.parameters()).device.type == "cpu" for m in g.parts.experts.values())


# --- image-to-video -----------------------------------------------------------------------------


def test_wan21_i2v_feeds_clip_features_and_mask_latent_condition(tmp_path_factory, tmp_path):
    from wan_model.pipeline.conditioning import first_frame_mask

    g = Generator(GeneratorConfig(model="tiny-i2v", cache_dir=tiny_cache(tmp_path_factory)))
    recorder = CallRecorder(g)
    progress = []
    try:
        result = g.generate(GenerationRequest(prompt="a cat", output_dir=str(tmp_path), image=png_bytes(),
                                              num_frames=5, width=32, height=32, steps=2), progress.append)
    finally:
        recorder.close()
    assert [p.stage for p in progress if p.stage != "denoise"] == ["text_encode", "image_encode", "decode", "encode"]
    assert result.timings["image_encode"] > 0 and result.timings["image_encode_ranks"] == 1
    frames, *_ = read_video_pyav(result.video_path)
    assert frames.shape == (5, 32, 32, 3)
    call = recorder.calls[0]
    assert call["clip_fea"].shape == (1, 257, g.variant.transformer.image_dim)
    y = call["y"]
    assert y.shape == (1, 4 + 16, 2, 4, 4)
    torch.testing.assert_close(y[0, :4].float(), first_frame_mask(5, 4, 4))
    # Frames after the first are zeros, encoded: the image latent differs from them.
    assert (y[0, 4:, 0] - y[0, 4:, 1]).abs().max() > 1e-3
    assert all(c["y"] is y or torch.equal(c["y"], y) for c in recorder.calls)


def test_wan22_i2v_a14b_conditions_on_y_without_clip(tmp_path_factory, tmp_path, monkeypatch):
    base = get_variant("tiny-a14b")
    spec = replace(base, name="tiny-i2v-a14b", task="i2v", boundary=0.9, guidance=(3.5, 3.5),
                   transformer=replace(base.transformer, model_type="i2v", in_dim=36))
    monkeypatch.setitem(VARIANTS, spec.name, spec)
    g = Generator(GeneratorConfig(model="tiny-i2v-a14b", cache_dir=tiny_cache(tmp_path_factory)))
    assert g.parts.clip is None
    recorder = CallRecorder(g)
    try:
        result = g.generate(GenerationRequest(prompt="a cat", output_dir=str(tmp_path), image=png_bytes(), steps=3,
                                              width=32, height=32))
    finally:
        recorder.close()
    assert set(result.experts_per_step) <= {"high_noise", "low_noise"}
    assert all(c["clip_fea"] is None and c["y"].shape == (1, 20, 2, 4, 4) for c in recorder.calls)


def test_default_negative_prompt_is_the_variants_own(tmp_path_factory, tmp_path, t2v):
    """Official Wan2.1 I2V-14B puts "camera shake" before the shared negative prompt; a prompt given is used as it is."""
    from wan_model.pipeline.generator import DEFAULT_NEGATIVE_PROMPT

    i2v = Generator(GeneratorConfig(model="tiny-i2v", cache_dir=tiny_cache(tmp_path_factory)))
    seen = []
    for g in (i2v, t2v):
        encode = g.parts.text_encoder.encode
        g.parts.text_encoder.encode = lambda prompts, encode=encode: seen.append(prompts) or encode(prompts)
        try:
            for negative in ("", "blurry"):
                g.generate(GenerationRequest(prompt="a cat", negative_prompt=negative, steps=1,
                                             output_dir=str(tmp_path / f"{g.variant.name}{negative}"),
                                             image=png_bytes() if g is i2v else None, **SMALL))
        finally:
            g.parts.text_encoder.encode = encode
    assert [negative for _, negative in seen] == ["镜头晃动，" + DEFAULT_NEGATIVE_PROMPT, "blurry",
                                                 DEFAULT_NEGATIVE_PROMPT, "blurry"]


def test_ti2v_resizes_its_image_with_lanczos_as_official(tmp_path_factory, tmp_path, monkeypatch):
    from wan_model.pipeline import conditioning

    g = Generator(GeneratorConfig(model="tiny-ti2v", cache_dir=tiny_cache(tmp_path_factory)))
    filters = []
    original = conditioning.image_to_tensor
    monkeypatch.setattr(conditioning, "image_to_tensor",
                        lambda image, w, h, resample="bicubic": filters.append(resample) or original(image, w, h, resample))
    g.generate(GenerationRequest(prompt="a", output_dir=str(tmp_path), image=png_bytes(), steps=1, guidance=1.0,
                                 width=32, height=32))
    assert filters == ["lanczos"]
    pixels = [original(conditioning.decode_image(png_bytes(80, 60)), 32, 32, f) for f in ("bicubic", "lanczos")]
    assert (pixels[0] - pixels[1]).abs().max() > 0.01  # the filters differ on this image


def test_ti2v_holds_the_image_latent_as_first_frame_at_timestep_zero(tmp_path_factory, tmp_path):
    g = Generator(GeneratorConfig(model="tiny-ti2v", cache_dir=tiny_cache(tmp_path_factory)))
    recorder = CallRecorder(g)
    try:
        result = g.generate(GenerationRequest(prompt="a cat", output_dir=str(tmp_path), image=png_bytes(), steps=2,
                                              width=32, height=32))
    finally:
        recorder.close()
    assert result.fps == 24
    frames, _, _, fps = read_video_pyav(result.video_path)
    assert frames.shape == (5, 32, 32, 3) and fps == 24.0
    # Per-token timesteps [1, L]: 0 on the first latent frame's tokens, t elsewhere.
    latents = g.last_latents  # [1, 48, 2, 2, 2] -> tokens per frame (2/2)*(2/2) = 1
    tokens_per_frame = (latents.shape[3] // 2) * (latents.shape[4] // 2)
    for call in recorder.calls:
        t = call["t"]
        assert t.shape == (1, latents.shape[2] * tokens_per_frame)
        assert torch.all(t[0, :tokens_per_frame] == 0) and torch.all(t[0, tokens_per_frame:] > 0)
        # The model always sees the image latent in frame 0.
        torch.testing.assert_close(call["x"][:, :, :1].float(), recorder.calls[0]["x"][:, :, :1].float())
    torch.testing.assert_close(latents[:, :, :1], recorder.calls[0]["x"][:, :, :1].float().cpu())
    # Without an image TI2V-5B is plain text-to-video: one timestep per sample.
    recorder = CallRecorder(g)
    try:
        g.generate(GenerationRequest(prompt="a cat", output_dir=str(tmp_path / "t2v"), steps=1, guidance=1.0, **SMALL))
    finally:
        recorder.close()
    assert recorder.calls[0]["t"].shape == (1,)


def test_generator_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown generator settings: gpu_count"):
        GeneratorConfig.from_dict({"model": "tiny", "gpu_count": 2})
    with pytest.raises(ValueError, match="unknown tiny model"):
        Generator(GeneratorConfig(model="tiny-nope"))
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'"):
        Generator(GeneratorConfig(model="tiny", attention="fast"))
    with pytest.raises(ValueError, match="fsdp needs several ranks"):
        Generator(GeneratorConfig(model="tiny", fsdp=True))


def test_generator_config_takes_the_old_name_of_parallel_vae():
    with pytest.warns(DeprecationWarning, match="parallel_decode is now called parallel_vae"):
        config = GeneratorConfig.from_dict({"model": "tiny", "parallel_decode": False})
    assert config.parallel_vae is False
    with pytest.raises(ValueError, match="give parallel_vae only"):
        GeneratorConfig.from_dict({"parallel_decode": False, "parallel_vae": True})


# The whole-generation peer checks against diffusers' pipelines: tests/test_pipeline_peer.py.


def test_lora_folder_holds_one_file_per_a14b_expert(tmp_path):
    from wan_model.lora import expert_lora_files as _lora_files

    a14b, t2v = get_variant("tiny-a14b"), get_variant("tiny-t2v")
    single = tmp_path / "one.safetensors"
    single.write_bytes(b"")
    assert _lora_files(str(single), a14b) == {"high_noise": str(single), "low_noise": str(single)}
    folder = tmp_path / "pair"
    folder.mkdir()
    for name in ("high_noise_model.safetensors", "low_noise_model.safetensors", "README.md"):
        (folder / name).write_bytes(b"")
    assert _lora_files(str(folder), a14b) == {"high_noise": str(folder / "high_noise_model.safetensors"),
                                              "low_noise": str(folder / "low_noise_model.safetensors")}
    with pytest.raises(ValueError, match="exactly one weights file"):
        _lora_files(str(folder), t2v)
    peft = tmp_path / "peft"  # adapter_config.json + weights: the folder itself, for every expert
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "adapter_model.safetensors").write_bytes(b"")
    assert list(_lora_files(str(peft), t2v).values()) == [str(peft)]
    assert set(_lora_files(str(peft), a14b).values()) == {str(peft)}
    (folder / "low_noise_model.safetensors").unlink()
    with pytest.raises(ValueError, match="expert 'low_noise'"):
        _lora_files(str(folder), a14b)
