"""A fast fake generator for the reliability tests, with faults injected through the prompt.

Like ``service_fakes.FakeGenerator`` (a gloo broadcast of the cancel flag every step), but the
video and preview go through the real atomic writers (``wan_model.pipeline.video``: temp name,
then rename), so the store tests exercise the real write path. Test hooks (prompt words):

- ``hang-rank-1``: rank 1 stops before the step-1 broadcast and sleeps (a wedged rank); rank 0
  blocks inside the collective until the process group's timeout (``nccl_timeout_s``) fires.
- ``disk-full``: the MP4 writer raises ``OSError(ENOSPC)`` after the first frame reached the temp
  file (a full disk simulated in the write path, for machines that cannot mount a small tmpfs).
- ``silent-truncate``: the MP4 is cut to 16 KiB after it was written and no error is raised: what
  ffmpeg under imageio leaves on a really full disk ("Error writing trailer", but close() succeeds).
"""
from __future__ import annotations

import errno
import os
import time
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist

from wan_model.config import get_variant
from wan_model.pipeline.request import GenerationRequest, GenerationResult, JobCancelled, Progress

HANG_S = 600.0  # longer than any test: only the process-group timeout or a kill ends it


class ReliabilityFakeGenerator:
    def __init__(self, config: dict, rank: int, world_size: int):
        self.spec = get_variant(config["variant"])
        self.rank = rank
        self.world_size = world_size
        self.step_s = float(config.get("step_s", 0.0))
        self.layout = f"world={world_size} reliability-fake"
        assert dist.is_initialized() and dist.get_world_size() == world_size and dist.get_rank() == rank

    def generate(self, request: GenerationRequest, progress_callback) -> GenerationResult | None:
        t0 = time.monotonic()
        steps = request.steps or self.spec.steps
        width = request.width or self.spec.default_size[0]
        height = request.height or self.spec.default_size[1]
        frames = request.num_frames or self.spec.default_frames
        step_s = self.step_s * (20 if "slow" in request.prompt else 1)
        step_times = []
        for i in range(steps):
            ts = time.monotonic()
            time.sleep(step_s)
            if "hang-rank-1" in request.prompt and i == 1 and self.rank == 1:
                time.sleep(HANG_S)
            cancel = progress_callback(Progress("denoise", i + 1, steps, time.monotonic() - t0))
            flag = torch.tensor([1 if (self.rank == 0 and cancel) else 0])
            dist.broadcast(flag, src=0)
            step_times.append(time.monotonic() - ts)
            if flag.item():
                raise JobCancelled(request.job_id)
        if self.rank != 0:
            return None
        rng = np.random.default_rng(request.seed)
        video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
        video_path = os.path.join(request.output_dir, "video.mp4")
        preview_path = os.path.join(request.output_dir, "preview.png")
        if "disk-full" in request.prompt:
            with mock.patch("imageio.v2.get_writer", _disk_full_writer):
                _write(video, video_path, preview_path, self.spec.fps)
        else:
            _write(video, video_path, preview_path, self.spec.fps)
        if "silent-truncate" in request.prompt:
            os.truncate(video_path, min(os.path.getsize(video_path), 16 * 1024))
        return GenerationResult(video_path=video_path, preview_path=preview_path, width=width, height=height,
                                num_frames=frames, fps=self.spec.fps, seed=request.seed,
                                timings={"step_s": step_times, "total": time.monotonic() - t0}, layout=self.layout)


def _write(video: np.ndarray, video_path: str, preview_path: str, fps: int) -> None:
    from wan_model.pipeline.video import write_mp4, write_png

    write_mp4(video, video_path, fps)
    write_png(video[0], preview_path)


import imageio.v2 as _iio  # noqa: E402

_original_get_writer = _iio.get_writer  # captured before any patch


def _disk_full_writer(*args, **kwargs):
    """The real FFMPEG writer, whose second ``append_data`` fails as on a full disk."""
    writer = _original_get_writer(*args, **kwargs)
    original_append = writer.append_data
    appended = [0]

    def append_data(frame, *a, **k):
        if appended[0] >= 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        appended[0] += 1
        return original_append(frame, *a, **k)

    writer.append_data = append_data
    return writer


def build_reliability_generator(config: dict, rank: int, world_size: int) -> ReliabilityFakeGenerator:
    return ReliabilityFakeGenerator(config, rank, world_size)
