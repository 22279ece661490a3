"""Reconstruction metrics: PSNR and SSIM on images in [-1, 1].

SSIM follows Wang et al. 2004 (IEEE TIP 13(4)), eq. 13, with the usual 11×11 Gaussian window
(σ = 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the valid region and averaged; this
matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Args:
        x: ``(B, C, H, W)`` images.
        y: ``(B, C, H, W)`` reference images.
        data_range: Max minus min of the value range (2 for [-1, 1]).

    Returns:
        ``(B,)`` PSNR values.
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    window = g[:, None] * g[None, :]  # (size, size)
    return window.expand(channels, 1, size, size).contiguous()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13).

    Args:
        x: ``(B, C, H, W)`` images (H, W ≥ window_size).
        y: ``(B, C, H, W)`` reference images.
        data_range: Max minus min of the value range (2 for [-1, 1]).
        window_size: Gaussian window size.
        sigma: Gaussian window standard deviation.

    Returns:
        ``(B,)`` mean SSIM values.
    """
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian_window(window_size, sigma, c, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)  # valid region only

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1)
