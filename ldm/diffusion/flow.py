"""Flow matching (rectified flow): the straight-line process, its training loss and its grid.

The forward process interpolates linearly between data and noise (Lipman et al. 2023, "Flow
Matching for Generative Modeling", eq. 22 with σ_min = 0; Liu et al. 2023, "Flow Straight and
Fast", eq. 1; Esser et al. 2024, "Scaling Rectified Flow Transformers", §2 eq. 1 with
a_t = 1 − t, b_t = t):

    x_t = (1 − t)·x0 + t·ε,  t ∈ [0, 1],  dx_t/dt = v = ε − x0.

The network predicts v (the conditional flow-matching target, Lipman et al. eq. 23). In the
k-diffusion σ-space every sampler and guidance works in, x = x_t/(1 − t) = x0 + σ·ε with
σ = t/(1 − t), so `FlowSchedule` exposes the same σ-facing interface as `NoiseSchedule`
(``sigma_to_t``, ``num_timesteps``, the σ range) and `flow_predict` is the one place that turns
a velocity into x̂0. Network timesteps follow diffusers' SD3 convention: timestep = 1000·t.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

OBJECTIVES = ("ddpm", "flow")
FLOW_TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "cosmap")


def shift_t(t: Tensor, shift: float) -> Tensor:
    """The timestep shift of SD3: t_m = α·t / (1 + (α − 1)·t) (Esser et al. 2024, §5.3.2 eq. 23).

    α > 1 moves t towards noise (needed at high resolution); α = 1 is the identity. This is also
    diffusers' ``shift`` and, with α = e^μ, its exponential ``time_shift(μ, 1, t)``.
    """
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(shift: float, base_size: int, height: int, width: int) -> float:
    """α for a latent of ``height`` × ``width``: shift·sqrt(h·w / base²) (Esser et al. eq. 23).

    SD3's α = sqrt(m/n) maps the timesteps tuned at n pixels to m pixels; the latent-pixel ratio is
    the same. ``base_size`` = 0 keeps the static ``shift``.
    """
    if base_size <= 0:
        return float(shift)
    return float(shift) * math.sqrt(height * width) / base_size


def sample_flow_t(
    batch_size: int,
    method: str = "logit_normal",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> Tensor:
    """Draw training times t ∈ (0, 1) (Esser et al. 2024, §3.1, the densities of Table 1).

    Args:
        batch_size: B.
        method: ``uniform`` (rf), ``logit_normal`` (π_ln(t; m, s) = N(logit t; m, s²)·1/(t(1 − t)),
            eq. 19: t = sigmoid(m + s·n), n ~ N(0, 1)), ``mode`` (eq. 20: t = f_mode(u; s) =
            1 − u − s·(cos²(π/2·u) − 1 + u), u ~ U(0, 1)) or ``cosmap`` (eq. 21:
            t = 1 − 1/(tan(π/2·u) + 1)).
        generator: optional generator (draws on its device).
        device: result device.
        logit_mean: m of ``logit_normal``.
        logit_std: s of ``logit_normal``.
        mode_scale: s of ``mode`` (−1 ≤ s ≤ 2/(π − 2); 1.29 is SD3's mode(1.29)).

    Returns:
        (B,) float32 times.
    """
    draw = generator.device if generator is not None else device
    if method == "logit_normal":
        n = torch.randn(batch_size, generator=generator, device=draw)
        return torch.sigmoid(logit_mean + logit_std * n).to(device)
    u = torch.rand(batch_size, generator=generator, device=draw)
    if method == "uniform":
        t = u
    elif method == "mode":
        t = 1 - u - mode_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    elif method == "cosmap":
        t = 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
    else:
        raise ValueError(
            f"unknown flow timestep sampling {method!r}; valid: {', '.join(FLOW_TIMESTEP_SAMPLING)}"
        )
    return t.clamp(0, 1).to(device)


class FlowSchedule(nn.Module):
    """The rectified-flow "schedule": σ = t/(1 − t) and network timestep 1000·t.

    An ``nn.Module`` without buffers so that it sits where a `NoiseSchedule` does.

    Args:
        num_timesteps: the network's timestep scale T (diffusers' ``num_train_timesteps``).
        shift: the static shift α (`shift_t`) for training draws and sampling grids.
        shift_base_size: > 0: α = shift·sqrt(h·w)/shift_base_size for an h × w latent
            (`resolution_shift`); 0: the static α.
    """

    is_flow = True

    def __init__(
        self, num_timesteps: int = 1000, shift: float = 1.0, shift_base_size: int = 0
    ) -> None:
        super().__init__()
        if shift <= 0:
            raise ValueError(f"flow shift must be > 0, got {shift}")
        self.num_timesteps = num_timesteps
        self.shift = float(shift)
        self.shift_base_size = int(shift_base_size)

    def extra_repr(self) -> str:
        return (
            f"num_timesteps={self.num_timesteps}, shift={self.shift}, "
            f"shift_base_size={self.shift_base_size}"
        )

    def shift_for(self, size: tuple[int, int] | None = None) -> float:
        """α for a latent of ``size`` = (h, w) (the static shift when None or base is 0)."""
        if size is None:
            return self.shift
        return resolution_shift(self.shift, self.shift_base_size, int(size[0]), int(size[1]))

    @property
    def sigma_min(self) -> float:
        """σ at t = 1/T (diffusers' smallest training σ_t, unshifted)."""
        t = 1 / self.num_timesteps
        return t / (1 - t)

    @property
    def sigma_max(self) -> float:
        """σ at t = 1: infinite (x_1 is pure noise)."""
        return math.inf

    @staticmethod
    def sigma_to_flow_t(sigma: Tensor) -> Tensor:
        """t = σ/(1 + σ) (1 at σ = ∞), in the dtype of ``sigma``."""
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))

    @staticmethod
    def flow_t_to_sigma(t: Tensor) -> Tensor:
        """σ = t/(1 − t) (∞ at t = 1)."""
        return torch.where(t >= 1, torch.full_like(t, math.inf), t / (1 - t).clamp(min=1e-30))

    def sigma_to_t(self, sigma: Tensor, quantize: bool = False) -> Tensor:
        """Network timestep T·t(σ) as float32 (diffusers' SD3 ``timestep = σ_t·1000``)."""
        t = self.sigma_to_flow_t(sigma.double()) * self.num_timesteps
        return (t.round() if quantize else t).float()


