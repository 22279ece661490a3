"""The σ grid a sampler walks, as diffusers' schedulers build it (default) or our exact one.

`Grid` bundles everything a sampling run needs besides the network: the σ's the network is
evaluated at, the network timestep at each of them, how DDPM-space prior noise becomes the first
σ-space sample and how the last one is read back. `diffusers_grid` reproduces, sampler by
sampler, what diffusers' scheduler of the same name does with ``set_timesteps`` (checked against
diffusers 0.42), quirks included, so that the same settings give the same image:

* ``ddim`` (`DDIMScheduler`): integer timesteps; step i lands on t_i − T//N (not on t_{i+1}:
  with ``trailing``/``linspace`` spacing, or N not dividing T, the next step reads the same x_t
  at t_{i+1}), the last on ᾱ = 1 (``set_alpha_to_one``) or ᾱ_0; exact ᾱ_T = 0 with zero
  terminal SNR (σ = ∞: the sample is x_T itself).
* ``ddpm`` (`DDPMScheduler`): the same integer timesteps, each step landing on the next one,
  the last on ᾱ = 1.
* ``euler``, ``euler_a``, ``heun`` (`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`,
  `HeunDiscreteScheduler`): fractional ``linspace`` timesteps fed to the network as they are,
  σ interpolated linearly in σ, Karras σ's between the grid's ends (not Euler-a), prior noise
  scaled by σ_max for ``linspace``/``trailing`` and by sqrt(1 + σ_max²) for ``leading``, and
  the final σ-space sample returned as is; ᾱ_T = 2⁻²⁴ with zero terminal SNR (diffusers' Heun
  has no zero terminal SNR at all; ours uses 2⁻²⁴ there too).
* ``dpmpp_2m`` (`DPMSolverMultistepScheduler`, DPM-Solver++ order 2): ``leading``/``linspace``
  grids over N + 1 points with the last dropped, Karras σ's over the whole training range with
  rounded timesteps, a first-order last step below 15 steps; ᾱ_T = 2⁻²⁴ with zero terminal SNR.

`exact_grid` is the grid before this module existed (``sampling.grid: exact``): the spaced
timesteps of `ldm.diffusion.timesteps.get_sigmas` for every sampler, t = t(σ) by log-σ
interpolation, DDPM-space noise scaled by sqrt(1 + σ_max²) and the result read back likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timesteps import get_sigmas, karras_sigmas, spaced_timesteps

GRIDS = ("diffusers", "exact")
KARRAS_SAMPLERS = frozenset({"euler", "heun", "dpmpp_2m"})  # diffusers offers Karras σ's there
# The diffusers scheduler class each sampler reproduces.
SCHEDULER_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@dataclass(frozen=True)
class Grid:
    """One sampling run's grid.

    Attributes:
        sigmas: (N + 1,) float32 CPU, descending: the network runs at ``sigmas[i]`` (i < N).
        timesteps: (N,) float32 network timesteps at ``sigmas[:-1]``; None: t = t(σ).
        init_scale: the first σ-space sample is DDPM-space noise × ``init_scale`` (1 when
            ``sigmas[0]`` is ∞, where the sample is x_T itself).
        final_scale: the result is the last σ-space sample / ``final_scale``.
        sigmas_to: (N,) where step i lands when that is not ``sigmas[i + 1]`` (DDIM); None else.
        lower_order_final: DPM-Solver++: take the last step at first order.
    """

    sigmas: Tensor
    timesteps: Tensor | None
    init_scale: float
    final_scale: float
    sigmas_to: Tensor | None = None
    lower_order_final: bool = False


def _scale(sigma: float) -> float:
    """sqrt(1 + σ²): DDPM space → σ space (1 at σ = ∞, where the state is x_T itself)."""
    return 1.0 if math.isinf(sigma) else math.sqrt(1.0 + sigma**2)


def exact_sigma_table(schedule: NoiseSchedule) -> Tensor:
    """(T,) float32 σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) from the exact ᾱ (∞ at ᾱ_T = 0), as DDIM/DDPM."""
    abar = schedule.alphas_cumprod.detach().cpu()
    return ((1 - abar) / abar) ** 0.5


def sigma_to_t_float64(schedule: NoiseSchedule, sigma: Tensor) -> Tensor:
    """diffusers' ``_sigma_to_t``: log-σ interpolation in float64 over the float32 log table."""
    log_table = schedule.sigmas.detach().cpu().log().double()
    log_sigma = sigma.double().clamp(min=1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma, right=True) - 1).clamp(0, len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def _integer_timesteps(num_steps: int, num_timesteps: int, spacing: str, offset: int) -> Tensor:
    """DDIM/DDPM ``set_timesteps``: (N,) int64 descending."""
    if spacing == "linspace":
        t = torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64).round()
        return t.flip(0).long()
    return spaced_timesteps(num_steps, num_timesteps, spacing, offset).long()


