"""Reproducible Gaussian noise: draws from an optional `torch.Generator`, and offset noise.

Every random draw in `ldm.diffusion` goes through `randn`, so a seeded generator makes training
noise, timesteps and ancestral sampling reproducible, and a CPU generator works for CUDA tensors
(the noise is drawn on the generator's device and moved, as diffusers' ``randn_tensor`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# One generator for the whole batch, or one per sample (a sample then depends on its own stream
# only, whatever its batch: diffusers' ``generator=[...]`` lists).
Generators = torch.Generator | Sequence[torch.Generator]


def randn(
    shape: Sequence[int],
    *,
    generator: Generators | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise, drawn on the generator's device and moved to ``device``.

    With a list of B generators, sample b is drawn from ``generator[b]`` alone as a (1, ...)
    tensor (diffusers' ``randn_tensor`` with a generator list), so it does not depend on the batch.

    Args:
        shape: output shape (B, ...).
        generator: optional generator, or one per sample.
        device: where the result lives.
        dtype: result dtype.

    Returns:
        Tensor of ``shape``.
    """
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        one = (1, *tuple(shape)[1:])
        draws = [torch.randn(one, generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    draw_device = generator.device if generator is not None else device
    out = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype)
    return out.to(device)


def offset_noise(like: Tensor, strength: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian noise plus a per-sample, per-channel constant offset.

    Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): ε + strength·δ with
    δ ~ N(0, 1) of shape (B, C, 1, ..., 1), so that the model learns to change the mean of an image
    (very dark or bright samples). ``strength = 0`` gives plain ε ~ N(0, I) and draws nothing more.

    Args:
        like: (B, C, ...) tensor whose shape, device and dtype the noise takes.
        strength: offset strength (0 disables).
        generator: optional generator.

    Returns:
        (B, C, ...) noise.
    """
    noise = randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    if strength:
        offset_shape = (*like.shape[:2], *([1] * (like.ndim - 2)))  # (B, C, 1, ..., 1)
        offset = randn(offset_shape, generator=generator, device=like.device, dtype=like.dtype)
        noise = noise + strength * offset
    return noise
