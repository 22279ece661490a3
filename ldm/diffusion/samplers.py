"""Stateless samplers over a σ-space denoiser (k-diffusion style).

Every sampler is ``sample_x(denoiser, x, sigmas, *, extra_args, callback, disable_progress, ...)
-> x``: ``x`` is the σ-space sample at ``sigmas[0]`` (x = x0 + σ·ε; a DDPM-space prior sample
x_T ~ N(0, I) is ``x_T * sqrt(1 + sigmas[0]**2)``), ``sigmas`` a descending grid (usually ending
in 0, see `ldm.diffusion.timesteps.get_sigmas`), and ``denoiser(x, sigma, **extra_args)`` returns
x̂0 for a (B,) ``sigma``. Step i goes from ``sigmas[i]`` to ``sigmas[i + 1]``; the loop index is
the only state, so there are no hidden step counters.

In σ-space the DDIM, DDPM and Euler-ancestral updates are the same ancestral step
x' = x̂0 + σ_down·ε̂ + σ_up·z (`get_ancestral_step`); they differ only by η and by the grids
diffusers pairs them with. Stochastic samplers (η > 0) draw exactly one noise tensor per step, after
the denoiser call, from ``generator`` (diffusers' order, so a seeded generator reproduces its
samples); a list of generators, one per sample, draws each sample's noise from its own stream
(diffusers' ``generator=[...]``), so that a sample does not depend on its batch. The ancestral
samplers accept ``sigmas[0] = ∞`` (zero terminal SNR, ᾱ_T = 0): the state there is x_T = ε
itself. Samplers run under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.noise import Generators, randn

DenoiserFn = Callable[..., Tensor]
Callback = Callable[[dict[str, Any]], None]


def _steps(num_steps: int, disable_progress: bool) -> Iterable[int]:
    """``range(num_steps)``, wrapped in a tqdm bar unless disabled (tqdm is optional)."""
    if disable_progress:
        return range(num_steps)
    try:
        from tqdm.auto import trange
    except ImportError:  # pragma: no cover - tqdm is a dependency of the package
        return range(num_steps)
    return trange(num_steps, desc="sampling", leave=False)


def _denoise(
    denoiser: DenoiserFn, x: Tensor, sigma: Tensor, extra_args: Mapping[str, Any] | None
) -> Tensor:
    """Call the denoiser with a (B,) σ."""
    return denoiser(x, sigma * x.new_ones(x.shape[0]), **(extra_args or {}))


def _report(
    callback: Callback | None, i: int, x: Tensor, sigma: Tensor, sigma_next: Tensor, x0: Tensor
) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": x0})


def get_ancestral_step(
    sigma: Tensor, sigma_next: Tensor, eta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Split a step σ → σ' into a deterministic part to σ_down and fresh noise σ_up.

    σ_up = min(σ', η·sqrt(σ'²(σ² − σ'²)/σ²)), σ_down = sqrt(σ'² − σ_up²). This is the σ-space
    form of DDIM's σ_t(η) (Song et al. 2021, eq. 16) divided by sqrt(ᾱ_{t−1}); η = 1 gives the
    DDPM posterior variance β̃_t (Ho et al. 2020, eq. 7).

    Returns:
        (σ_down, σ_up) as tensors.
    """
    if not eta:
        return sigma_next, torch.zeros_like(sigma_next)
    if torch.isinf(sigma):  # the limit σ → ∞: σ_up = η·σ'
        return (1 - eta**2) ** 0.5 * sigma_next, eta * sigma_next
    sigma_up = torch.minimum(
        sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    )
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _sample_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    eta: float,
    generator: Generators | None,
    extra_args: Mapping[str, Any] | None,
    callback: Callback | None,
    disable_progress: bool,
    sigmas_to: Tensor | None = None,
    clip_sample: float | None = None,
    posterior: bool = False,
) -> Tensor:
    """The shared ancestral loop of DDIM, DDPM and Euler-ancestral.

    Step i lands on ``sigmas_to[i]`` (default ``sigmas[i + 1]``); where that differs from
    ``sigmas[i + 1]`` the DDPM-space x_t is kept and read at ``sigmas[i + 1]`` (DDIMScheduler
    steps t → t − T//N, whatever the next timestep is). ``clip_sample`` clamps x̂0 to
    [−r, r]; DDIM keeps the network's ε̂ (Song et al. 2021, eq. 12), the DDPM posterior
    (``posterior``) mixes x with the clamped x̂0 (Ho et al. 2020, eq. 7).
    """
    host = sigmas.cpu()  # the branches below read these, not device tensors (no syncs)
    host_to = host[1:] if sigmas_to is None else sigmas_to.cpu()
    sigmas = sigmas.to(x.device)
    targets = sigmas[1:] if sigmas_to is None else sigmas_to.to(x.device)
    for i in _steps(len(sigmas) - 1, disable_progress):
        sigma, sigma_next, target = sigmas[i], sigmas[i + 1], targets[i]
        at_infinity = bool(torch.isinf(host[i]))
        x0 = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, x, sigma, target, x0)
        sigma_down, sigma_up = get_ancestral_step(host[i], host_to[i], eta)
        # Song et al. 2021, eq. 12 in σ-space (x = x_t/sqrt(ᾱ_t)):
        # x' = x̂0 + σ_down·ε̂ + σ_up·z, ε̂ = (x − x̂0)/σ. With η = 0 this is the Euler step of the
        # probability-flow ODE (Karras et al. 2022, Alg. 1 first order). At σ = ∞, x = x_T = ε̂.
        eps = x if at_infinity else (x - x0) / sigma
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
            if posterior and not at_infinity:
                eps = (x - x0) / sigma
        x = x0 + sigma_down.to(x.device) * eps
        if eta:
            z = randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma_up.to(x.device) * z
        if host_to[i] != host[i + 1]:  # same x_t = x/sqrt(1 + σ²), read at the next σ
            x = x * ((1 + sigma_next**2) / (1 + target**2)) ** 0.5
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 0.0,
    generator: Generators | None = None,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
    sigmas_to: Tensor | None = None,
    clip_sample: float | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12 with σ_t(η) of eq. 16), in σ-space.

    Args:
        denoiser: ``denoiser(x, sigma, **extra_args) -> x̂0``.
        x: (B, ...) σ-space sample at ``sigmas[0]``.
        sigmas: (N + 1,) descending noise levels.
        eta: η; 0 is deterministic DDIM, 1 the DDPM-like ancestral sampler.
        generator: noise source when ``eta > 0``: one generator, or one per sample.
        extra_args: keyword arguments for the denoiser (conditioning).
        callback: called after each denoiser call with a dict (i, x, sigma, sigma_next, denoised).
        disable_progress: hide the tqdm bar.
        sigmas_to: (N,) where each step lands, when not on the next grid σ (see
            `ldm.diffusion.grids`: diffusers' DDIM steps t → t − T//N).
        clip_sample: clamp x̂0 to [−clip_sample, clip_sample] (diffusers' ``clip_sample`` with
            its ``clip_sample_range``); the direction term keeps the network's ε̂.

    Returns:
        (B, ...) σ-space sample at ``sigmas[-1]``.
    """
    return _sample_ancestral(
        denoiser,
        x,
        sigmas,
        eta,
        generator,
        extra_args,
        callback,
        disable_progress,
        sigmas_to,
        clip_sample,
    )


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: Generators | None = None,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
    clip_sample: float | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eqs. 6-7, "fixed small" variance β̃_t).

    In σ-space the posterior q(x_{t−1} | x_t, x̂0) has mean (σ'²/σ²)·x + (1 − σ'²/σ²)·x̂0 and
    variance σ'²(σ² − σ'²)/σ², i.e. the ancestral step with η = 1; ``clip_sample`` clamps the x̂0
    of that mean. Arguments as `sample_ddim`.
    """
    return _sample_ancestral(
        denoiser,
        x,
        sigmas,
        1.0,
        generator,
        extra_args,
        callback,
        disable_progress,
        clip_sample=clip_sample,
        posterior=True,
    )


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    generator: Generators | None = None,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
) -> Tensor:
    """Euler-ancestral (k-diffusion's ``sample_euler_ancestral``): Euler to σ_down, add σ_up noise.

    Arguments as `sample_ddim` (η defaults to 1).
    """
    return _sample_ancestral(
        denoiser, x, sigmas, eta, generator, extra_args, callback, disable_progress
    )


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x − D(x, σ))/σ.

    Karras et al. 2022, eq. 4 with σ(t) = t, s(t) = 1, and Algorithm 1 without the Heun
    correction. Arguments as `sample_ddim`.
    """
    sigmas = sigmas.to(x.device)
    for i in _steps(len(sigmas) - 1, disable_progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, x, sigma, sigma_next, x0)
        d = (x - x0) / sigma  # Karras et al. 2022, Alg. 1 line 4
        x = x + d * (sigma_next - sigma)  # line 5
    return x


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, deterministic).

    Two denoiser calls per step, except for the last step to σ = 0, which is an Euler step
    (Alg. 1 line 6). Arguments as `sample_ddim`.
    """
    sigmas = sigmas.to(x.device)
    for i in _steps(len(sigmas) - 1, disable_progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, x, sigma, sigma_next, x0)
        d = (x - x0) / sigma  # Alg. 1 line 4
        dt = sigma_next - sigma
        x_next = x + d * dt  # line 5
        if sigma_next > 0:  # lines 6-8: correct with the slope at σ'
            x0_next = _denoise(denoiser, x_next, sigma_next, extra_args)
            d_next = (x_next - x0_next) / sigma_next
            x_next = x + (d + d_next) / 2 * dt
        x = x_next
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: DenoiserFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: Mapping[str, Any] | None = None,
    callback: Callback | None = None,
    disable_progress: bool = False,
    lower_order_final: bool = False,
) -> Tensor:
    """DPM-Solver++(2M): multistep second-order data-prediction solver.

    Lu et al. 2022 ("DPM-Solver++"), Algorithm 2, in σ-space with λ = −log σ and h = λ' − λ:
    x' = (σ'/σ)·x − (e^{−h} − 1)·D, D = (1 + 1/(2r))·x̂0_i − 1/(2r)·x̂0_{i−1}, r = h_{i−1}/h.
    The first step and the final step to σ = 0 are first order (DPM-Solver++(1) = DDIM), and
    so is the last step whatever its σ with ``lower_order_final`` (diffusers' choice below 15
    steps). Other arguments as `sample_ddim`.
    """
    sigmas = sigmas.to(x.device)
    old_x0: Tensor | None = None
    num_steps = len(sigmas) - 1
    for i in _steps(num_steps, disable_progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _denoise(denoiser, x, sigma, extra_args)
        _report(callback, i, x, sigma, sigma_next, x0)
        if sigma_next == 0:
            x = x0  # the limit of the update for σ' → 0
        else:
            lam, lam_next = -sigma.log(), -sigma_next.log()
            h = lam_next - lam
            d = x0
            if old_x0 is not None and not (lower_order_final and i == num_steps - 1):
                r = (lam - (-sigmas[i - 1].log())) / h  # h_{i−1}/h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
            x = (sigma_next / sigma) * x - torch.expm1(-h) * d
        old_x0 = x0
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}
STOCHASTIC = frozenset({"ddim", "ddpm", "euler_a"})  # these accept ``generator``


def get_sampler(name: str) -> Callable[..., Tensor]:
    """Look a sampler up by name.

    Raises:
        ValueError: one line naming the unknown sampler and listing the valid ones.
    """
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}"
        ) from None