def _dpm_timesteps(num_steps: int, num_timesteps: int, spacing: str, offset: int) -> Tensor:
    """DPMSolverMultistepScheduler ``set_timesteps``: N + 1 points, the last dropped."""
    if spacing == "linspace":
        t = torch.linspace(0, num_timesteps - 1, num_steps + 1, dtype=torch.float64).round()
        return t.flip(0)[:-1].long()
    if spacing == "leading":
        ratio = num_timesteps // (num_steps + 1)
        return (torch.arange(num_steps + 1) * ratio).flip(0)[:-1] + offset
    return spaced_timesteps(num_steps, num_timesteps, spacing, offset).long()


def _check_timesteps(t: Tensor, num_timesteps: int, what: str) -> None:
    if int(t.max()) > num_timesteps - 1:
        raise ValueError(
            f"{what} reaches timestep {int(t.max())} >= {num_timesteps} (lower "
            "sampling.steps_offset or the steps, or use another spacing)"
        )
    if len(t) > 1 and not bool((t[:-1] > t[1:]).all()):
        raise ValueError(
            f"{what} repeats timesteps (too many steps for this spacing; use trailing or linspace)"
        )


def diffusers_grid(
    schedule: NoiseSchedule,
    sampler: str,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    final_sigma: str = "zero",
    set_alpha_to_one: bool = True,
) -> Grid:
    """The grid diffusers' scheduler for ``sampler`` walks (see the module docstring).

    Args:
        schedule: the model's noise schedule.
        sampler: ``ddim``, ``ddpm``, ``euler``, ``euler_a``, ``heun`` or ``dpmpp_2m``.
        steps: N.
        spacing: ``leading``, ``trailing`` or ``linspace`` (``timestep_spacing``).
        steps_offset: added to ``leading`` timesteps (``steps_offset``).
        karras: ``use_karras_sigmas`` (euler, heun, dpmpp_2m only).
        final_sigma: ``final_sigmas_type`` of euler and dpmpp_2m (``zero`` or ``sigma_min``).
        set_alpha_to_one: DDIM's last step lands on ᾱ = 1 (σ = 0) rather than on ᾱ_0.

    Raises:
        ValueError: Karras σ's for a sampler whose diffusers scheduler has none, or a grid that
            leaves [0, T − 1] or repeats a timestep.
    """
    T = schedule.num_timesteps
    what = f"{sampler} with {steps} {spacing} steps"
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ValueError(
            f"diffusers' {SCHEDULER_CLASSES[sampler]} has no Karras sigmas; use "
            f"sampling.karras=false or sampling.grid=exact"
        )
    if sampler in ("ddim", "ddpm"):
        t = _integer_timesteps(steps, T, spacing, steps_offset)
        _check_timesteps(t, T, what)
        table = exact_sigma_table(schedule)
        sigmas = table[t]
        if sampler == "ddim":
            prev = t - T // steps
            final = 0.0 if set_alpha_to_one else float(table[0])
            to = torch.where(prev >= 0, table[prev.clamp(min=0)], torch.tensor(final))
        else:
            to = torch.cat([sigmas[1:], torch.zeros(1)])
        grid = torch.cat([sigmas, to[-1:]])
        return Grid(
            grid,
            t.float(),
            _scale(float(sigmas[0])),
            _scale(float(to[-1])),
            sigmas_to=to if sampler == "ddim" else None,
        )
    last = schedule.sigma_min if final_sigma == "sigma_min" else 0.0
    if sampler == "dpmpp_2m":
        if karras:
            sig = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
            t = sigma_to_t_float64(schedule, sig)
            if schedule.schedule != "cosine":  # diffusers rounds unless squaredcos_cap_v2
                t = t.round()
        else:
            t = _dpm_timesteps(steps, T, spacing, steps_offset)
            _check_timesteps(t, T, what)
            sig = schedule.t_to_sigma(t.double())
        grid = torch.cat([sig, sig.new_tensor([last])]).float()
        return Grid(
            grid,
            t.float(),
            _scale(float(grid[0])),
            _scale(float(grid[-1])),
            lower_order_final=steps < 15,
        )
    # Euler, Euler-ancestral, Heun: σ-space state, fractional timesteps
    t = spaced_timesteps(steps, T, spacing, steps_offset)
    _check_timesteps(t, T, what)
    sig = schedule.t_to_sigma(t)
    if karras:
        sig = karras_sigmas(steps, float(sig[-1]), float(sig[0]))
        t = sigma_to_t_float64(schedule, sig)
    if sampler != "euler":
        last = 0.0  # Heun and Euler-ancestral always end at 0
    grid = torch.cat([sig, sig.new_tensor([last])]).float()
    sigma_max = grid.max()
    init = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return Grid(grid, t.float(), float(init), 1.0)


def exact_grid(
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    final_sigma: str = "zero",
) -> Grid:
    """Our own grid for every sampler (`get_sigmas`), t = t(σ), DDPM space in and out."""
    sigmas = get_sigmas(schedule, steps, spacing, steps_offset, karras, final_sigma)
    return Grid(sigmas, None, _scale(float(sigmas[0])), _scale(float(sigmas[-1])))


__all__ = [
    "GRIDS",
    "KARRAS_SAMPLERS",
    "SCHEDULER_CLASSES",
    "Grid",
    "diffusers_grid",
    "exact_grid",
    "exact_sigma_table",
    "sigma_to_t_float64",
]
