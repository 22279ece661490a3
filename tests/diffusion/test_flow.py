"""Flow matching: closed-form Gaussian data, training targets, time densities, the σ-space view,
and parity with diffusers' FlowMatch{Euler,Heun}DiscreteScheduler stepping the same U-Net."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ldm.diffusion import CFGDenoiser, Denoiser, Sampler
from ldm.diffusion.flow import FlowSchedule, resolution_shift, sample_flow_t, shift_t
from ldm.diffusion.flow_loss import FlowLoss
from ldm.diffusion.flow_sampling import (
    flow_dpm_grid,
    flow_grid,
    sample_flow_euler,
    sample_flow_heun,
)
from ldm.diffusion.samplers import sample_euler, sample_heun

SIGMA_D = 0.5


def optimal_velocity(x_t: torch.Tensor, timestep: torch.Tensor, **_: object) -> torch.Tensor:
    """E[ε − x0 | x_t] for x0 ~ N(0, σ_d²): x̂0 = (1 − t)σ_d²/((1 − t)²σ_d² + t²)·x_t."""
    t = (timestep / 1000).reshape(-1, *([1] * (x_t.ndim - 1))).double()
    x0 = (1 - t) * SIGMA_D**2 / ((1 - t) ** 2 * SIGMA_D**2 + t**2) * x_t.double()
    return ((x_t.double() - x0) / t).float()


def test_training_target_is_the_velocity_and_optimum_is_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = SIGMA_D * torch.randn(4096, 1, 1, 1, generator=g)
    t = torch.full((4096,), 0.3)
    noise = torch.randn(x0.shape, generator=g)
    seen = {}

    def net(x_t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        seen["x_t"], seen["ts"] = x_t, ts
        return torch.zeros_like(x_t)

    out = FlowLoss()(net, x0, FlowSchedule(), t=t, noise=noise)
    torch.testing.assert_close(seen["x_t"], 0.7 * x0 + 0.3 * noise)
    torch.testing.assert_close(seen["ts"], torch.full((4096,), 300.0))
    torch.testing.assert_close(out.loss, (noise - x0).flatten(1).pow(2).mean(1))
    assert int(out.t[0]) == 300
    # the closed-form velocity attains the conditional variance, below the zero predictor's loss
    best = FlowLoss()(optimal_velocity, x0, FlowSchedule(), t=t, noise=noise).loss.mean()
    # Var[v | x_t] = Var[x0 | x_t]/t², Var[x0 | x_t] = σ_d²t²/((1 − t)²σ_d² + t²)
    var = SIGMA_D**2 / ((1 - 0.3) ** 2 * SIGMA_D**2 + 0.3**2)
    assert abs(float(best) - var) < 0.05 * var
    assert float(best) < float(out.loss.mean())


def test_denoiser_is_the_gaussian_posterior_mean_in_sigma_space() -> None:
    x = torch.linspace(-3, 3, 7).reshape(7, 1, 1, 1)
    d = Denoiser(optimal_velocity, FlowSchedule())
    for sigma in (0.1, 1.0, 9.0):
        # x = x0 + σε: E[x0 | x] = σ_d²/(σ_d² + σ²)·x (the same as for the VE process)
        torch.testing.assert_close(
            d(x, sigma), SIGMA_D**2 / (SIGMA_D**2 + sigma**2) * x, rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(d(x, math.inf), torch.zeros_like(x))


@pytest.mark.parametrize(
    "sampler, order, slack",
    [("euler", 1, 0.35), ("heun", 2, 0.35), ("ddim", 1, 0.35), ("dpmpp_2m", 1, 0.5)],
)
def test_samplers_reach_the_data_distribution_at_their_order(
    sampler: str, order: int, slack: float
) -> None:
    """x_1 ~ N(0, 1) is mapped linearly to x_0 = σ_d·x_1; the error shrinks 2^order per doubling.

    diffusers' flow grid for DPM-Solver++(2M) reads the prior noise as x at t_0 = 1 − 1/(N + 1),
    not t = 1, so its exact target is the ODE solution from there: x_0 = σ_d/sqrt((1 − t_0)²σ_d²
    + t_0²)·x_{t_0}. It converges at first order there: the grid is uniform in t, so its first
    λ-steps do not shrink with N (λ_1 − λ_0 = log 2), and DPM-Solver++'s second order is in h_λ.
    """
    sched = FlowSchedule()
    noise = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    errs = []
    for n in (16, 32, 64, 128) if sampler == "dpmpp_2m" else (8, 16, 32, 64):
        out = Sampler(sampler, n, disable_progress=True)(
            Denoiser(optimal_velocity, sched), noise, sched
        )
        exact = SIGMA_D
        if sampler == "dpmpp_2m":
            t0 = float(FlowSchedule.sigma_to_flow_t(flow_dpm_grid(sched, n).sigmas[:1].double()))
            exact = SIGMA_D / ((1 - t0) ** 2 * SIGMA_D**2 + t0**2) ** 0.5
        errs.append(float((out.std() / noise.std() - exact).abs()))
    ratios = [a / b for a, b in zip(errs, errs[1:], strict=False)]
    assert errs[-1] < (3e-2 if order == 1 else 1e-3), errs
    assert all(abs(math.log2(r) - order) < slack for r in ratios), (errs, ratios)


def test_heun_in_sigma_space_is_not_the_flow_heun() -> None:
    """Euler agrees in σ and t; Heun does not (its trapezoid averages ε̂ in σ, v̂ in t)."""
    sched = FlowSchedule()
    noise = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    grid = flow_grid(sched, 6)
    d = Denoiser(optimal_velocity, sched)
    finite = grid.sigmas[1:]  # start at the first finite σ: x = x_t/(1 − t) there
    t0 = float(finite[0] / (1 + finite[0]))
    x_t = noise * t0  # any state; compare one run from the same point both ways
    ours = sample_heun(d, x_t / (1 - t0), finite, disable_progress=True)
    theirs = sample_flow_heun(d, x_t, finite, disable_progress=True)
    assert float((ours - theirs).abs().max()) > 1e-3
    euler_t = sample_flow_euler(d, x_t, finite, disable_progress=True)
    euler_sigma = sample_euler(d, x_t / (1 - t0), finite, disable_progress=True)
    torch.testing.assert_close(euler_sigma, euler_t, rtol=1e-5, atol=1e-6)


def test_time_densities_and_shift() -> None:
    g = torch.Generator().manual_seed(0)
    for method in ("uniform", "logit_normal", "mode", "cosmap"):
        t = sample_flow_t(20000, method, g)
        assert t.min() >= 0 and t.max() <= 1 and abs(float(t.mean()) - 0.5) < 0.02, method
    ln = sample_flow_t(20000, "logit_normal", g, logit_mean=1.0, logit_std=0.5)
    torch.testing.assert_close(torch.logit(ln).mean(), torch.tensor(1.0), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.logit(ln).std(), torch.tensor(0.5), atol=0.02, rtol=0)
    assert float(sample_flow_t(20000, "mode", g, mode_scale=1.29).std()) < float(
        sample_flow_t(20000, "uniform", g).std()
    )
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(shift_t(t, 3.0), torch.tensor([0.0, 0.5, 0.75, 1.0]))
    assert resolution_shift(1.0, 32, 64, 64) == 2.0 and resolution_shift(3.0, 0, 8, 8) == 3.0
    with pytest.raises(ValueError, match="unknown flow timestep sampling 'lognorm'"):
        FlowLoss("lognorm")


def test_other_samplers_refuse_flow_models_in_one_line() -> None:
    sched = FlowSchedule()
    with pytest.raises(ValueError, match="does not run flow-matching models; use sampling"):
        Sampler("euler_a", 4).grid(sched)
    with pytest.raises(ValueError, match="'ddim' with eta > 0"):
        Sampler("ddim", 4, eta=1.0).grid(sched)


diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 7])
def test_grid_matches_flow_match_euler(shift: float, steps: int) -> None:
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    grid = flow_grid(FlowSchedule(shift=shift), steps)
    assert torch.equal(grid.timesteps, sch.timesteps.float())
    t = FlowSchedule.sigma_to_flow_t(grid.sigmas.double()).float()
    torch.testing.assert_close(t, sch.sigmas, rtol=2e-7, atol=0)


def test_resolution_shift_matches_dynamic_shifting() -> None:
    """Our α = shift·sqrt(h·w)/base is diffusers' use_dynamic_shifting with μ = log α."""
    sched = FlowSchedule(shift=1.5, shift_base_size=8)
    alpha = sched.shift_for((16, 16))
    sch = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sch.set_timesteps(5, mu=math.log(alpha))
    grid = flow_grid(sched, 5, (16, 16))
    torch.testing.assert_close(grid.timesteps, sch.timesteps.float(), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        cross_attention_dim=16, norm_num_groups=32,
    ).eval()  # fmt: skip


