"""The denoising training loss: MSE to the parameterisation's target, with loss weighting.

``diffusion_loss`` draws t and ε (optionally with offset noise), forms x_t in closed form, calls
``net(x_t, t, **cond)`` and returns the per-sample weighted MSE together with t, so that callers
can log the loss by timestep bucket. All randomness comes from an optional `torch.Generator`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.denoiser import check_prediction, prediction_target
from ldm.diffusion.noise import offset_noise as make_noise
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timesteps import TIMESTEP_SAMPLING, sample_timesteps

WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weight(snr: Tensor, prediction: str, gamma: float = 5.0) -> Tensor:
    """Min-SNR-γ loss weights for an MSE on the given parameterisation's target.

    Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy" (the
    Min-SNR-γ loss weight and its ε-prediction form).

    The x0-space weight is w_t = min(SNR_t, γ). Since ‖ε − ε̂‖² = SNR_t·‖x0 − x̂0‖² and
    ‖v − v̂‖² = (SNR_t + 1)·‖x0 − x̂0‖², the same weighting on an ε target is min(SNR_t, γ)/SNR_t
    = min(1, γ/SNR_t), and on a v target min(SNR_t, γ)/(SNR_t + 1).

    Args:
        snr: (B,) SNR_t = ᾱ_t/(1 − ᾱ_t) (may be 0 with zero terminal SNR).
        prediction: ``eps``, ``v`` or ``x0``.
        gamma: γ.

    Returns:
        (B,) float32 weights.
    """
    snr = snr.float()
    clipped = snr.clamp(max=gamma)  # min(SNR, γ)
    if prediction == "x0":
        return clipped
    if prediction == "eps":
        return (gamma / snr).clamp(max=1.0)  # γ/0 = inf → 1 at zero SNR
    if prediction == "v":
        return clipped / (snr + 1)
    check_prediction(prediction)
    raise AssertionError  # unreachable


def _check_options(prediction: str, loss_weighting: str, timestep_sampling: str) -> None:
    """One-line ValueErrors for unknown option names."""
    check_prediction(prediction)
    if loss_weighting not in WEIGHTINGS:
        raise ValueError(
            f"unknown loss weighting {loss_weighting!r}; valid: {', '.join(WEIGHTINGS)}"
        )
    if timestep_sampling not in TIMESTEP_SAMPLING:
        raise ValueError(
            f"unknown timestep sampling {timestep_sampling!r}; "
            f"valid: {', '.join(TIMESTEP_SAMPLING)}"
        )


@dataclass
class LossOutput:
    """Result of `diffusion_loss`.

    Attributes:
        loss: (B,) per-sample weighted MSE (mean over non-batch dimensions).
        t: (B,) int64 timesteps used.
    """

    loss: Tensor
    t: Tensor


def diffusion_loss(
    net: Callable[..., Tensor],
    x0: Tensor,
    schedule: NoiseSchedule,
    cond: Mapping[str, Any] | None = None,
    *,
    prediction: str = "eps",
    loss_weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    offset_noise: float = 0.0,
    timestep_sampling: str = "uniform",
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> LossOutput:
    """Per-sample denoising loss (Ho et al. 2020, eq. 14, generalised to ε/v/x0 targets).

    loss_i = w(t_i)·mean((net(x_t, t_i, **cond) − target)²), x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε.

    Args:
        net: ``net(x_t, t, **cond)``; t is a float32 (B,) tensor of integer timesteps.
        x0: (B, C, ...) clean latents.
        schedule: the noise schedule.
        cond: conditioning keyword arguments for the network (e.g. ``{"context": c}``).
        prediction: network target, ``eps``, ``v`` or ``x0``.
        loss_weighting: ``uniform`` or ``min_snr`` (`min_snr_weight`).
        min_snr_gamma: γ for ``min_snr``.
        offset_noise: offset-noise strength (0 disables; `ldm.diffusion.noise.offset_noise`).
        timestep_sampling: ``uniform`` or ``stratified`` (`sample_timesteps`).
        generator: source of t and ε (t drawn first).
        t: optional fixed (B,) timesteps (skips the draw).
        noise: optional fixed ε (skips the draw, ``offset_noise`` is then ignored).

    Returns:
        `LossOutput` with (B,) losses and (B,) timesteps.
    """
    _check_options(prediction, loss_weighting, timestep_sampling)
    batch = x0.shape[0]
    if t is None:
        t = sample_timesteps(
            batch, schedule.num_timesteps, timestep_sampling, generator, device=x0.device
        )
    t = t.to(x0.device).long()
    if noise is None:
        noise = make_noise(x0, offset_noise, generator)
    x_t = schedule.add_noise(x0, noise, t)
    alpha, sigma = schedule.alpha_sigma(t.to(schedule.alphas_cumprod.device))
    view = (-1, *([1] * (x0.ndim - 1)))  # (B, 1, ..., 1)
    alpha, sigma = alpha.to(x0.device).reshape(view), sigma.to(x0.device).reshape(view)
    target = prediction_target(prediction, x0.float(), noise.float(), alpha, sigma)
    out = net(x_t, t.float(), **(cond or {}))
    mse = (out.float() - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    if loss_weighting == "min_snr":
        snr = schedule.snr(t.to(schedule.alphas_cumprod.device)).to(x0.device)
        mse = mse * min_snr_weight(snr, prediction, min_snr_gamma)
    return LossOutput(loss=mse, t=t)


class DiffusionLoss:
    """`diffusion_loss` with its options fixed (what ``build.py`` constructs from the config).

    Args:
        prediction: ``eps``, ``v`` or ``x0``.
        loss_weighting: ``uniform`` or ``min_snr``.
        min_snr_gamma: γ of min-SNR weighting.
        offset_noise: offset-noise strength (0 disables).
        timestep_sampling: ``uniform`` or ``stratified``.
    """

    def __init__(
        self,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
    ) -> None:
        _check_options(prediction, loss_weighting, timestep_sampling)
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.offset_noise = offset_noise
        self.timestep_sampling = timestep_sampling

    def __call__(
        self,
        net: Callable[..., Tensor],
        x0: Tensor,
        schedule: NoiseSchedule,
        cond: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Per-sample loss and timesteps; see `diffusion_loss`."""
        return diffusion_loss(
            net,
            x0,
            schedule,
            cond,
            prediction=self.prediction,
            loss_weighting=self.loss_weighting,
            min_snr_gamma=self.min_snr_gamma,
            offset_noise=self.offset_noise,
            timestep_sampling=self.timestep_sampling,
            generator=generator,
        )
