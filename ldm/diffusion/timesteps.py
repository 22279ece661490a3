"""Choosing timesteps: training draws (uniform, stratified) and inference σ grids.

Inference grids: the spacings of Lin et al. 2024 (Table 2) as implemented by diffusers'
`EulerDiscreteScheduler` (``steps_offset`` as Stable Diffusion uses with ``leading``), σ
interpolated linearly between integer timesteps, optional Karras sigmas, and a final σ of 0 (or
σ_min). A grid is a descending float32 tensor of ``num_steps + 1`` noise levels; the samplers
step from ``sigmas[i]`` to ``sigmas[i + 1]``. `get_sigmas` is our one grid for every sampler
(``sampling.grid: exact``); `ldm.diffusion.grids` builds from these pieces the grid each diffusers
scheduler walks (the default).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ldm.diffusion.schedules import NoiseSchedule

SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS = ("zero", "sigma_min")
TIMESTEP_SAMPLING = ("uniform", "stratified")


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    method: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw integer training timesteps.

    Args:
        batch_size: B.
        num_timesteps: T; timesteps lie in [0, T − 1].
        method: ``uniform`` (i.i.d. uniform, Ho et al. 2020 Alg. 1) or ``stratified``
            (low-discrepancy: one draw per stratum [iT/B, (i+1)T/B), with a shared uniform offset
            as in the low-discrepancy sampler of Kingma et al. 2021 (VDM), in random order).
        generator: optional generator.
        device: result device.

    Returns:
        (B,) int64 timesteps.
    """
    draw_device = generator.device if generator is not None else device
    if method == "uniform":
        t = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=draw_device)
        return t.to(device)
    if method == "stratified":
        # u_i = (i + v) / B, v ~ U(0, 1) shared: exactly one u per stratum, low discrepancy.
        v = torch.rand((), generator=generator, device=draw_device, dtype=torch.float64)
        strata = torch.arange(batch_size, device=draw_device, dtype=torch.float64)
        t = ((strata + v) * num_timesteps / batch_size).floor().long()  # (B,)
        t = t.clamp(max=num_timesteps - 1)
        perm = torch.randperm(batch_size, generator=generator, device=draw_device)
        return t[perm].to(device)
    raise ValueError(f"unknown timestep sampling {method!r}; valid: {', '.join(TIMESTEP_SAMPLING)}")


def spaced_timesteps(
    num_steps: int, num_timesteps: int = 1000, spacing: str = "leading", steps_offset: int = 0
) -> Tensor:
    """Descending inference timesteps, as diffusers' ``set_timesteps`` computes them.

    Lin et al. 2024, Table 2. With T = 1000, N = 50: ``leading`` gives 980, 960, ..., 0
    (+ ``steps_offset``; Stable Diffusion uses 1), ``trailing`` 999, 979, ..., 19, and
    ``linspace`` 999, 978.6, ..., 0 (fractional, as diffusers' Euler/Heun schedulers; DDIM and
    DDPM round these, and DPM-Solver uses N + 1 points; pass such grids to `sigmas_for_timesteps`).

    Args:
        num_steps: N sampling steps.
        num_timesteps: T training timesteps.
        spacing: ``leading``, ``trailing`` or ``linspace``.
        steps_offset: added to ``leading`` timesteps.

    Returns:
        (N,) float64 timesteps, descending.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if spacing == "leading":
        ratio = num_timesteps // num_steps
        t = torch.arange(num_steps, dtype=torch.float64) * ratio + steps_offset
    elif spacing == "trailing":
        t = torch.arange(num_timesteps, 0, -num_timesteps / num_steps, dtype=torch.float64)
        t = t.round() - 1
    elif spacing == "linspace":
        if num_steps == 1:
            t = torch.zeros(1, dtype=torch.float64)
        else:  # numpy's linspace: i·step, last point set to the end exactly
            step = (num_timesteps - 1) / (num_steps - 1)
            t = torch.arange(num_steps, dtype=torch.float64) * step
            t[-1] = num_timesteps - 1
        t = t.float().double()  # diffusers builds these in float32
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    return t.sort(descending=True).values


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Noise levels of Karras et al. 2022, eq. 5 (ρ = 7).

    σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..N−1.

    Args:
        num_steps: N.
        sigma_min: last σ.
        sigma_max: first σ.
        rho: ρ.

    Returns:
        (N,) float64, descending.
    """
    ramp = torch.zeros(1, dtype=torch.float64)
    if num_steps > 1:  # numpy's linspace(0, 1, N)
        ramp = torch.arange(num_steps, dtype=torch.float64) * (1 / (num_steps - 1))
        ramp[-1] = 1.0
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_for_timesteps(
    schedule: NoiseSchedule,
    timesteps: Tensor,
    karras: bool = False,
    final_sigma: str = "zero",
) -> Tensor:
    """σ grid for given (descending) timesteps, plus the final σ.

    Args:
        schedule: the noise schedule.
        timesteps: (N,) descending, possibly fractional timesteps.
        karras: replace the σ's by `karras_sigmas` between the first and last of them (as
            diffusers' ``use_karras_sigmas``).
        final_sigma: ``zero`` (end on clean samples) or ``sigma_min`` (end at σ(t=0), diffusers'
            ``final_sigmas_type="sigma_min"`` / DDIM's ``set_alpha_to_one=False``).

    Returns:
        (N + 1,) float32 CPU tensor, descending.
    """
    sigmas = schedule.t_to_sigma(timesteps.double())  # float64, exact as np.interp
    if karras:
        sigmas = karras_sigmas(len(sigmas), float(sigmas[-1]), float(sigmas[0]))
    if final_sigma == "zero":
        last = 0.0
    elif final_sigma == "sigma_min":
        last = schedule.sigma_min
    else:
        raise ValueError(f"unknown final_sigma {final_sigma!r}; valid: {', '.join(FINAL_SIGMAS)}")
    return torch.cat([sigmas, sigmas.new_tensor([last])]).float()


def get_sigmas(
    schedule: NoiseSchedule,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    karras: bool = False,
    final_sigma: str = "zero",
) -> Tensor:
    """The σ grid a sampler walks: spaced timesteps → σ (→ Karras) → final σ.

    Args:
        schedule: the noise schedule.
        num_steps: N sampling steps (denoiser calls for first-order samplers).
        spacing: ``leading``, ``trailing`` or ``linspace`` (`spaced_timesteps`).
        steps_offset: offset for ``leading`` (Stable Diffusion: 1).
        karras: Karras et al. 2022 eq. 5 σ's between the grid's first and last σ.
        final_sigma: ``zero`` or ``sigma_min``.

    Returns:
        (N + 1,) float32 CPU tensor, descending.
    """
    timesteps = spaced_timesteps(num_steps, schedule.num_timesteps, spacing, steps_offset)
    return sigmas_for_timesteps(schedule, timesteps, karras, final_sigma)


def prior_scale(sigma_max: float | Tensor) -> float:
    """Std of x at σ_max for unit-variance data: sqrt(1 + σ_max²).

    A DDPM-space prior sample x_T ~ N(0, I) becomes x = x_T·sqrt(1 + σ²) in σ-space.
    """
    return math.sqrt(1.0 + float(sigma_max) ** 2)


__all__ = [
    "FINAL_SIGMAS",
    "SPACINGS",
    "TIMESTEP_SAMPLING",
    "get_sigmas",
    "karras_sigmas",
    "prior_scale",
    "sample_timesteps",
    "sigmas_for_timesteps",
    "spaced_timesteps",
]