@pytest.mark.parametrize(
    "sampler, cls",
    [
        ("euler", "FlowMatchEulerDiscreteScheduler"),
        ("heun", "FlowMatchHeunDiscreteScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
    ],
)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampler_matches_diffusers_scheduler_with_cfg(
    unet: torch.nn.Module, sampler: str, cls: str, shift: float
) -> None:
    """The scheduler built from_config steps the same U-Net from the same latents, with CFG."""
    steps, scale = 5, 4.0
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    config = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift).config
    if sampler == "dpmpp_2m":  # diffusers' flow DPM-Solver++ (as Wan and SANA configure it)
        config = diffusers.DPMSolverMultistepScheduler(
            use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift
        ).config
    sch = getattr(diffusers, cls).from_config(config)
    sch.set_timesteps(steps)
    x = latents * getattr(sch, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in sch.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            v_u, v_c = out.chunk(2)
            x = sch.step(v_u + scale * (v_c - v_u), t, x).prev_sample

    def net(x_t: torch.Tensor, ts: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x_t, ts, encoder_hidden_states=context).sample

    sched = FlowSchedule(shift=shift)
    guided = CFGDenoiser(Denoiser(net, sched), {"context": cond}, {"context": uncond}, scale=scale)
    ours = Sampler(sampler, steps, disable_progress=True)(guided, latents, sched)
    rel = float((ours - x).norm() / x.norm())
    assert rel < 1e-4, rel


@pytest.mark.parametrize(
    "cls, sampler",
    [("FlowMatchEulerDiscreteScheduler", "euler"), ("FlowMatchHeunDiscreteScheduler", "heun")],
)
def test_flow_scheduler_folder_reads_as_a_flow_model(
    tmp_path: Path, cls: str, sampler: str
) -> None:
    import json

    from ldm.checkpoint.diffusers_layout import diffusion_section, sampling_section
    from ldm.checkpoint.format import CheckpointError

    getattr(diffusers, cls)(shift=3.0).save_config(tmp_path)
    config = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert diffusion_section(config) == {
        "objective": "flow",
        "num_timesteps": 1000,
        "flow_shift": 3.0,
    }
    assert sampling_section(config) == {"sampler": sampler}
    with pytest.raises(CheckpointError, match="use_dynamic_shifting=True .* not reproduced"):
        diffusion_section({**config, "use_dynamic_shifting": True})
