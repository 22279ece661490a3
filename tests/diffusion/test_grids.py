"""`diffusers_grid` against diffusers' schedulers' own ``set_timesteps`` (no network needed).

For every sampler × spacing × Karras × zero-SNR × step count: the σ's the network runs at, its
timesteps, where each step lands (DDIM) and the prior-noise scale equal the scheduler's.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ldm.diffusion import NoiseSchedule
from ldm.diffusion.grids import KARRAS_SAMPLERS, SCHEDULER_CLASSES, diffusers_grid
from ldm.diffusion.samplers import get_ancestral_step

diffusers = pytest.importorskip("diffusers")

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
STEPS = (1, 2, 3, 7, 20, 50, 999)


def cases() -> list[tuple[str, str, int, bool, bool]]:
    out = []
    for sampler, spacing, steps, zsnr in itertools.product(
        SCHEDULER_CLASSES, ("leading", "trailing", "linspace"), STEPS, (False, True)
    ):
        if sampler == "heun" and zsnr:
            continue  # diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr
        out.append((sampler, spacing, steps, False, zsnr))
        if sampler in KARRAS_SAMPLERS and steps in (3, 20):
            out.append((sampler, spacing, steps, True, zsnr))
    return out


def reference(
    sampler: str, spacing: str, steps: int, karras: bool, zsnr: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """diffusers' (σ's at the network calls, timesteps, σ each step lands on, init σ)."""
    kw = {
        **SD,
        "timestep_spacing": spacing,
        "steps_offset": 1,
        "rescale_betas_zero_snr": zsnr,
        "set_alpha_to_one": False,
        "use_karras_sigmas": karras,
    }
    cls = getattr(diffusers, SCHEDULER_CLASSES[sampler])
    sched = cls(**{k: v for k, v in kw.items() if k in cls.from_config({}).config})
    sched.set_timesteps(steps)
    t = sched.timesteps.double()
    if sampler in ("ddim", "ddpm"):
        abar = sched.alphas_cumprod
        sig = ((1 - abar[t.long()]) / abar[t.long()]) ** 0.5
        if sampler == "ddim":
            prev = t.long() - 1000 // steps
            last = sched.final_alpha_cumprod
            to_abar = torch.where(prev >= 0, abar[prev.clamp(min=0)], last)
        else:
            to_abar = torch.cat([abar[t.long()[1:]], torch.ones(1)])
        return sig, t, ((1 - to_abar) / to_abar) ** 0.5, 1.0
    sig = sched.sigmas
    if sampler == "heun":  # [σ0, σ1, σ1, ...]: one network call per distinct σ and timestep
        sig, t = torch.cat([sig[:1], sig[1:-1:2], sig[-1:]]), torch.cat([t[:1], t[1::2]])
    return sig[:-1], t, sig[1:], float(sched.init_noise_sigma)


@pytest.mark.parametrize(
    ("sampler", "spacing", "steps", "karras", "zsnr"), cases(), ids=lambda v: str(v)
)
def test_grid_is_the_schedulers(
    sampler: str, spacing: str, steps: int, karras: bool, zsnr: bool
) -> None:
    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=zsnr)
    try:
        grid = diffusers_grid(schedule, sampler, steps, spacing, 1, karras, "zero", False)
    except ValueError as e:  # we refuse what diffusers cannot sample either
        assert "reaches timestep" in str(e) or "repeats timesteps" in str(e)
        return
    sig, t, to, init = reference(sampler, spacing, steps, karras, zsnr)
    if karras:  # float64 log-σ interpolation: equal to a float32 ulp or two
        torch.testing.assert_close(grid.timesteps, t.float(), rtol=1e-6, atol=1e-4)
    else:
        assert torch.equal(grid.timesteps, t.float())
    torch.testing.assert_close(grid.sigmas[:-1], sig.float(), rtol=1e-6, atol=0)
    landed = grid.sigmas[1:] if grid.sigmas_to is None else grid.sigmas_to
    torch.testing.assert_close(landed, to.float(), rtol=1e-6, atol=0)
    if sampler in ("euler", "euler_a", "heun"):
        assert grid.init_scale == pytest.approx(init, rel=1e-6)
    else:  # DDPM-space schedulers: x_T ~ N(0, I), i.e. sqrt(1 + σ²) in σ units
        expected = 1.0 if math.isinf(float(sig[0])) else math.sqrt(1 + float(sig[0]) ** 2)
        assert grid.init_scale == pytest.approx(expected, rel=1e-6)


def test_refusals_name_the_fix() -> None:
    schedule = NoiseSchedule()
    with pytest.raises(ValueError, match="DDIMScheduler has no Karras sigmas"):
        diffusers_grid(schedule, "ddim", 10, karras=True)
    with pytest.raises(ValueError, match="reaches timestep 1000"):
        diffusers_grid(schedule, "ddim", 1000, "leading", 1)
    with pytest.raises(ValueError, match="repeats timesteps"):
        diffusers_grid(schedule, "dpmpp_2m", 1000, "leading", 1)


def test_ancestral_step_from_infinite_sigma_is_the_limit() -> None:
    """σ = ∞ (ᾱ_T = 0): σ_up = η·σ', σ_down = sqrt(1 − η²)·σ', the limit of large σ."""
    nxt = torch.tensor(3.0)
    for eta in (0.0, 0.5, 1.0):
        down, up = get_ancestral_step(torch.tensor(math.inf), nxt, eta)
        big_down, big_up = get_ancestral_step(torch.tensor(1e6), nxt, eta)
        assert down.item() == pytest.approx(big_down.item(), rel=1e-5)
        assert up.item() == pytest.approx(big_up.item(), rel=1e-5)
