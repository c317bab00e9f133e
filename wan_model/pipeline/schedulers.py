"""Flow-matching samplers: UniPC (the official Wan default) and Euler.

The schedule is the official Wan one (``wan/utils/fm_solvers_unipc.py``): ``N`` sigmas evenly
spaced from ``1 - 1/T`` down to 0 (the last point dropped), each shifted by

    sigma' = s * sigma / (1 + (s - 1) * sigma)

then a final sigma of 0 appended; the model sees ``timestep = sigma' * T`` (T = 1000).
The steps themselves are diffusers' ``UniPCMultistepScheduler`` (flow prediction, flow sigmas)
and ``FlowMatchEulerDiscreteScheduler``, fed exactly these unshifted sigmas so that both agree
with the official formula (``tests/test_schedulers.py`` checks it against our own arithmetic).
"""
from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("unipc", "euler")

# The Lightning (lightx2v distilled LoRA) setting: 4 Euler steps at shift 5 without CFG, as its
# config has it (for Wan2.2 A14B this puts two steps on each expert).
LIGHTNING_PRESET = {"steps": 4, "sampler": "euler", "guidance": 1.0, "shift": 5.0}


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The official timestep shift: sigma' = s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def base_sigmas(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The unshifted official sigmas: linspace(1 - 1/T, 0, steps + 1) without its last point.

    Official reads ``1 - 1/T`` out of a float32 tensor (0.9990000128746033, not 0.999); at some step
    counts a timestep would otherwise come out one lower than official's (665 for 666)."""
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1].copy()


class FlowSampler:
    """One sampling run: ``timesteps`` to feed the model, and ``step`` to advance the latents.

    A sampler holds the multistep history of one run, so a fresh one is made per job.
    """

    def __init__(self, name: str, steps: int, shift: float):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.name = name
        self.steps = steps
        self.shift = float(shift)
        sigmas = base_sigmas(steps)
        if name == "unipc":
            from diffusers import UniPCMultistepScheduler

            # Settings of the official FlowUniPCMultistepScheduler: 2nd order, bh2, x0-prediction
            # form of the flow velocity, lower order on the final steps, final sigma 0.
            self._scheduler = UniPCMultistepScheduler(
                num_train_timesteps=NUM_TRAIN_TIMESTEPS,
                prediction_type="flow_prediction",
                use_flow_sigmas=True,
                flow_shift=self.shift,
                solver_order=2,
                solver_type="bh2",
                predict_x0=True,
                lower_order_final=True,
                final_sigmas_type="zero",
            )
            self._scheduler.set_timesteps(sigmas=sigmas, device="cpu")
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler

            self._scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=self.shift)
            self._scheduler.set_timesteps(sigmas=sigmas.tolist(), device="cpu")
        # Start at the first step. Without it the scheduler finds its place by the first timestep, and
        # with many steps the first two timesteps are both 999: it took the second, skipped a step and
        # failed on the last one (UniPC from 92 steps at shift 12, 251 at shift 5).
        self._scheduler.set_begin_index(0)
        # [steps] timesteps for the model (int64 for UniPC, as official; float for Euler).
        self.timesteps: torch.Tensor = self._scheduler.timesteps.clone()
        # [steps + 1] sigmas, the last one 0.
        self.sigmas: torch.Tensor = self._scheduler.sigmas.clone().float()

    def step(self, velocity: torch.Tensor, timestep: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        """Advance ``latents`` by one step given the model's flow velocity at ``timestep`` (float32)."""
        out = self._scheduler.step(velocity.float(), timestep, latents.float(), return_dict=False)[0]
        return out.float()

    def __repr__(self) -> str:
        return f"FlowSampler({self.name!r}, steps={self.steps}, shift={self.shift})"


def make_sampler(name: str, steps: int, shift: float) -> FlowSampler:
    """A fresh sampler for one job."""
    return FlowSampler(name, steps, shift)
