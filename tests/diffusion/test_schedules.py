"""Noise schedules, timestep spacings and σ grids against diffusers."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from ldm.diffusion import NoiseSchedule, get_sigmas, make_betas, spaced_timesteps
from ldm.diffusion.timesteps import prior_scale

DIFFUSERS_NAME = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}
SD = {"beta_start": 0.00085, "beta_end": 0.012}


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("betas", [(0.0001, 0.02), (0.00085, 0.012)])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_alphas_cumprod_identical_to_diffusers(
    schedule: str, betas: tuple[float, float], zero_snr: bool
) -> None:
    ref = DDPMScheduler(
        beta_schedule=DIFFUSERS_NAME[schedule],
        beta_start=betas[0],
        beta_end=betas[1],
        rescale_betas_zero_snr=zero_snr,
    )
    ours = NoiseSchedule(schedule, 1000, betas[0], betas[1], zero_snr)
    assert ours.alphas_cumprod.dtype == torch.float32
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.betas, ref.betas)


def test_zero_terminal_snr() -> None:
    sched = NoiseSchedule("scaled_linear", zero_terminal_snr=True)
    last = torch.tensor([999])
    assert sched.alphas_cumprod[-1] == 0
    assert sched.snr(last).item() == 0
    # sampling σ stays finite (diffusers' 2^-24 convention): σ_max ≈ 4096
    assert sched.sigma_max == pytest.approx(4096, rel=1e-3)
    assert torch.isfinite(sched.sigmas).all()
    # first ᾱ unchanged by Lin et al. Alg. 1
    plain = NoiseSchedule("scaled_linear")
    assert sched.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)


def test_cosine_betas_clipped() -> None:
    betas = make_betas("cosine", 1000)
    assert betas.max().item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="unknown schedule 'cosinus'"):
        make_betas("cosinus")


def test_add_noise_matches_closed_form_and_diffusers() -> None:
    sched = NoiseSchedule("scaled_linear")
    ref = DDPMScheduler(beta_schedule="scaled_linear", **SD)
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    assert torch.allclose(sched.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    assert torch.allclose(sched.add_noise(x0, noise, t), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("spacing", "offset", "steps"),
    [("leading", 1, 50), ("leading", 0, 30), ("trailing", 0, 50), ("trailing", 0, 30)],
)
def test_integer_spacings_match_ddim(spacing: str, offset: int, steps: int) -> None:
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    ours = spaced_timesteps(steps, 1000, spacing, offset)
    assert torch.equal(ours.long(), ref.timesteps)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize(
    ("spacing", "offset", "steps"),
    [("linspace", 0, 25), ("linspace", 0, 7), ("leading", 1, 30), ("trailing", 0, 30)],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_sigma_grids_match_euler(
    spacing: str, offset: int, steps: int, karras: bool, zero_snr: bool
) -> None:
    ref = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        **SD,
        timestep_spacing=spacing,
        steps_offset=offset,
        use_karras_sigmas=karras,
        rescale_betas_zero_snr=zero_snr,
    )
    ref.set_timesteps(steps)
    sched = NoiseSchedule("scaled_linear", zero_terminal_snr=zero_snr)
    sigmas = get_sigmas(sched, steps, spacing, offset, karras)
    assert torch.equal(sigmas, ref.sigmas)
    if not karras:  # the timesteps diffusers feeds the model equal ours
        assert torch.equal(spaced_timesteps(steps, 1000, spacing, offset).float(), ref.timesteps)
    # t(σ) (log-σ interpolation) recovers the model timesteps: exactly on integer grids, to
    # ~3e-3 on fractional ones (there diffusers interpolates σ linearly in t)
    t = sched.sigma_to_t(sigmas[:-1])
    tol = 5e-3 if (karras or spacing == "linspace") else 0.0
    assert (t - ref.timesteps).abs().max().item() <= tol


def test_karras_quantized_timesteps_match_dpm_solver() -> None:
    ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", **SD, use_karras_sigmas=True)
    ref.set_timesteps(20)
    sched = NoiseSchedule("scaled_linear")
    sigmas = get_sigmas(sched, 20, "linspace", 0, karras=True)
    assert torch.equal(sigmas, ref.sigmas)
    t = sched.sigma_to_t(sigmas[:-1], quantize=True)
    assert torch.equal(t.long(), ref.timesteps)


def test_sigma_to_t_inverts_table() -> None:
    sched = NoiseSchedule("linear", beta_start=0.0001, beta_end=0.02)
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(sched.sigma_to_t(sched.sigmas), t)
    # clamps outside the table, keeps shape
    out = sched.sigma_to_t(torch.tensor([[1e-6, 1e6]]))
    assert out.shape == (1, 2)
    assert out.tolist() == [[0.0, 999.0]]


def test_final_sigma_and_prior_scale() -> None:
    sched = NoiseSchedule()
    sigmas = get_sigmas(sched, 10, "leading", 1, final_sigma="sigma_min")
    assert sigmas[-1].item() == pytest.approx(sched.sigma_min)
    assert prior_scale(0.0) == 1.0
    assert prior_scale(3.0) == pytest.approx(10**0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spacing": "uniform"}, "unknown timestep spacing 'uniform'"),
        ({"final_sigma": "one"}, "unknown final_sigma 'one'"),
        ({"num_steps": 0}, "num_steps must be in"),
    ],
)
def test_grid_option_errors(kwargs: dict, message: str) -> None:
    args = {"num_steps": 10, "spacing": "leading", "final_sigma": "zero"} | kwargs
    with pytest.raises(ValueError, match=message):
        get_sigmas(NoiseSchedule(), **args)
