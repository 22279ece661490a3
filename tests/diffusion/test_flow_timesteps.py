"""The training-time densities of Esser et al. 2024 (SD3), §3.1 / Table 1, in closed form: the
drawn t follow the analytic CDFs (Kolmogorov–Smirnov, fixed seeds), the maps hit their formulas
at known points, and the config keys reach the loss the trainer builds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from ldm import build
from ldm.config import load
from ldm.diffusion.flow import sample_flow_t, shift_t
from ldm.diffusion.flow_loss import MODE_SCALE_MAX, FlowLoss

ROOT = Path(__file__).resolve().parents[2]
N = 20000
P_MIN = 1e-3  # a correct sampler fails this with probability 1e-3 per seed (fixed seeds here)


def f_mode(u: np.ndarray, s: float) -> np.ndarray:
    """Esser et al. eq. 20."""
    return 1 - u - s * (np.cos(np.pi / 2 * u) ** 2 - 1 + u)


def mode_cdf(s: float):  # noqa: ANN201 - a numpy callable for scipy
    """F(t) = 1 − f_mode⁻¹(t; s) (f_mode decreases from 1 to 0), inverted by bisection."""

    def cdf(t: np.ndarray) -> np.ndarray:
        lo, hi = np.zeros_like(t), np.ones_like(t)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f_mode(mid, s) > t  # f decreasing: the root is right of mid
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    return cdf


def cosmap_cdf(t: np.ndarray) -> np.ndarray:
    """F(t) = (2/π)·arctan(t/(1 − t)): its derivative is eq. 21's π(t) = 2/(π − 2πt + 2πt²)."""
    return 2 / np.pi * np.arctan2(t, 1 - t)


def logit_normal_cdf(m: float, s: float):  # noqa: ANN201
    """F(t) = Φ((logit t − m)/s) (eq. 19's π_ln integrated)."""
    return lambda t: stats.norm.cdf((np.log(t) - np.log1p(-t) - m) / s)


CASES = [
    ("uniform", {}, lambda t: t),
    ("logit_normal", {}, logit_normal_cdf(0.0, 1.0)),
    ("logit_normal", {"logit_mean": 0.5, "logit_std": 0.6}, logit_normal_cdf(0.5, 0.6)),
    ("mode", {"mode_scale": 1.29}, mode_cdf(1.29)),
    ("mode", {"mode_scale": -0.5}, mode_cdf(-0.5)),
    ("cosmap", {}, cosmap_cdf),
]


@pytest.mark.parametrize("method, kw, cdf", CASES)
def test_drawn_t_follow_the_analytic_density(method: str, kw: dict, cdf) -> None:  # noqa: ANN001
    t = sample_flow_t(N, method, torch.Generator().manual_seed(0), **kw).double().numpy()
    assert stats.kstest(t, cdf).pvalue > P_MIN
    # a wrong density is rejected by the same test (uniform vs the others, and vice versa)
    other = (lambda x: x) if method != "uniform" else cosmap_cdf
    assert stats.kstest(t, other).pvalue < 1e-6


