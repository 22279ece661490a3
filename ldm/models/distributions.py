"""Diagonal Gaussian posterior q(z|x) of the KL autoencoder (Kingma & Welling 2014)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["DiagonalGaussian"]


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from encoder moments split along channels.

    Args:
        parameters: Moments (B, 2*C, H, W): mean is the first C channels, log-variance the rest.
            The log-variance is clamped to [-30, 20] for numerical safety, as in SD.
        deterministic: If True, the variance is zero (``sample`` returns the mean, kl/nll are 0).
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        mean, logvar = torch.chunk(parameters, 2, dim=1)  # 2 x (B, C, H, W)
        self.mean = mean
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample ``mean + std * eps`` with ``eps ~ N(0, I)`` from ``generator``.

        A generator on another device than the moments draws there and is moved over, so a CPU
        generator gives the same sample on every device.
        """
        device = self.mean.device
        if generator is not None and generator.device.type != device.type:
            eps = torch.randn(
                self.mean.shape, generator=generator, device=generator.device, dtype=self.mean.dtype
            ).to(device)
        else:
            eps = torch.randn(
                self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype
            )
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean (the mode of a Gaussian)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) summed over (C, H, W), shape (B,); ``other=None`` means N(0, I).

        KL between diagonal Gaussians (Kingma & Welling 2014, App. B for the N(0, I) case):
        ``0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2)``.
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * terms.sum(dim=(1, 2, 3))

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``sample`` summed over ``dims``:
        ``0.5 * sum(log(2 pi) + logvar + (x - mu)^2 / var)``.
        """
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        terms = math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * terms.sum(dim=tuple(dims))
