"""The pieces img2img and inpainting add to the sampling loop of
:meth:`ldm.models.latent_diffusion.LatentDiffusion.generate`, as diffusers' img2img and inpaint
pipelines define them (their public ``StableDiffusionImg2ImgPipeline`` /
``StableDiffusionInpaintPipeline`` are what ``tests/test_inpaint_parity.py`` compares with):
the step a strength starts at, the latent-size mask, the kept region blended back in at every
step (SDEdit, Meng et al. 2022; RePaint-style known-region replacement, Lugmayr et al. 2022,
eq. 8), and the extra input channels of a dedicated inpainting U-Net.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class ConcatInputs(nn.Module):
    """``net`` seeing ``[x, extra]`` along channels (extra repeated over a CFG-doubled batch)."""

    def __init__(self, net: Callable[..., Tensor], extra: Tensor) -> None:
        super().__init__()
        self.net, self.extra = net, extra

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        extra = self.extra.repeat(x.shape[0] // self.extra.shape[0], 1, 1, 1)
        return self.net(torch.cat([x, extra.to(x.dtype)], dim=1), *args, **kwargs)


class KeepRegion:
    """A σ-space ``denoiser`` whose input has the kept region replaced by the init latents
    noised to the call's σ, ``z0 + σ·ε`` (exact where ``repaint``: ``torch.where``), except at
    σ = ``unblended`` (the pure-noise start of strength 1, which diffusers does not blend).

    diffusers' ``StableDiffusionInpaintPipeline`` blends after every scheduler step, so Heun's
    corrector sees the blended predictor state, and DPM-Solver++'s next step starts from (and
    its network sees) the blended sample. Every update of our samplers is elementwise in x
    given x̂0, so in the repainted region the arithmetic is then diffusers'; the kept region
    is overwritten by a blend after the step (Heun) or at the end (the clean latents).
    """

    def __init__(
        self,
        denoiser: Any,
        repaint: Tensor,
        z0: Tensor,
        eps: Tensor,
        unblended: Tensor | None = None,
    ) -> None:
        self.denoiser, self.repaint, self.z0, self.eps = denoiser, repaint, z0, eps
        self.unblended = unblended

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> KeepRegion:
        """The same blending around ``denoiser.with_timesteps(...)``."""
        inner = self.denoiser
        if hasattr(inner, "with_timesteps"):
            inner = inner.with_timesteps(sigmas, timesteps)
        return KeepRegion(inner, self.repaint, self.z0, self.eps, self.unblended)

    def __call__(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        if self.unblended is not None and bool((sigma.cpu() == self.unblended).all()):
            return self.denoiser(x, sigma, **extra)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        known = self.z0 + s * self.eps
        return self.denoiser(torch.where(self.repaint, x, known), sigma, **extra)


def offset_steps(
    callback: Callable[[dict[str, Any]], None], i: int
) -> Callable[[dict[str, Any]], None]:
    """``callback`` with step indices of a one-step run shifted to the full run's ``i``."""
    return lambda info: callback({**info, "i": i + int(info.get("i", 0))})


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] (1 = repaint) as the latent-size binary mask, as
    diffusers' inpaint pipelines: binarised at 0.5, then nearest-neighbour to (H/f, W/f)."""
    import torch.nn.functional as F

    binary = (mask >= 0.5).float()
    return F.interpolate(binary, size=(mask.shape[-2] // factor, mask.shape[-1] // factor))


def img2img_start(steps: int, strength: float) -> int:
    """The first step of a ``steps``-step grid that img2img at ``strength`` runs: it runs the
    last ``int(steps · strength)`` steps, as diffusers' img2img/inpaint pipelines'
    ``get_timesteps``.

    Raises:
        ValueError: ``strength`` outside (0, 1], or so small that no step runs.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps runs no step; raise --strength "
            f"to at least {1 / steps:.3g} or --steps"
        )
    return steps - run


def img2img_sigmas(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """The tail of a (steps + 1,) σ grid that img2img at ``strength`` runs (`img2img_start`)."""
    return sigmas[img2img_start(steps, strength) :]
