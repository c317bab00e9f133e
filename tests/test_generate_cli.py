"""``wanserve generate`` (``wan_model.pipeline.cli``): in-process and as a subprocess on 2 ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_generator import png_bytes, read_video_pyav, tiny_cache
from wan_model.pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_cli_writes_the_requested_video(tmp_path_factory, tmp_path, capsys):
    out = tmp_path / "clips" / "cat.mp4"
    code = main(["--prompt", "a cat", "--num-frames", "9", "--width", "48", "--height", "32", "--steps", "2",
                 "--seed", "1", "--output", str(out), "--model", "tiny", "--cache-dir", tiny_cache(tmp_path_factory),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "noise" in captured.err  # the tiny model says plainly what it makes
    result = json.loads(captured.out)
    assert result["video_path"] == str(out) and result["preview_path"] == str(out.with_suffix(".png"))
    frames, codec, _, fps = read_video_pyav(str(out))
    assert frames.shape == (9, 32, 48, 3) and codec == "h264" and fps == 16.0
    assert sorted(os.listdir(out.parent)) == ["cat.mp4", "cat.png"]  # the work folder is gone


def test_cli_fp8_option_reaches_the_generator(tmp_path_factory, tmp_path, capsys):
    out = tmp_path / "fp8.mp4"
    code = main(["--prompt", "a cat", "--num-frames", "1", "--width", "32", "--height", "32", "--steps", "1",
                 "--output", str(out), "--cache-dir", tiny_cache(tmp_path_factory), "--fp8", "--no-progress",
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "fp8=on" in json.loads(captured.out)["layout"]


def test_wanserve_generate_entry_point(tmp_path_factory, tmp_path, capsys):
    from service.cli import main as wanserve

    out = tmp_path / "w.mp4"
    code = wanserve(["generate", "--prompt", "a cat", "--steps", "1", "--num-frames", "1", "--width", "32",
                     "--height", "32", "--output", str(out), "--cache-dir", tiny_cache(tmp_path_factory),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    frames, *_ = read_video_pyav(str(out))
    assert frames.shape == (1, 32, 32, 3)


def test_cli_image_to_video(tmp_path_factory, tmp_path, capsys):
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "i2v.mp4"
    code = main(["--prompt", "a cat", "--image", str(image), "--steps", "1", "--output", str(out), "--model",
                 "tiny-ti2v", "--cache-dir", tiny_cache(tmp_path_factory), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    frames, *_ = read_video_pyav(str(out))
    # No size given: TI2V takes the size within the default area (64x64), sides multiples of 32, whose
    # ratio is the closest to the 80x60 image's (official best_output_size): 64x64, not 64x32.
    assert frames.shape == (5, 64, 64, 3)


@pytest.mark.parametrize("args,message", [
    (["--num-frames", "6"], "num_frames: 6 is not of the form 4n+1"),
    (["--width", "50"], "width: 50 is not a multiple of 16"),
    (["--steps", "0"], "steps: must be an integer"),
    (["--prompt", ""], "prompt: the prompt is empty"),
    (["--model", "tiny-i2v"], "image: tiny-i2v is an image-to-video model"),
])
def test_cli_bad_request_names_the_problem(tmp_path_factory, tmp_path, capsys, args, message):
    argv = ["--prompt", "a cat", "--output", str(tmp_path / "x.mp4"), "--cache-dir", tiny_cache(tmp_path_factory),
            "--no-progress", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_cli_refuses_a_bad_request_before_starting_ranks(tmp_path, capsys, monkeypatch):
    import wan_model.pipeline.cli as cli

    def no_run(*args, **kwargs):
        raise AssertionError("ranks were started for an invalid request")

    monkeypatch.setattr(cli, "run_local", no_run)
    argv = ["--prompt", "a cat", "--output", str(tmp_path / "x.mp4"), "--gpus", "2", "--num-frames", "8"]
    assert main(argv) == 2
    assert "num_frames: 8 is not of the form 4n+1" in capsys.readouterr().err
    assert main(["--prompt", "a", "--output", str(tmp_path / "y.mp4"), "--model", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess_on_two_ranks_matches_one_rank(tmp_path_factory, tmp_path):
    cache = tiny_cache(tmp_path_factory)
    common = ["--prompt", "a red fox", "--steps", "2", "--seed", "4", "--model", "tiny", "--cache-dir", cache,
              "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    one = tmp_path / "one.mp4"
    assert main([*common, "--output", str(one)]) == 0
    two = tmp_path / "two.mp4"
    proc = subprocess.run([sys.executable, "-m", "wan_model.pipeline.cli", *common, "--output", str(two),
                           "--gpus", "2", "--cfg-parallel", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert "world=2 cfg=2" in result["layout"]
    frames_one, *_ = read_video_pyav(str(one))
    frames_two, *_ = read_video_pyav(str(two))
    assert frames_two.shape == frames_one.shape == (5, 64, 64, 3)
    # Same latents (see test_generator_parallel) -> the same encoded video, up to 1/255 before H.264.
    assert np.abs(frames_one.astype(int) - frames_two.astype(int)).max() <= 2