def test_the_maps_at_known_points() -> None:
    """The same uniform draws u give t = f(u): f_mode(½; s) = ½ for every s, f_mode(0) = 1,
    f_mode(1) = 0; cosmap(½) = ½, its density at ½ is 4/π; mode's at ½ is 1/(1 + s(1 − π/2))."""
    u = torch.rand(N, generator=torch.Generator().manual_seed(3))
    for s in (-1.0, 0.0, 1.29, MODE_SCALE_MAX):
        t = sample_flow_t(N, "mode", torch.Generator().manual_seed(3), mode_scale=s)
        torch.testing.assert_close(
            t, torch.from_numpy(f_mode(u.double().numpy(), s)).float(), rtol=0, atol=1e-6
        )
        assert abs(f_mode(np.array(0.5), s) - 0.5) < 1e-12 and f_mode(np.array(0.0), s) == 1
        assert abs(f_mode(np.array(1.0), s)) < 1e-12
        if s == MODE_SCALE_MAX:  # f_mode'(½) = 0 there: the density at ½ is unbounded
            continue
        e = 1e-4  # the density at ½ from the CDF's central difference
        dens = (mode_cdf(s)(np.array(0.5 + e)) - mode_cdf(s)(np.array(0.5 - e))) / (2 * e)
        assert abs(dens - 1 / (1 + s * (1 - math.pi / 2))) < 1e-4, s
    t = sample_flow_t(N, "cosmap", torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        t.double(), 1 - 1 / (torch.tan(math.pi / 2 * u.double()) + 1), rtol=0, atol=1e-6
    )
    e = 1e-5
    assert (
        abs((cosmap_cdf(np.array(0.5 + e)) - cosmap_cdf(np.array(0.5 - e))) / (2 * e) - 4 / math.pi)
        < 1e-6
    )
    n = torch.randn(N, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        sample_flow_t(
            N, "logit_normal", torch.Generator().manual_seed(4), logit_mean=0.5, logit_std=0.6
        ),
        torch.sigmoid(0.5 + 0.6 * n),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("alpha", [3.0, 0.5])
def test_shifted_t_follow_the_pushed_forward_density(alpha: float) -> None:
    """t_α = αt/(1 + (α − 1)t) (Esser et al. eq. 23) has CDF F(t_α/(α − (α − 1)t_α))."""
    t = shift_t(sample_flow_t(N, "uniform", torch.Generator().manual_seed(5)), alpha)
    t = t.double().numpy()
    assert stats.kstest(t, lambda x: x / (alpha - (alpha - 1) * x)).pvalue > P_MIN
    assert stats.kstest(t, lambda x: x).pvalue < 1e-6


@pytest.mark.parametrize(
    "method, overrides, cdf",
    [
        ("cosmap", [], cosmap_cdf),
        ("mode", ["model.diffusion.flow_mode_scale=1.75"], mode_cdf(1.75)),
        (
            "logit_normal",
            ["model.diffusion.flow_logit_mean=-0.5", "model.diffusion.flow_logit_std=0.8"],
            logit_normal_cdf(-0.5, 0.8),
        ),
    ],
)
def test_config_keys_reach_the_training_loss(method: str, overrides: list[str], cdf) -> None:  # noqa: ANN001
    """The loss `train.py` builds from ``model.diffusion.flow_*`` feeds the network T·t with
    t from the configured density, shifted by ``flow_shift``."""
    cfg = load(
        [ROOT / "configs" / "ldm" / "tiny.yaml"],
        [
            "model.diffusion.objective=flow",
            f"model.diffusion.flow_timestep_sampling={method}",
            "model.diffusion.flow_shift=2.0",
            *overrides,
        ],
    )
    loss, schedule = (
        build.build_diffusion_loss(cfg.model.diffusion),
        build.build_schedule(cfg.model.diffusion),
    )
    seen: list[torch.Tensor] = []

    def net(x_t: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        seen.append(ts)
        return torch.zeros_like(x_t)

    loss(net, torch.zeros(N, 1, 1, 1), schedule, generator=torch.Generator().manual_seed(6))
    t = (seen[0] / schedule.num_timesteps).double().numpy()
    unshift = lambda x: x / (2.0 - x)  # noqa: E731 - the inverse of shift_t(·, 2)
    assert stats.kstest(t, lambda x: cdf(unshift(x))).pvalue > P_MIN


def test_bad_density_parameters_fail_in_one_line() -> None:
    with pytest.raises(ValueError, match=r"flow_mode_scale must be in \[-1, 1.7519\]"):
        FlowLoss("mode", mode_scale=2.0)
    with pytest.raises(ValueError, match="flow_logit_std must be > 0"):
        FlowLoss("logit_normal", logit_std=0.0)
