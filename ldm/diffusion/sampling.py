"""The high-level sampling entry point: a named sampler plus its σ grid, DDPM space in and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.samplers import STOCHASTIC, Callback, DenoiserFn, get_sampler
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timesteps import FINAL_SIGMAS, SPACINGS, get_sigmas, prior_scale


class Sampler:
    """A configured sampler: turns DDPM-space prior noise into a DDPM-space sample.

    Holds only options; every call recomputes the σ grid from the schedule, so one instance
    can serve any model. Construction validates the options (unknown sampler names raise a
    one-line ValueError listing the valid ones).

    Args:
        sampler: ``ddim``, ``ddpm``, ``euler``, ``euler_a``, ``heun`` or ``dpmpp_2m``.
        steps: number of sampling steps N (Heun calls the network 2N − 1 times).
        eta: DDIM η (Song et al. 2021, eq. 16), used by ``ddim`` only; ``ddpm`` and
            ``euler_a`` are the η = 1 ancestral samplers.
        karras: use Karras et al. 2022 eq. 5 σ's (ρ = 7) between the grid's first and last σ.
        timestep_spacing: ``leading``, ``trailing`` or ``linspace`` (as diffusers). Use
            ``trailing`` for zero-terminal-SNR models so sampling starts at t = T − 1.
        steps_offset: offset added to ``leading`` timesteps (Stable Diffusion uses 1).
        final_sigma: ``zero`` (end on the denoised sample) or ``sigma_min``.
        disable_progress: hide the tqdm progress bar.
    """

    def __init__(
        self,
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        karras: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 1,
        final_sigma: str = "zero",
        disable_progress: bool = False,
    ) -> None:
        get_sampler(sampler)
        if timestep_spacing not in SPACINGS:
            raise ValueError(
                f"unknown timestep spacing {timestep_spacing!r}; valid: {', '.join(SPACINGS)}"
            )
        if final_sigma not in FINAL_SIGMAS:
            raise ValueError(
                f"unknown final_sigma {final_sigma!r}; valid: {', '.join(FINAL_SIGMAS)}"
            )
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.sampler = sampler
        self.steps = steps
        self.eta = eta
        self.karras = karras
        self.timestep_spacing = timestep_spacing
        self.steps_offset = steps_offset
        self.final_sigma = final_sigma
        self.disable_progress = disable_progress

    def __repr__(self) -> str:
        return (
            f"Sampler(sampler={self.sampler!r}, steps={self.steps}, eta={self.eta}, "
            f"karras={self.karras}, timestep_spacing={self.timestep_spacing!r}, "
            f"steps_offset={self.steps_offset}, final_sigma={self.final_sigma!r})"
        )

    def sigmas(self, schedule: NoiseSchedule) -> Tensor:
        """The (steps + 1,) float32 CPU σ grid for ``schedule``."""
        return get_sigmas(
            schedule,
            self.steps,
            self.timestep_spacing,
            self.steps_offset,
            self.karras,
            self.final_sigma,
        )

    @torch.no_grad()
    def __call__(
        self,
        denoiser: DenoiserFn,
        noise: Tensor,
        schedule: NoiseSchedule,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Sample.

        Args:
            denoiser: σ-space denoiser, e.g. a `Denoiser` or a `CFGDenoiser` around one.
            noise: (B, ...) DDPM-space prior sample x_T ~ N(0, I).
            schedule: the schedule the model was trained with (gives the σ grid).
            generator: noise source for the stochastic samplers.
            callback: per-step callback (see `ldm.diffusion.samplers`).
            extra_args: extra keyword arguments for the denoiser.

        Returns:
            (B, ...) DDPM-space sample at the final σ (the clean latent for ``final_sigma="zero"``).
        """
        sigmas = self.sigmas(schedule)
        # DDPM space → σ space: x = x_t·sqrt(1 + σ²) (x_t ~ N(0, I) has std sqrt(1 + σ²) in σ units)
        x = noise.float() * prior_scale(sigmas[0])
        opts: dict[str, Any] = {
            "extra_args": extra_args,
            "callback": callback,
            "disable_progress": self.disable_progress,
        }
        if self.sampler in STOCHASTIC:
            opts["generator"] = generator
        if self.sampler == "ddim":
            opts["eta"] = self.eta
        x = get_sampler(self.sampler)(denoiser, x, sigmas, **opts)
        return (x / prior_scale(sigmas[-1])).to(noise.dtype)

    @torch.no_grad()
    def sample_from(
        self,
        denoiser: DenoiserFn,
        x: Tensor,
        sigmas: Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Run this sampler over a given σ grid (e.g. the tail of :meth:`sigmas` for img2img)
        from σ-space ``x`` at ``sigmas[0]``; returns the σ-space result at ``sigmas[-1]``."""
        opts: dict[str, Any] = {
            "extra_args": extra_args,
            "callback": callback,
            "disable_progress": self.disable_progress,
        }
        if self.sampler in STOCHASTIC:
            opts["generator"] = generator
        if self.sampler == "ddim":
            opts["eta"] = self.eta
        return get_sampler(self.sampler)(denoiser, x.float(), sigmas, **opts)
