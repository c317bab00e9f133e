"""The denoising loop: experts, classifier-free guidance (optionally CFG-parallel), cancellation.

Everything here is SPMD: every rank runs the same loop, the same number of model calls per
step, and the same collectives, so sequence parallelism and FSDP inside the model stay in step.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from wan_model.step_cache import StepCache

from .request import JobCancelled, Progress
from .schedulers import NUM_TRAIN_TIMESTEPS, FlowSampler


@dataclass
class Branch:
    """What the model is conditioned on in one CFG branch (cond or uncond)."""

    context: torch.Tensor  # [1, 512, text_dim]
    clip_fea: Optional[torch.Tensor] = None  # [1, 257, image_dim] (Wan2.1 I2V)
    y: Optional[torch.Tensor] = None  # [1, C_y, F, H, W] mask + image latent (I2V)


@dataclass
class FirstFrameLock:
    """TI2V-5B image conditioning: the first latent frame is the image latent, at timestep 0.

    ``mask`` is 0 on the first latent frame and 1 elsewhere, ``[1, C, F, H, W]``; after every
    step the latents are reset to ``(1 - mask) * image_latent + mask * latents``, and the model
    gets per-token timesteps ``mask * t`` (0 on the image's tokens), as official
    ``wan/textimage2video.py``.
    """

    image_latent: torch.Tensor  # [1, C, 1, H, W]
    mask: torch.Tensor  # [1, C, F, H, W]
    patch_size: tuple[int, int, int] = (1, 2, 2)

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        return (1.0 - self.mask) * self.image_latent + self.mask * latents

    def token_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """``[1, L]`` timesteps, one per patch token (the mask sampled at each patch's corner)."""
        pt, ph, pw = self.patch_size
        token_mask = self.mask[0, 0, ::pt, ::ph, ::pw].flatten()
        return (token_mask * t.float()).unsqueeze(0)


@dataclass
class CfgSplit:
    """How the two CFG branches map to ranks.

    ``group`` None: this rank runs both branches itself (two model calls per step).
    Otherwise the ``cfg_group`` of two ranks holding the same sequence chunk: CFG half 0 runs
    the conditional branch, half 1 the unconditional one, and one all-gather per step combines
    them.
    """

    group: Optional[dist.ProcessGroup] = None
    half: int = 0  # 0: cond, 1: uncond
    # A step with guidance 1 runs the conditional branch alone, and both halves would run the same
    # pass on half the GPUs each. ``whole_world`` is a (sharding, attention) pair over every rank
    # that such a step switches the model to.
    whole_world: Optional[tuple] = None

    @contextmanager
    def conditional_alone(self, model):
        """Run the conditional branch alone over every rank (when CFG-parallel has a whole-world layout)."""
        if self.whole_world is None:
            yield
            return
        split = (model.sharding, model.attention)
        model.set_parallel(*self.whole_world)
        try:
            yield
        finally:
            model.set_parallel(*split)


@dataclass
class ExpertPlan:
    """Which expert runs at timestep ``t``, and with which guidance scale.

    One expert: always ``names[0]``. Wan2.2 A14B: ``names = (high_noise, low_noise)``; the
    high-noise expert runs while ``t >= boundary * 1000``. ``guidance`` maps expert -> scale.
    """

    names: tuple[str, ...]
    guidance: dict[str, float]
    boundary: Optional[float] = None

    def expert_for(self, t: float) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self.names[0] if t >= self.boundary * NUM_TRAIN_TIMESTEPS else self.names[1]


@dataclass
class DenoiseOutcome:
    latents: torch.Tensor
    experts_per_step: list[str] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)


def broadcast_cancel(wants_cancel: bool, device: torch.device) -> bool:
    """Rank 0's cancellation wish, agreed by every rank (one tiny broadcast)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(wants_cancel)
    flag = torch.tensor([1 if wants_cancel else 0], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def denoise(
    *,
    get_model: Callable[[str], torch.nn.Module],
    plan: ExpertPlan,
    sampler: FlowSampler,
    latents: torch.Tensor,
    cond: Branch,
    uncond: Optional[Branch],
    cfg: CfgSplit,
    dtype: torch.dtype,
    progress: Callable[[Progress], bool],
    lock: Optional[FirstFrameLock] = None,
    step_cache: Optional[StepCache] = None,
) -> DenoiseOutcome:
    """Run every step of ``sampler`` from ``latents`` (float32) and return the final latents.

    ``get_model(name)`` returns the expert ready on the device (it may move it there: offload).
    ``uncond`` may be None only when every expert's guidance is 1. ``progress`` is called after
    each step and returns the agreed cancellation flag (already broadcast). ``step_cache``
    (lossy, opt-in): steps it judges redundant reuse each branch's last block residual.
    """
    device = latents.device
    outcome = DenoiseOutcome(latents=latents)
    start = time.perf_counter()
    if lock is not None:
        latents = lock.apply(latents)
    total = len(sampler.timesteps)
    for index, t in enumerate(sampler.timesteps):
        step_start = time.perf_counter()
        name = plan.expert_for(float(t))
        scale = float(plan.guidance[name])
        model = get_model(name)
        t_dev = t.to(device)
        timestep = lock.token_timesteps(t_dev) if lock is not None else t_dev.float().reshape(1)
        x = latents.to(dtype)
        if step_cache is not None:
            step_cache.start_step(index, total, name)

        def run(branch: Branch) -> torch.Tensor:
            y = branch.y.to(dtype) if branch.y is not None else None
            clip_fea = branch.clip_fea.to(dtype) if branch.clip_fea is not None else None
            extra = {}
            if step_cache is not None:  # one residual per CFG branch
                extra["cache"] = step_cache.slot("cond" if branch is cond else "uncond")
            return model(x, timestep, branch.context.to(dtype), clip_fea=clip_fea, y=y, **extra).float()

        with torch.no_grad():
            if scale == 1.0:
                # Guidance 1 is the conditional prediction alone: skip the unconditional pass, and
                # under CFG-parallel split the one pass over every rank.
                with cfg.conditional_alone(model):
                    velocity = run(cond)
            elif cfg.group is None:
                if uncond is None:
                    raise ValueError(f"guidance {scale} != 1 needs the unconditional branch")
                velocity = _guided(run(cond), run(uncond), scale)
            else:
                mine = run(cond if cfg.half == 0 else uncond).contiguous()
                both = torch.empty((2, *mine.shape), dtype=mine.dtype, device=mine.device)
                dist.all_gather_into_tensor(both, mine.unsqueeze(0), group=cfg.group)
                velocity = _guided(both[0], both[1], scale)
            latents = sampler.step(velocity, t, latents)
            if lock is not None:
                latents = lock.apply(latents)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # honest per-step times (kernels run asynchronously)
        outcome.experts_per_step.append(name)
        outcome.step_s.append(time.perf_counter() - step_start)
        if progress(Progress(stage="denoise", step=index + 1, total_steps=total,
                             elapsed_s=time.perf_counter() - start)):
            raise JobCancelled(f"cancelled after step {index + 1} of {total}")
    outcome.latents = latents
    return outcome
