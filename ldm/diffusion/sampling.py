"""The high-level sampling entry point: a named sampler plus its σ grid, DDPM space in and out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.flow import is_flow
from ldm.diffusion.flow_sampling import (
    FLOW_ONLY,
    FlowGrid,
    flow_dpm_grid,
    flow_grid,
    get_flow_sampler,
    run_flow_sampler,
)
from ldm.diffusion.grids import (
    GRIDS,
    KARRAS_SAMPLERS,
    SCHEDULER_CLASSES,
    Grid,
    diffusers_grid,
    exact_grid,
)
from ldm.diffusion.noise import Generators
from ldm.diffusion.samplers import STOCHASTIC, Callback, DenoiserFn, get_sampler
from ldm.diffusion.schedules import NoiseSchedule
from ldm.diffusion.timesteps import FINAL_SIGMAS, SPACINGS


class Sampler:
    """A configured sampler: turns DDPM-space prior noise into a DDPM-space sample.

    Holds only options; every call recomputes the σ grid from the schedule, so one instance
    can serve any model. Construction validates the options (unknown sampler names raise a
    one-line ValueError listing the valid ones).

    Args:
        sampler: ``ddim``, ``ddpm``, ``euler``, ``euler_a``, ``heun`` or ``dpmpp_2m``; for
            flow-matching models also ``euler_sde`` (`ldm.diffusion.flow_sampling`).
        steps: number of sampling steps N (Heun calls the network 2N − 1 times).
        eta: DDIM η (Song et al. 2021, eq. 16), used by ``ddim`` only; ``ddpm`` and
            ``euler_a`` are the η = 1 ancestral samplers.
        karras: use Karras et al. 2022 eq. 5 σ's (ρ = 7) between the grid's first and last σ.
        timestep_spacing: ``leading``, ``trailing`` or ``linspace`` (as diffusers). Use
            ``trailing`` for zero-terminal-SNR models so sampling starts at t = T − 1.
        steps_offset: offset added to ``leading`` timesteps (Stable Diffusion uses 1).
        final_sigma: ``zero`` (end on the denoised sample) or ``sigma_min``: diffusers'
            ``final_sigmas_type`` of ``euler`` and ``dpmpp_2m``; with ``grid="exact"``, every
            sampler's.
        grid: ``diffusers`` (the grid, timesteps and noise scaling of diffusers' scheduler of
            the same name, see `ldm.diffusion.grids`) or ``exact`` (our grid for every sampler).
        set_alpha_to_one: ``ddim`` with ``grid="diffusers"``: the last step lands on ᾱ = 1
            (σ = 0) rather than on ᾱ_0 (DDIMScheduler's ``set_alpha_to_one``).
        clip_sample: ``ddim`` and ``ddpm``: clamp x̂0 to [−clip_sample, clip_sample] (diffusers'
            ``clip_sample`` with ``clip_sample_range``); None does not clip.
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
        grid: str = "diffusers",
        set_alpha_to_one: bool = True,
        clip_sample: float | None = None,
        disable_progress: bool = False,
    ) -> None:
        if sampler not in FLOW_ONLY:
            get_sampler(sampler)
        if grid not in GRIDS:
            raise ValueError(f"unknown sampling grid {grid!r}; valid: {', '.join(GRIDS)}")
        if grid == "diffusers" and karras and sampler not in KARRAS_SAMPLERS:
            raise ValueError(
                f"diffusers' {SCHEDULER_CLASSES[sampler]} has no Karras sigmas; use "
                "sampling.karras=false or sampling.grid=exact"
            )
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
        self.grid_kind = grid
        self.set_alpha_to_one = set_alpha_to_one
        self.clip_sample = clip_sample
        self.disable_progress = disable_progress

    def __repr__(self) -> str:
        return (
            f"Sampler(sampler={self.sampler!r}, steps={self.steps}, eta={self.eta}, "
            f"karras={self.karras}, timestep_spacing={self.timestep_spacing!r}, "
            f"steps_offset={self.steps_offset}, final_sigma={self.final_sigma!r}, "
            f"grid={self.grid_kind!r}, set_alpha_to_one={self.set_alpha_to_one}, "
            f"clip_sample={self.clip_sample})"
        )

    def grid(self, schedule: NoiseSchedule, size: tuple[int, int] | None = None) -> Grid:
        """The `Grid` this sampler walks for ``schedule``; a flow model's is a `FlowGrid`
        shifted for a latent of ``size`` = (h, w) (None: the static shift)."""
        if is_flow(schedule):
            get_flow_sampler(self.sampler, self.eta)
            if self.sampler == "dpmpp_2m":
                return flow_dpm_grid(schedule, self.steps, size)
            return flow_grid(schedule, self.steps, size)
        if self.sampler in FLOW_ONLY:
            raise ValueError(
                f"sampler {self.sampler!r} runs flow-matching models only "
                "(model.diffusion.objective=flow); use euler_a, the stochastic "
                "sampler of DDPM models"
            )
        if self.grid_kind == "exact":
            return exact_grid(
                schedule,
                self.steps,
                self.timestep_spacing,
                self.steps_offset,
                self.karras,
                self.final_sigma,
            )
        return diffusers_grid(
            schedule,
            self.sampler,
            self.steps,
            self.timestep_spacing,
            self.steps_offset,
            self.karras,
            self.final_sigma,
            self.set_alpha_to_one,
        )

    def sigmas(self, schedule: NoiseSchedule) -> Tensor:
        """The (steps + 1,) float32 CPU σ grid for ``schedule``."""
        return self.grid(schedule).sigmas

    @torch.no_grad()
    def __call__(
        self,
        denoiser: DenoiserFn,
        noise: Tensor,
        schedule: NoiseSchedule,
        *,
        generator: Generators | None = None,
        callback: Callback | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Sample.

        Args:
            denoiser: σ-space denoiser, e.g. a `Denoiser` or a `CFGDenoiser` around one.
            noise: (B, ...) DDPM-space prior sample x_T ~ N(0, I).
            schedule: the schedule the model was trained with (gives the σ grid).
            generator: noise source for the stochastic samplers: one generator, or one per
                sample (each sample's noise then comes from its own stream).
            callback: per-step callback (see `ldm.diffusion.samplers`).
            extra_args: extra keyword arguments for the denoiser.

        Returns:
            (B, ...) DDPM-space sample at the final σ (the clean latent for ``final_sigma="zero"``).
        """
        # a flow model's grid is shifted for this latent size (ldm.diffusion.flow_sampling)
        grid = self.grid(schedule, tuple(noise.shape[-2:]) if is_flow(schedule) else None)
        # DDPM space → σ space: x = x_t·sqrt(1 + σ²) (x_t ~ N(0, I) has std sqrt(1 + σ²) in σ
        # units), or diffusers' init_noise_sigma for its σ-space schedulers
        x = self.run(
            denoiser,
            noise.float() * grid.init_scale,
            grid,
            generator=generator,
            callback=callback,
            extra_args=extra_args,
        )
        return (x / grid.final_scale).to(noise.dtype)

    @torch.no_grad()
    def run(
        self,
        denoiser: DenoiserFn,
        x: Tensor,
        grid: Grid,
        start: int = 0,
        stop: int | None = None,
        *,
        generator: Generators | None = None,
        callback: Callback | None = None,
        extra_args: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Steps ``start`` .. ``stop`` − 1 of ``grid`` (default: all) from σ-space ``x`` at
        ``grid.sigmas[start]``; returns the σ-space sample at ``grid.sigmas[stop]``. A tail of
        the grid is img2img (as diffusers' ``get_timesteps``); single steps let inpainting blend
        between them. The grid's network timesteps and DDIM landing points stay aligned."""
        n = len(grid.sigmas) - 1
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"steps {start}..{stop} are outside the {n}-step grid")
        if grid.timesteps is not None and hasattr(denoiser, "with_timesteps"):
            denoiser = denoiser.with_timesteps(grid.sigmas[:-1], grid.timesteps)
        if isinstance(grid, FlowGrid):  # flow ODE/SDE samplers, σ-space in and out
            return run_flow_sampler(
                self.sampler,
                denoiser,
                x.float(),
                grid.sigmas[start : stop + 1],
                eta=self.eta,
                generator=generator,
                callback=callback,
                extra_args=extra_args,
                disable_progress=self.disable_progress,
                lower_order_final=grid.lower_order_final,
            )
        opts: dict[str, Any] = {
            "extra_args": extra_args,
            "callback": callback,
            "disable_progress": self.disable_progress,
        }
        if self.sampler in STOCHASTIC:
            opts["generator"] = generator
        if self.sampler == "ddim":
            opts["eta"] = self.eta
            opts["sigmas_to"] = None if grid.sigmas_to is None else grid.sigmas_to[start:stop]
        if self.sampler in ("ddim", "ddpm"):
            opts["clip_sample"] = self.clip_sample
        if self.sampler == "dpmpp_2m":
            opts["lower_order_final"] = grid.lower_order_final
        return get_sampler(self.sampler)(denoiser, x.float(), grid.sigmas[start : stop + 1], **opts)
