"""A fast fake ``Generator`` for the service tests: real SPMD control flow (a gloo broadcast of
the cancel flag every step, like the real generator), noise frames written as a real MP4.

Fault injection through the prompt: "inject-failure" raises on every rank; "slow" makes steps 4x longer.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from wan_model.config import get_variant
from wan_model.pipeline.request import GenerationRequest, GenerationResult, InvalidRequest, JobCancelled, Progress


class FakeGenerator:
    def __init__(self, config: dict, rank: int, world_size: int):
        self.spec = get_variant(config["variant"])
        self.rank = rank
        self.world_size = world_size
        self.step_s = float(config.get("step_s", 0.02))
        self.layout = f"world={world_size} fake"
        assert dist.is_initialized() and dist.get_world_size() == world_size and dist.get_rank() == rank

    def generate(self, request: GenerationRequest, progress_callback) -> GenerationResult | None:
        t0 = time.monotonic()
        if "invalid" in request.prompt:
            raise InvalidRequest({"prompt": "the fake generator refuses prompts saying 'invalid'"})
        steps = request.steps or self.spec.steps
        width = request.width or self.spec.default_size[0]
        height = request.height or self.spec.default_size[1]
        frames = request.num_frames or self.spec.default_frames
        step_s = self.step_s * (4 if "slow" in request.prompt else 1)
        progress_callback(Progress("text_encode", 0, steps, time.monotonic() - t0))
        step_times = []
        for i in range(steps):
            ts = time.monotonic()
            time.sleep(step_s)
            if "inject-failure" in request.prompt and i == 1:
                raise RuntimeError("injected failure")
            cancel = progress_callback(Progress("denoise", i + 1, steps, time.monotonic() - t0))
            flag = torch.tensor([1 if (self.rank == 0 and cancel) else 0])
            dist.broadcast(flag, src=0)
            step_times.append(time.monotonic() - ts)
            if flag.item():
                raise JobCancelled(request.job_id)
        progress_callback(Progress("decode", steps, steps, time.monotonic() - t0))
        if self.rank != 0:
            return None
        import imageio.v2 as iio

        rng = np.random.default_rng(request.seed)
        video = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
        os.makedirs(request.output_dir, exist_ok=True)
        video_path = os.path.join(request.output_dir, "video.mp4")
        preview_path = os.path.join(request.output_dir, "preview.png")
        iio.mimwrite(video_path, list(video), fps=self.spec.fps, codec="libx264", macro_block_size=16)
        iio.imwrite(preview_path, video[0])
        total = time.monotonic() - t0
        return GenerationResult(video_path=video_path, preview_path=preview_path, width=width, height=height,
                                num_frames=frames, fps=self.spec.fps, seed=request.seed,
                                timings={"step_s": step_times, "total": total}, layout=self.layout)


def build_fake_generator(config: dict, rank: int, world_size: int) -> FakeGenerator:
    return FakeGenerator(config, rank, world_size)