def is_flow(schedule: Any) -> bool:
    """Whether ``schedule`` is a flow-matching schedule."""
    return bool(getattr(schedule, "is_flow", False))


def flow_predict(
    net: Callable[..., Tensor], x: Tensor, sigma: Tensor, timestep: Tensor, **cond: Any
) -> tuple[Tensor, Tensor]:
    """(x̂0, ε̂) from a velocity network at σ-space ``x`` (the `Denoiser` for flow models).

    x_t = x/(1 + σ) = (1 − t)·x (x itself at σ = ∞, the state there being x_1 = ε); with
    v̂ = net(x_t, T·t): x̂0 = x_t − t·v̂, ε̂ = x_t + (1 − t)·v̂ (inverting x_t = (1 − t)·x0 + t·ε,
    v = ε − x0; Esser et al. 2024, §2).

    Args:
        net: ``net(x_t, timestep, **cond) -> v̂``.
        x: (B, ...) σ-space sample.
        sigma: (B,) float32 σ (may be ∞).
        timestep: (B,) float32 network timesteps.
        **cond: conditioning for the network.
    """
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    t = FlowSchedule.sigma_to_flow_t(s)
    x_t = torch.where(torch.isinf(s), x.float(), x.float() / (1 + s))
    v = net(x_t.to(x.dtype), timestep, **cond).float()
    x0, eps = x_t - t * v, x_t + (1 - t) * v
    return x0.to(x.dtype), eps.to(x.dtype)


__all__ = [
    "FLOW_TIMESTEP_SAMPLING",
    "OBJECTIVES",
    "FlowSchedule",
    "flow_predict",
    "is_flow",
    "resolution_shift",
    "sample_flow_t",
    "shift_t",
]
