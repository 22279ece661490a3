"""Sinusoidal timestep embedding, as in the original Stable Diffusion U-Net."""

from __future__ import annotations

import math

import torch


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first.

    Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5) applied to the diffusion time
    as in DDPM (Ho et al. 2020, Appendix B): ``[cos(t·ω_i), sin(t·ω_i)]`` with
    ``ω_i = max_period^(-i / half)``, ``i = 0 … half-1``. Identical to CompVis
    ``timestep_embedding`` and to diffusers' ``get_timestep_embedding(flip_sin_to_cos=True,
    downscale_freq_shift=0)``.

    Args:
        timesteps: Timesteps of shape (B,), float or integer.
        dim: Embedding width. An odd width is zero-padded by one column.
        max_period: Controls the lowest frequency.

    Returns:
        Float32 tensor of shape (B, dim).
    """
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = -math.log(max_period) * steps
    freqs = torch.exp(exponent / half)  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding
