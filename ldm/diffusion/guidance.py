"""Classifier-free guidance as a denoiser wrapper, with optional guidance rescale.

`CFGDenoiser` runs ONE batched forward of [uncond, cond] and guides the whole output (all
channels), like EDM2's ``denoise``. Guiding x̂0 is the same as guiding ε̂ or v̂ (the maps between
them are affine with the same coefficients for both halves), so the wrapper works for every
parameterisation and sampler. A negative prompt is just a different ``uncond``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.denoiser import PREDICTIONS, Denoiser, check_prediction
from ldm.diffusion.samplers import DenoiserFn


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2024, §3.4, eqs. 15-16; diffusers' ``rescale_noise_cfg``).

    σ_pos = std(cond), σ_cfg = std(guided) per sample (eq. 15);
    x_rescaled = guided·σ_pos/σ_cfg (eq. 16); result = φ·x_rescaled + (1 − φ)·guided.

    Args:
        guided: (B, ...) guided prediction.
        cond: (B, ...) conditional prediction.
        phi: rescale strength φ in [0, 1].

    Returns:
        (B, ...) rescaled prediction.
    """
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # (B, 1, ..., 1)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1 - phi) * guided


def _to_space(space: str, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Express a σ-space x̂0 at (x, σ) as an ε/v/x0 prediction (σ-space ↔ DDPM: see denoiser)."""
    if space == "x0":
        return x0
    inf = torch.isinf(sigma)  # σ = ∞ (ᾱ = 0): x is x_T = ε, and v = −x0
    eps = torch.where(inf, x, (x - x0) / sigma)
    if space == "eps":
        return eps
    alpha = 1 / (sigma**2 + 1) ** 0.5
    sigma_vp = torch.where(inf, torch.ones_like(sigma), sigma * alpha)
    return alpha * eps - sigma_vp * x0  # v = α_t·ε − σ_t·x0 (Salimans & Ho 2022, §4)


def _from_space(space: str, x: Tensor, sigma: Tensor, pred: Tensor) -> Tensor:
    """Inverse of `_to_space`: back to x̂0."""
    if space == "x0":
        return pred
    if space == "eps":
        return x - sigma * pred
    # x̂0 = α·x_t − σ_t·v̂ with α·x_t = x/(σ² + 1), σ_t = σ/sqrt(σ² + 1)
    inf = torch.isinf(sigma)
    sigma_vp = torch.where(inf, torch.ones_like(sigma), sigma / (sigma**2 + 1) ** 0.5)
    return torch.where(inf, torch.zeros_like(x), x / (sigma**2 + 1)) - sigma_vp * pred


def _batch_conditions(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate [uncond, cond] along the batch for every tensor condition."""
    if set(uncond) != set(cond):
        raise ValueError(
            f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}"
        )
    out: dict[str, Any] = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor):
            out[key] = torch.cat([u.to(c.dtype), c])  # (2B, ...)
        elif c is None and u is None:
            out[key] = None
        else:
            raise TypeError(f"condition {key!r} must be a tensor or None in both cond and uncond")
    return out


class CFGDenoiser:
    """Classifier-free guidance around a denoiser (Ho & Salimans 2022, eq. 6).

    D̃ = D_u + s·(D_c − D_u), computed as ``torch.lerp(D_u, D_c, s)`` so that s = 1 returns the
    conditional output and s = 0 the unconditional output exactly.

    Args:
        denoiser: ``denoiser(x, sigma, **cond) -> x̂0`` (e.g. a `Denoiser`).
        cond: conditional keyword arguments of the network, e.g. ``{"context": c}``, batch B.
        uncond: unconditional ones (empty prompt or negative prompt), same keys and batch.
        scale: guidance scale s (1: no guidance).
        rescale: guidance-rescale φ (Lin et al. 2024, §3.4); 0 disables.
        rescale_space: where the std matching of the rescale happens: ``eps``, ``v`` or ``x0``.
            ``None`` uses the wrapped `Denoiser`'s parameterisation (what diffusers does: it
            rescales the network's output), or ``x0`` for other denoisers.
    """

    def __init__(
        self,
        denoiser: DenoiserFn,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
        scale: float = 7.5,
        rescale: float = 0.0,
        rescale_space: str | None = None,
    ) -> None:
        if rescale_space is None:
            rescale_space = denoiser.prediction if isinstance(denoiser, Denoiser) else "x0"
        if rescale_space not in PREDICTIONS:
            check_prediction(rescale_space)
        self.denoiser = denoiser
        self.conditions = _batch_conditions(uncond, cond)
        self.scale = scale
        self.rescale = rescale
        self.rescale_space = rescale_space

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> CFGDenoiser:
        """The same guidance around ``denoiser.with_timesteps(...)`` (see `Denoiser`)."""
        inner = self.denoiser
        if hasattr(inner, "with_timesteps"):
            inner = inner.with_timesteps(sigmas, timesteps)
        out = copy.copy(self)
        out.denoiser = inner
        return out

    def __call__(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        """Guided x̂0 for a (B, ...) sample and (B,) σ; ``extra`` goes to both halves."""
        x_in = torch.cat([x, x])  # (2B, ...)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        sigma_in = torch.cat([sigma, sigma])  # (2B,)
        x0_uncond, x0_cond = self.denoiser(x_in, sigma_in, **self.conditions, **extra).chunk(2)
        guided = torch.lerp(x0_uncond, x0_cond, self.scale)
        if self.rescale:
            s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)  # (B, 1, ..., 1)
            space = self.rescale_space
            pred = rescale_guidance(
                _to_space(space, x, s, guided), _to_space(space, x, s, x0_cond), self.rescale
            )
            guided = _from_space(space, x, s, pred)
        return guided
