"""ServiceSettings (YAML + WANSERVE_* env, the builder's args), request checks without Ray."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import ServiceSettings
from service.schemas import GenerateRequest, check_generate, latent_tokens
from wan_model.config import get_variant


def test_yaml_env_and_overrides(tmp_path, monkeypatch):
    path = tmp_path / "wanserve.yaml"
    path.write_text("gpus: 4\nqueue_size: 9\nport: 9000\ndata_dir: data\n")
    monkeypatch.setenv("WANSERVE_QUEUE_SIZE", "17")
    settings = ServiceSettings.from_yaml(path, port=9100)
    assert (settings.gpus, settings.queue_size, settings.port) == (4, 17, 9100)  # args > env > file
    assert settings.data_dir.startswith("/") and settings.data_dir.endswith("data")
    assert ServiceSettings.coerce({"config_file": str(path)}).gpus == 4
    assert ServiceSettings.coerce(settings) is settings
    again = ServiceSettings.coerce(settings.to_args())
    assert again == settings


@pytest.mark.parametrize("options,words", [
    ({"compiled": True}, "unknown generator settings: compiled"),
    ({"text_encoder": "cpuu"}, "unknown text_encoder 'cpuu'"),
    ({"attention": "fa5"}, "unknown attention kernel 'fa5'"),
    ({"head_chunks": 0}, "head_chunks must be an integer >= 1"),
    ({"fp8": True}, "fp8 together with fsdp"),
])
def test_generator_options_are_checked_when_the_settings_are_made(options, words):
    """Not only by each worker when the replica starts, minutes later, with no one-line error."""
    with pytest.raises(ValidationError, match=words):
        ServiceSettings(generator_options=options, fsdp=True, gpus=2)
    # a custom generator factory takes settings of its own: only it can check them
    ServiceSettings(generator_options=options, generator_factory="my.module:build")


def test_bad_settings_name_the_problem():
    with pytest.raises(ValidationError, match="unknown model variant"):
        ServiceSettings(variant="wan9")
    with pytest.raises(ValidationError, match="queue_sise"):
        ServiceSettings(queue_sise=3)
    with pytest.raises(ValidationError, match="not both"):
        ServiceSettings(auth_token="a", auth_token_file="/x")
    with pytest.raises(ValueError, match="cannot tell the variant"):
        ServiceSettings(model="/models/unknown").variant_name
    with pytest.raises(ValidationError, match="cfg_parallel must be 1, 2 or auto, got 4"):
        ServiceSettings(cfg_parallel=4)  # was taken as "off"
    assert ServiceSettings(cfg_parallel="2").cfg_parallel == 2  # as the environment and flags give it


def test_generator_config_maps_parallel_degrees():
    auto = ServiceSettings().generator_config()
    assert auto["parallel"] == "auto" and auto["device"] == "cpu" and auto["variant"] == "tiny-t2v"
    manual = ServiceSettings(model="/m/Wan2.1-T2V-14B", gpus=8, cfg_parallel=2, ulysses=2).generator_config()
    assert manual["variant"] == "wan2.1-t2v-14b"
    # Degrees left on auto reach the generator as None, and it resolves them for the world it gets.
    assert (manual["parallel"], manual["cfg_parallel"], manual["ulysses"], manual["ring"]) == ("manual", True, 2, None)
    from wan_model.pipeline.generator import GeneratorConfig
    from wan_model.pipeline.layout import choose_degrees

    layout = choose_degrees(GeneratorConfig.from_dict(manual), get_variant("wan2.1-t2v-14b"), 8)
    assert (layout.cfg_parallel, layout.ulysses, layout.ring) == (2, 2, 2)
    no_cfg = ServiceSettings(model="/m/Wan2.1-T2V-1.3B", gpus=8, cfg_parallel=1).generator_config()
    layout = choose_degrees(GeneratorConfig.from_dict(no_cfg), get_variant("wan2.1-t2v-1.3b"), 8)
    assert (layout.cfg_parallel, layout.ulysses, layout.ring) == (1, 4, 2)  # 12 heads: 8 does not divide them


@pytest.mark.parametrize("gpus,given,expected", [
    (4, dict(ulysses=2), (2, 2, 1)),  # the README's 14B row on 4 GPUs, with ulysses named
    (4, dict(ulysses=4), (1, 4, 1)),  # no room left for CFG-parallel
    (8, dict(ring=2), (2, 2, 2)),
    (4, dict(ulysses=2, ring=2), (1, 2, 2)),
    (4, dict(ulysses=2, cfg_parallel=1), (1, 2, 2)),
    (4, dict(ulysses=2, cfg_parallel="auto"), (2, 2, 1)),
    (4, dict(ulysses=2, fsdp=True), (1, 2, 2)),  # fsdp: auto takes no CFG-parallel
])
def test_cfg_parallel_left_on_auto_beside_a_named_degree_is_chosen_as_auto_would(gpus, given, expected):
    settings = ServiceSettings(model="/m/Wan2.1-T2V-14B", gpus=gpus, **given)
    layout = settings.parallel_layout()
    assert (layout.cfg_parallel, layout.ulysses, layout.ring) == expected


def test_token_count_and_size_multiple_follow_the_variant():
    assert latent_tokens(get_variant("wan2.1-t2v-14b"), 1280, 720, 81) == 21 * 90 * 160 // 4
    ti2v = ServiceSettings(model="tiny", variant="tiny-ti2v")
    errors = check_generate(GenerateRequest(prompt="a cat", width=48, height=64), ti2v)
    assert list(errors) == ["width"] and "multiple of 32" in errors["width"]
    assert check_generate(GenerateRequest(prompt="a cat", width=64, height=64), ti2v) == {}
    i2v = ServiceSettings(model="tiny", variant="tiny-i2v")
    assert "image-to-video" in check_generate(GenerateRequest(prompt="a cat"), i2v)["image"]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` and whose pixels would take seconds and gigabytes to
    decode (a 500 KB solid PNG can claim 169 M pixels): only the header may be read."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def test_an_image_of_too_many_pixels_is_refused_from_its_header():
    import base64
    import time

    from wan_model.pipeline.conditioning import decode_image

    i2v = ServiceSettings(model="tiny", variant="tiny-i2v")
    start = time.perf_counter()
    errors = check_generate(GenerateRequest(prompt="a cat", image=base64.b64encode(_png_header_only(13000, 13000))), i2v)
    assert list(errors) == ["image"] and "13000x13000, 169 megapixels; the most is 67" in errors["image"]
    with pytest.raises(ValueError, match="8192x8192"):
        decode_image(_png_header_only(8193, 8192))  # the workers refuse it the same way
    assert time.perf_counter() - start < 1.0  # nothing was decoded
    # at the limit the pixels are decoded (and here found broken)
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(_png_header_only(8192, 8192))


def test_builder_refuses_parallel_degrees_that_do_not_fit():
    from service.app import build_app

    with pytest.raises(ValueError, match="does not divide"):
        build_app({"ulysses": 3})
    with pytest.raises(ValueError, match="4 ranks"):
        build_app({"ulysses": 2, "ring": 2})
    with pytest.raises(ValueError, match="heads"):
        build_app({"gpus": 8, "ulysses": 8})  # tiny has 4 heads
    build_app({"gpus": 8, "ulysses": 4, "cfg_parallel": 2})


def test_the_builder_reads_the_webhook_secret_before_anything_starts(tmp_path):
    from service.app import build_app

    with pytest.raises(FileNotFoundError, match="webhook-secret"):
        build_app({"webhook_secret_file": str(tmp_path / "webhook-secret")})
    with pytest.raises(ValueError, match="not base64"):
        build_app({"webhook_secret": "whsec_not*base64"})
    build_app({"webhook_secret": "whsec_" + "QUJD" * 8})


def test_warmup_shapes_are_checked_like_a_request_before_anything_starts(tmp_path):
    """A warm-up the variant cannot make fails the build, naming the entry and the field, so a
    deployment never waits on replicas that can never report ready."""
    from service.app import build_app
    from service.config import ServiceSettings

    good = ServiceSettings(data_dir=str(tmp_path), warmup=[{"width": 16, "height": 16, "num_frames": 1}])
    (fields,) = good.warmup_requests(str(tmp_path))
    assert fields["width"] == 16 and fields["steps"] == 2 and fields["prompt"] and "guidance" not in fields
    distilled = ServiceSettings(data_dir=str(tmp_path), warmup=[{"guidance": 1}])
    assert distilled.warmup_requests(str(tmp_path))[0]["guidance"] == 1.0  # the guidance-1 layout's graphs
    bad = ServiceSettings(data_dir=str(tmp_path), warmup=[{"width": 16}, {"width": 16, "num_frames": 6}])
    with pytest.raises(ValueError, match=r"warmup\[1\].*num_frames"):
        build_app(bad)
    with pytest.raises(ValueError, match="frames"):
        ServiceSettings(data_dir=str(tmp_path), warmup=[{"frames": 5}])  # unknown key
    assert ServiceSettings(data_dir=str(tmp_path)).warmup_requests(str(tmp_path)) == []


def test_the_compile_cache_lives_in_the_data_dir_unless_named(tmp_path, monkeypatch):
    settings = ServiceSettings(data_dir=str(tmp_path / "data"))
    assert settings.resolved_compile_cache_dir == str(tmp_path / "data" / "compile-cache")
    monkeypatch.chdir(tmp_path)
    named = ServiceSettings(data_dir=str(tmp_path / "data"), compile_cache_dir="cache")
    assert named.resolved_compile_cache_dir == str(tmp_path / "cache")  # absolute: workers run elsewhere
