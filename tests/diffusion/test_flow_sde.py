"""The stochastic flow sampler (``euler_sde``): Euler–Maruyama on the reverse SDE that keeps the
flow's marginals, checked on Gaussian data where the velocity, the score and the discrete chain's
variance are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import Denoiser, Sampler
from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.flow_sampling import flow_grid, sample_flow_euler, sample_flow_euler_maruyama
from ldm.diffusion.schedules import NoiseSchedule

SIGMA_D = 0.5


def optimal_velocity(x_t: torch.Tensor, timestep: torch.Tensor, **_: object) -> torch.Tensor:
    """E[ε − x0 | x_t] for x0 ~ N(0, σ_d²)."""
    t = (timestep / 1000).reshape(-1, *([1] * (x_t.ndim - 1))).double()
    x0 = (1 - t) * SIGMA_D**2 / ((1 - t) ** 2 * SIGMA_D**2 + t**2) * x_t.double()
    return ((x_t.double() - x0) / t).float()


def chain_variance(ts: list[float], noise_scale: float = 1.0) -> float:
    """Var of the Euler–Maruyama chain from x_1 ~ N(0, 1), computed step by step.

    With x̂0 = k_t·x_t (k_t = (1 − t)σ_d²/((1 − t)²σ_d² + t²)), v̂ = (1 − k_t)x_t/t and
    ε̂ = x_t + (1 − t)v̂, each step is x' = a·x + sqrt(η·t·h)·z, so Var' = a²·Var + η·t·h.
    """
    var = 1.0
    for t, t_next in zip(ts, ts[1:], strict=False):
        h = t - t_next
        k = (1 - t) * SIGMA_D**2 / ((1 - t) ** 2 * SIGMA_D**2 + t**2)
        if t_next <= 0:  # the noise-free last step onto x̂0
            var *= k * k
            continue
        a = 1 - h * (1 - k) / t - 0.5 * noise_scale * h * (1 + (1 - t) * (1 - k) / t)
        var = a * a * var + noise_scale * t * h
    return var


def test_euler_sde_reaches_the_data_variance_at_first_order() -> None:
    """The sample's variance is the chain's (Monte Carlo error only), and the chain's converges
    to σ_d² at weak order 1: the error halves as the steps double."""
    sched = FlowSchedule()
    noise = torch.randn(16, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    mc = 4 * math.sqrt(2 / noise.numel())  # 4 standard errors of a sample variance
    errs = []
    for n in (8, 16, 32, 64):
        g = torch.Generator().manual_seed(n)
        out = Sampler("euler_sde", n, disable_progress=True)(
            Denoiser(optimal_velocity, sched), noise, sched, generator=g
        )
        ts = FlowSchedule.sigma_to_flow_t(flow_grid(sched, n).sigmas.double()).tolist()
        exact = chain_variance(ts)
        assert abs(float(out.var()) / exact - 1) < mc, (n, float(out.var()), exact)
        assert abs(float(out.mean())) < 4 * SIGMA_D / math.sqrt(noise.numel()), n
        errs.append(abs(exact / SIGMA_D**2 - 1))
    ratios = [a / b for a, b in zip(errs, errs[1:], strict=False)]
    assert errs[-1] < 0.03 and all(abs(math.log2(r) - 1) < 0.25 for r in ratios), (errs, ratios)
    # the SDE is not the ODE: the same noise, different samples, the same law
    ode = Sampler("euler", 64, disable_progress=True)(
        Denoiser(optimal_velocity, sched), noise, sched
    )
    assert float((ode - out).abs().mean()) > 0.1


def test_noise_scale_zero_is_euler_and_samples_follow_their_own_seed() -> None:
    sched = FlowSchedule(shift=3.0)
    d = Denoiser(optimal_velocity, sched)
    sigmas = flow_grid(sched, 6).sigmas
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        sample_flow_euler_maruyama(d, x, sigmas, noise_scale=0.0, disable_progress=True),
        sample_flow_euler(d, x, sigmas, disable_progress=True),
        rtol=0,
        atol=0,
    )
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    batch = Sampler("euler_sde", 6, disable_progress=True)(d, x, sched, generator=gens)
    alone = Sampler("euler_sde", 6, disable_progress=True)(
        d, x[1:2], sched, generator=[torch.Generator().manual_seed(6)]
    )
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=0)
    again = Sampler("euler_sde", 6, disable_progress=True)(
        d, x, sched, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    )
    torch.testing.assert_close(batch, again, rtol=0, atol=0)
    with pytest.raises(ValueError, match="noise_scale must be >= 0"):
        sample_flow_euler_maruyama(d, x, sigmas, noise_scale=-1.0)


def test_euler_sde_refuses_ddpm_models_in_one_line() -> None:
    with pytest.raises(ValueError, match="'euler_sde' runs flow-matching models only .*euler_a"):
        Sampler("euler_sde", 4).grid(NoiseSchedule())
