"""The samplers follow the official Wan flow-matching schedule and step rules."""
import numpy as np
import pytest
import torch

from wan_model.pipeline.schedulers import SAMPLERS, make_sampler


def official_sigmas(steps: int, shift: float) -> np.ndarray:
    """Written out from official ``FlowUniPCMultistepScheduler``: T=1000; its training sigmas are a
    float32 tensor, whose first (1 - 1/T) and last (0) items are sigma_max and sigma_min."""
    t_train = 1000
    training = torch.from_numpy(1.0 - np.linspace(1, 1 / t_train, t_train)[::-1].copy()).to(torch.float32)
    sigma_max, sigma_min = training[0].item(), training[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.append(sigmas, 0.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
# (30, 1.0): two timesteps one below official's with an exact 0.999 as sigma_max
@pytest.mark.parametrize("steps,shift", [(4, 5.0), (40, 12.0), (50, 5.0), (1, 3.0), (7, 1.0), (30, 1.0)])
def test_schedule_matches_official_shift_formula(sampler, steps, shift):
    s = make_sampler(sampler, steps, shift)
    expected = official_sigmas(steps, shift)
    assert s.sigmas.shape == (steps + 1,)
    np.testing.assert_allclose(s.sigmas.numpy(), expected, rtol=0, atol=1e-6)
    assert s.sigmas[-1].item() == 0.0
    assert len(s.timesteps) == steps
    if sampler == "unipc":
        # The official scheduler hands the model int64 timesteps (sigma * 1000, truncated).
        assert s.timesteps.dtype == torch.int64
        np.testing.assert_array_equal(s.timesteps.numpy(), (expected[:-1] * 1000).astype(np.int64))
    else:
        np.testing.assert_allclose(s.timesteps.numpy(), expected[:-1] * 1000, rtol=1e-6, atol=1e-3)
    assert torch.all(s.timesteps[1:] <= s.timesteps[:-1]), "timesteps must not increase"


def test_shift_moves_steps_towards_high_noise():
    low, high = make_sampler("unipc", 10, 1.0), make_sampler("unipc", 10, 12.0)
    assert torch.all(high.sigmas[1:-1] > low.sigmas[1:-1])


def test_euler_step_is_the_flow_update():
    s = make_sampler("euler", 5, 5.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 3, 3, generator=gen)
    v = torch.randn(1, 4, 2, 3, 3, generator=gen)
    out = s.step(v, s.timesteps[0], x)
    expected = x + (s.sigmas[1] - s.sigmas[0]) * v
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_unipc_first_step_is_ddim_on_the_flow_path():
    # Step 1 of UniPC (order 1, no corrector yet) is DDIM with x0 = x - sigma * v, alpha = 1 - sigma.
    s = make_sampler("unipc", 6, 5.0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 3, 3, generator=gen, dtype=torch.float64).float()
    v = torch.randn(1, 4, 2, 3, 3, generator=gen)
    sigma, sigma_next = s.sigmas[0].double(), s.sigmas[1].double()
    x0 = x.double() - sigma * v.double()
    expected = (1 - sigma_next) * x0 + sigma_next / sigma * (x.double() - (1 - sigma) * x0)
    out = s.step(v, s.timesteps[0], x)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", SAMPLERS)
# 100 steps at shift 12: the first two UniPC timesteps are both 999 (the run had skipped a step and failed)
@pytest.mark.parametrize("steps,shift", [(8, 5.0), (100, 12.0)])
def test_exact_velocity_lands_on_the_data(sampler, steps, shift):
    # On the straight path x_sigma = (1 - sigma) x0 + sigma * noise the true velocity is noise - x0;
    # any consistent flow solver fed it must end on x0.
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 2, 3, 3, generator=gen)
    noise = torch.randn(1, 4, 2, 3, 3, generator=gen)
    s = make_sampler(sampler, steps, shift)
    x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * noise
    for t in s.timesteps:
        x = s.step(noise - x0, t, x)
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("ddim", 4, 5.0)
    with pytest.raises(ValueError, match="steps"):
        make_sampler("unipc", 0, 5.0)


def test_lightning_preset_splits_a14b_steps_two_per_expert():
    """Lightning's config runs Wan2.2 A14B at shift 5: two steps on the high-noise expert, two on the
    low-noise one. At the variant's own shift (12) three of the four would go to the high-noise one."""
    from wan_model.config import get_variant
    from wan_model.pipeline.denoise import ExpertPlan
    from wan_model.pipeline.schedulers import LIGHTNING_PRESET

    variant = get_variant("wan2.2-t2v-a14b")
    plan = ExpertPlan(names=variant.experts, guidance={}, boundary=variant.boundary)
    sampler = make_sampler(LIGHTNING_PRESET["sampler"], LIGHTNING_PRESET["steps"], LIGHTNING_PRESET["shift"])
    experts = [plan.expert_for(float(t)) for t in sampler.timesteps]
    assert experts == ["high_noise", "high_noise", "low_noise", "low_noise"]
