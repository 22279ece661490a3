"""Sampling a flow-matching model: diffusers' flow grid, Euler/Heun on the flow ODE, and the
Euler–Maruyama sampler of the marginal-preserving reverse SDE.

The samplers integrate dx_t/dt = v(x_t, t) from t = 1 (x_1 = ε, the prior noise itself) to
t = 0 in the flow's own time t, calling the σ-space denoiser (so `CFGDenoiser` and guidance work
unchanged): at t, x = x_t/(1 − t), σ = t/(1 − t), x̂0 = D(x, σ) and v̂ = (x_t − x̂0)/t.

Euler in σ-space is Euler in t exactly: both land on x_t' = (1 − t')·x̂0 + t'·ε̂ (the DDIM
update), so `ldm.diffusion.samplers.sample_euler` would agree but for the σ = ∞ start. Heun does
not: the trapezoid in σ averages ε̂ (dx/dσ), the one in t averages v̂ (dx_t/dt), and σ(t) is not
affine, so the flow Heun below is the one diffusers' `FlowMatchHeunDiscreteScheduler` runs.
DPM-Solver++(2M) is the σ-space `ldm.diffusion.samplers.sample_dpmpp_2m` on `flow_dpm_grid`.

`run_flow_sampler` is the σ-space entry (`Sampler.run` calls it for a `FlowGrid`): it takes and
returns σ-space samples, so img2img and inpainting walk a tail of a flow grid as for DDPM models.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.flow import FlowSchedule, shift_t
from ldm.diffusion.grids import Grid
from ldm.diffusion.noise import Generators, randn
from ldm.diffusion.samplers import Callback, DenoiserFn, _report, _steps, sample_dpmpp_2m

FLOW_SCHEDULER_CLASSES = {
    "euler": "FlowMatchEulerDiscreteScheduler",
    "heun": "FlowMatchHeunDiscreteScheduler",
}
# DPM-Solver++(2M) runs in σ-space as for DDPM models (its update x' = (σ'/σ)·x − (e^{−h} − 1)·D,
# λ = −log σ, is the same for any process written as x = x0 + σ·ε; Lu et al. 2022, Alg. 2) on the
# grid of diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=α).
FLOW_DPM = "dpmpp_2m"
FLOW_ONLY = frozenset({"euler_sde"})  # samplers that run flow-matching models only
FLOW_STOCHASTIC = frozenset({"euler_sde"})  # these accept ``generator``


@dataclass(frozen=True)
class FlowGrid(Grid):
    """A `Grid` of a flow-matching model: `Sampler.run` walks it with the flow samplers."""


def flow_grid(schedule: FlowSchedule, steps: int, size: tuple[int, int] | None = None) -> Grid:
    """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)``.

    t runs linspace(t_max, t_min, N) over the shifted training times (t_max = 1, t_min = the
    shifted 1/T, computed in float32 as diffusers' constructor does), is shifted by α
    (`shift_t`, float64), cast to float32, and ends at 0; network timesteps are T·t. The shift is
    the schedule's α for a latent of ``size`` (`FlowSchedule.shift_for`). Returned in σ-space
    (σ = t/(1 − t), ∞ first) with unit prior and final scales.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = schedule.num_timesteps
    alpha = schedule.shift_for(size)
    table = torch.linspace(1, T, T, dtype=torch.float32).flip(0) / T  # diffusers' __init__
    if schedule.shift_base_size <= 0:  # diffusers shifts the table unless shifting dynamically
        table = schedule.shift * table / (1 + (schedule.shift - 1) * table)
    t_max, t_min = float(table[0]) * T, float(table[-1]) * T
    ts = (
        torch.linspace(t_max, t_min, steps, dtype=torch.float64)
        if steps > 1
        else torch.tensor([t_max], dtype=torch.float64)
    )
    t = shift_t(ts / T, alpha).float()
    sigmas = FlowSchedule.flow_t_to_sigma(torch.cat([t, t.new_zeros(1)]).double()).float()
    return FlowGrid(sigmas, (t * T).float(), 1.0, 1.0)


def flow_dpm_grid(schedule: FlowSchedule, steps: int, size: tuple[int, int] | None = None) -> Grid:
    """The grid of diffusers' ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas``.

    t = shift(1 − linspace(1, 1/T, N + 1)) reversed without its last point (so it starts just
    below 1, at finite σ), then 0; network timesteps ⌊T·t⌋ (diffusers casts them to int64); the
    prior noise is read as x_{t_0} (``init_noise_sigma`` = 1), i.e. σ-space scale 1/(1 − t_0).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T = schedule.num_timesteps
    ramp = torch.linspace(1, 1 / T, steps + 1, dtype=torch.float64)
    t = shift_t(1 - ramp, schedule.shift_for(size)).flip(0)[:-1]
    timesteps = (t * T).long().float()
    t32 = torch.cat([t, t.new_zeros(1)]).float()
    sigmas = FlowSchedule.flow_t_to_sigma(t32.double()).float()
    return FlowGrid(sigmas, timesteps, 1 / (1 - float(t32[0])), 1.0, lower_order_final=steps < 15)


def _velocity(
    denoiser: DenoiserFn,
    x_t: Tensor,
    sigma: Tensor,
    t: Tensor,
    extra_args: Mapping[str, Any] | None,
) -> tuple[Tensor, Tensor]:
    """(v̂, x̂0) at flow time t from the σ-space denoiser."""
    x = x_t if bool(torch.isinf(sigma)) else x_t / (1 - t)  # σ-space sample x0 + σ·ε
    x0 = denoiser(x, sigma * x_t.new_ones(x_t.shape[0]), **(extra_args or {}))
    return (x_t - x0) / t, x0


@torch.no_grad()
def sample_flow_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
) -> Tensor:
    """Euler on the flow ODE: x_{t'} = x_t + (t' − t)·v̂ (Liu et al. 2023, eq. 1 discretised).

    Args:
        denoiser: σ-space denoiser.
        x: (B, ...) x_1 = ε (the flow state at ``sigmas[0]``).
        sigmas: (N + 1,) descending σ grid (`flow_grid`).
        extra_args: denoiser keyword arguments.
        callback: per-step callback.
        disable_progress: hide the progress bar.

    Returns:
        The flow state at ``sigmas[-1]`` (x0 when it is 0).
    """
    sigmas = sigmas.to(x.device)
    ts = FlowSchedule.sigma_to_flow_t(sigmas.double()).float()
    for i in _steps(len(sigmas) - 1, disable_progress):
        v, x0 = _velocity(denoiser, x, sigmas[i], ts[i], extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i + 1], x0)
        x = x + (ts[i + 1] - ts[i]) * v
    return x


@torch.no_grad()
def sample_flow_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
) -> Tensor:
    """Heun on the flow ODE: x_{t'} = x_t + (t' − t)·(v̂(x_t, t) + v̂(x̃, t'))/2.

    x̃ is the Euler step; the last step to t = 0 stays Euler (Karras et al. 2022, Alg. 1, as
    diffusers' `FlowMatchHeunDiscreteScheduler`): 2N − 1 network calls. Arguments as
    `sample_flow_euler`.
    """
    sigmas = sigmas.to(x.device)
    ts = FlowSchedule.sigma_to_flow_t(sigmas.double()).float()
    for i in _steps(len(sigmas) - 1, disable_progress):
        v, x0 = _velocity(denoiser, x, sigmas[i], ts[i], extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i + 1], x0)
        dt = ts[i + 1] - ts[i]
        x_next = x + dt * v
        if ts[i + 1] > 0:
            v_next, _ = _velocity(denoiser, x_next, sigmas[i + 1], ts[i + 1], extra_args)
            x_next = x + dt * (v + v_next) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_flow_euler_maruyama(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
    generator: Generators | None = None,
    noise_scale: float = 1.0,
) -> Tensor:
    """Euler–Maruyama on the reverse SDE that keeps the flow's marginals p_t.

    For any diffusion coefficient w_t ≥ 0 the SDE dX = [v + ½·w_t·∇log p_t] dt + sqrt(w_t) dW
    has the marginals of the flow ODE dX = v dt (Fokker–Planck; Ma et al. 2024, "SiT", §2.3;
    Albergo, Boffi & Vanden-Eijnden 2023, "Stochastic Interpolants", §2), and so does its time
    reversal, run here from t = 1 to 0 in steps h = t − t' > 0:

        x_{t'} = x_t − h·v̂ + ½·w_t·h·ŝ + sqrt(w_t·h)·z,  z ~ N(0, I).

    The score follows from the velocity (x_t = (1 − t)·x0 + t·ε, so ∇log p_t = −E[ε | x_t]/t):
    ŝ = −ε̂/t with ε̂ = x_t + (1 − t)·v̂. The diffusion is SiT's ``sigma`` form w_t =
    ``noise_scale``·σ_t = ``noise_scale``·t (its default, norm 1), under which w_t·ŝ = −ε̂ stays
    bounded as t → 0. The last step to t = 0 is the noise-free drift onto x̂0 (SiT's ``Mean``
    last step; the ODE Euler step lands there too). One noise draw per step but the last, after
    the network call, from ``generator`` (one, or one per sample). ``noise_scale`` = 0 is
    `sample_flow_euler`. Other arguments as `sample_flow_euler`.
    """
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    sigmas = sigmas.to(x.device)
    ts = FlowSchedule.sigma_to_flow_t(sigmas.double()).float()
    host = ts.cpu()
    for i in _steps(len(sigmas) - 1, disable_progress):
        v, x0 = _velocity(denoiser, x, sigmas[i], ts[i], extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i + 1], x0)
        h = ts[i] - ts[i + 1]
        if host[i + 1] <= 0 or not noise_scale:
            x = x - h * v
            continue
        eps = x + (1 - ts[i]) * v  # ε̂; w_t·ŝ = −noise_scale·ε̂ with w_t = noise_scale·t
        z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x - h * v - 0.5 * noise_scale * h * eps + (noise_scale * ts[i] * h).sqrt() * z
    return x


FLOW_SAMPLERS = {
    "euler": sample_flow_euler,
    "heun": sample_flow_heun,
    "euler_sde": sample_flow_euler_maruyama,
}


def get_flow_sampler(name: str, eta: float = 0.0) -> Any:
    """The flow sampler called ``name`` (one-line ValueError naming the valid ones).

    ``ddim`` with η = 0 is `sample_flow_euler`: DDIM's update x' = x̂0 + σ'·ε̂ (Song et al. 2021,
    eq. 12 in σ-space) is the flow Euler step exactly (module docstring), so the default sampler
    runs flow models too.
    """
    if name == "ddim" and eta == 0:
        return sample_flow_euler
    if name == FLOW_DPM:
        return sample_dpmpp_2m
    try:
        return FLOW_SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"sampler {name!r}{' with eta > 0' if name == 'ddim' else ''} does not "
            "run flow-matching models; use sampling.sampler=euler, heun, euler_sde "
            "or dpmpp_2m"
        ) from None


def run_flow_sampler(
    sampler: str,
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: Generators | None = None,
    callback: Callback | None = None,
    extra_args: Mapping[str, Any] | None = None,
    disable_progress: bool = False,
    lower_order_final: bool = False,
) -> Tensor:
    """Walk ``sigmas`` (part of a `FlowGrid`) with ``sampler``, σ-space in and out.

    ``x`` is the σ-space sample x0 + σ·ε at ``sigmas[0]`` (x_1 = ε itself at σ = ∞); the ODE/SDE
    samplers step the flow state x_t = x/(1 + σ) and the result is read back at ``sigmas[-1]``.
    DPM-Solver++(2M) steps σ-space directly.
    """
    fn = get_flow_sampler(sampler, eta)
    opts: dict[str, Any] = {
        "extra_args": extra_args,
        "callback": callback,
        "disable_progress": disable_progress,
    }
    if sampler == FLOW_DPM:
        return fn(denoiser, x, sigmas, lower_order_final=lower_order_final, **opts)
    if sampler in FLOW_STOCHASTIC:
        opts["generator"] = generator
    first, last = float(sigmas[0]), float(sigmas[-1])
    x_t = x if first == float("inf") else x / (1 + first)
    return fn(denoiser, x_t, sigmas, **opts) * (1 + last)


__all__ = [
    "FLOW_ONLY",
    "FLOW_SAMPLERS",
    "FLOW_SCHEDULER_CLASSES",
    "FLOW_STOCHASTIC",
    "FlowGrid",
    "flow_dpm_grid",
    "flow_grid",
    "get_flow_sampler",
    "run_flow_sampler",
    "sample_flow_euler",
    "sample_flow_euler_maruyama",
    "sample_flow_heun",
]
