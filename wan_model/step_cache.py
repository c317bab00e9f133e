"""Step caching (TeaCache-style): skip the transformer blocks on steps whose input barely changed.

Lossy and opt-in. Consecutive denoising steps often produce nearly the same block residual
(the blocks' output minus their input). TeaCache (Liu et al. 2024, "Timestep Embedding Tells:
It's Time to Cache for Video Diffusion Model") watches how much the timestep-modulation input
changes from step to step and, while the accumulated change stays small, reuses the last
computed residual instead of running the blocks; patch embedding and the output head still run.

The rule here, per step ``i`` of ``n``:

* indicator: the time projection ``e0`` (``[B, 1, 6, dim]``) of the step's timestep -- the
  modulation every block adds its offsets to (for per-token timesteps, TI2V, the step's largest
  timestep). It depends on ``t`` and replicated weights only, so it is the same on every rank
  and for both CFG branches; rank 0's decision is still broadcast so no rounding can split them.
* ``accumulated += mean|e0_i - e0_{i-1}| / mean|e0_{i-1}|`` (relative L1 to the previous step);
* the blocks run (and ``accumulated`` resets to 0) on the first and last step, when the expert
  changes (Wan2.2 A14B) and whenever ``accumulated >= threshold``; otherwise the step reuses the
  residual of the last computed step. One decision per step, for the cond and uncond branches
  alike; each branch keeps its own residual (``slot("cond")`` / ``slot("uncond")``).

Threshold 0 never skips (the result is the uncached one). Official TeaCache additionally maps the
relative L1 through a polynomial fitted per checkpoint; that is left out here (the raw value is used),
so thresholds are not interchangeable with TeaCache's published ones.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["StepCache", "CacheSlot"]


class CacheSlot:
    """One CFG branch's cached block residual (this rank's tokens, float32)."""

    def __init__(self, policy: "StepCache", name: str):
        self.policy = policy
        self.name = name
        self.residual: Optional[torch.Tensor] = None

    def reuse(self, indicator: torch.Tensor) -> bool:
        """Whether this forward skips the blocks (the step's one decision; see ``StepCache``)."""
        skip = self.policy.decide(indicator)
        if skip and self.residual is None:
            raise RuntimeError(f"step cache: step {self.policy.index} reuses branch {self.name!r}, "
                               "which has no computed residual yet")
        return skip

    def add_residual(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.residual is None or self.residual.shape != tokens.shape:
            raise RuntimeError(f"step cache: branch {self.name!r} has residual "
                               f"{None if self.residual is None else tuple(self.residual.shape)}, "
                               f"tokens are {tuple(tokens.shape)}")
        return tokens + self.residual

    def store(self, before: torch.Tensor, after: torch.Tensor) -> None:
        self.residual = after - before


class StepCache:
    """The skip policy of one denoising run; the model consults it through ``slot(branch)``."""

    def __init__(self, threshold: float):
        if not threshold >= 0:
            raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)
        self.index = -1
        self.total = 0
        self.skipped: list[int] = []
        self._expert: Optional[str] = None
        self._last_expert: Optional[str] = None
        self._previous: Optional[torch.Tensor] = None
        self._accumulated = 0.0
        self._decision: Optional[bool] = None
        self._slots: dict[str, CacheSlot] = {}

    def start_step(self, index: int, total: int, expert: str) -> None:
        """Called by the denoising loop before the step's model calls."""
        self.index, self.total, self._expert = index, total, expert
        self._decision = None

    def slot(self, branch: str) -> CacheSlot:
        if branch not in self._slots:
            self._slots[branch] = CacheSlot(self, branch)
        return self._slots[branch]

    def decide(self, indicator: torch.Tensor) -> bool:
        """True: this step reuses the residuals. Made on the step's first model call, then repeated."""
        if self.index < 0:
            raise RuntimeError("step cache: start_step was not called")
        if self._decision is None:
            self._decision = self._agree(self._rule(indicator.detach().float()), indicator.device)
            if self._decision:
                self.skipped.append(self.index)
            else:  # the agreed decision, not this rank's own, moves the state: every rank stays alike
                self._accumulated = 0.0
                self._last_expert = self._expert
        return self._decision

    def _rule(self, indicator: torch.Tensor) -> bool:
        previous, self._previous = self._previous, indicator
        forced = (self.index == 0 or self.index == self.total - 1 or previous is None
                  or previous.shape != indicator.shape or self._expert != self._last_expert)
        if not forced:
            self._accumulated += ((indicator - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()
        return not (forced or self._accumulated >= self.threshold)

    @staticmethod
    def _agree(skip: bool, device: torch.device) -> bool:
        """Rank 0's decision on every rank: sequence-parallel and FSDP collectives need all ranks in step."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return skip
        flag = torch.tensor([1 if skip else 0], dtype=torch.int32, device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())
