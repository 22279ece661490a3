"""The diffusion core: schedules, parameterisations, loss, guidance and samplers (pure torch).

Design: one DDPM process, two coordinate systems.

* **Training lives in DDPM space.** `NoiseSchedule` holds ᾱ_t (bit-identical to diffusers) and
  the closed form x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε; `diffusion_loss` trains
  ``net(x_t, t, **cond)`` on integer t with an ε, v or x0 target (`DiffusionLoss` fixes options).
* **Sampling lives in σ-space** (k-diffusion / EDM): x = x_t / sqrt(ᾱ_t) = x0 + σ·ε with
  σ_t = sqrt((1 − ᾱ_t)/ᾱ_t). The only bridge is `Denoiser`, which turns the network into
  D(x, σ) ≈ x0 for any parameterisation: it feeds the network x_t = x/sqrt(1 + σ²) and
  t = t(σ) (log-σ interpolation, fractional t allowed) and converts its output to x̂0.
* **Samplers are stateless functions** ``sample_x(denoiser, x, sigmas, **opts) -> x`` over a
  descending σ grid. Step i goes sigmas[i] → sigmas[i+1]; nothing else is remembered.
  `SAMPLERS` / `get_sampler` dispatch by name; `Sampler` bundles name + grid options and maps
  DDPM-space noise to a DDPM-space sample. Its grid (`ldm.diffusion.grids`) is, by default,
  exactly the one diffusers' scheduler of the same name walks (timesteps fed to the network,
  noise scaling, DDIM's t → t − T//N, DPM++'s N + 1-point grids), or our own (`get_sigmas`:
  leading/trailing/linspace, Karras σ's, t = t(σ)) with ``grid="exact"``. Stochastic samplers
  take one generator per sample, so a sample depends on its own seed only.
* **Guidance wraps the denoiser**: `CFGDenoiser` runs one batched [uncond, cond] forward and
  guides the whole x̂0 (optionally rescaled, Lin et al. 2024).

Flow matching (`ldm.diffusion.flow`, `flow_loss`, `flow_sampling`): x_t = (1 − t)·x0 + t·ε with
a velocity target. `FlowSchedule` stands where `NoiseSchedule` does (σ = t/(1 − t), network
timestep 1000·t), `Denoiser` turns the velocity into x̂0, and `Sampler` runs Euler/Heun on the
flow ODE (or Euler–Maruyama on its marginal-preserving SDE, ``euler_sde``) over diffusers'
FlowMatch grid, so guidance and the U-Net need no special case. `SAMPLER_NAMES` lists every
name a user can pick (``SAMPLERS`` plus the flow-only ones).

Zero terminal SNR: training uses the exact ᾱ_T = 0. Sampling from t = T − 1 with DDIM/DDPM
keeps it (σ = ∞, where the state is x_T itself, as in diffusers' DDIM/DDPM); the σ-space
samplers take ᾱ_T = 2^-24 (diffusers' Euler/DPM convention), so they start at σ ≈ 4096.
"""

from __future__ import annotations

from ldm.diffusion.denoiser import (
    PREDICTIONS,
    Denoiser,
    output_to_x0_eps,
    prediction_target,
)
from ldm.diffusion.flow import FlowSchedule, is_flow
from ldm.diffusion.flow_loss import FlowLoss
from ldm.diffusion.flow_sampling import FLOW_ONLY
from ldm.diffusion.grids import GRIDS, Grid, diffusers_grid, exact_grid
from ldm.diffusion.guidance import CFGDenoiser, rescale_guidance
from ldm.diffusion.losses import DiffusionLoss, LossOutput, diffusion_loss, min_snr_weight
from ldm.diffusion.noise import offset_noise
from ldm.diffusion.samplers import (
    SAMPLERS,
    get_ancestral_step,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
)
from ldm.diffusion.sampling import Sampler
from ldm.diffusion.schedules import (
    SCHEDULES,
    NoiseSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)
from ldm.diffusion.timesteps import (
    get_sigmas,
    karras_sigmas,
    sample_timesteps,
    sigmas_for_timesteps,
    spaced_timesteps,
)

SAMPLER_NAMES = (*SAMPLERS, *sorted(FLOW_ONLY))  # every sampling.sampler a user can pick

__all__ = [
    "SAMPLER_NAMES",
    "FlowLoss",
    "FlowSchedule",
    "is_flow",
    "GRIDS",
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "CFGDenoiser",
    "Denoiser",
    "DiffusionLoss",
    "Grid",
    "LossOutput",
    "NoiseSchedule",
    "Sampler",
    "diffusers_grid",
    "diffusion_loss",
    "exact_grid",
    "get_ancestral_step",
    "get_sampler",
    "get_sigmas",
    "karras_sigmas",
    "make_betas",
    "min_snr_weight",
    "offset_noise",
    "output_to_x0_eps",
    "prediction_target",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_timesteps",
    "sigmas_for_timesteps",
    "spaced_timesteps",
]
