"""SDXL text-to-image latent diffusion (Podell et al. 2023): ``LatentDiffusion`` whose prompts
go through the two-encoder :class:`~ldm.models.conditioner.SDXLConditioner` and whose U-Net's
vector input ``y`` carries the pooled text and the size/crop micro-conditioning."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ldm.diffusion import NoiseSchedule
from ldm.models.conditioner import SDXLConditioner
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.micro_conditioning import sdxl_vector, size_numbers


class SDXLLatentDiffusion(LatentDiffusion):
    """SDXL U-Net + VAE + two text encoders.

    Sampling conditions on ``original_size``, ``crop_top_left`` and ``target_size`` (pixel
    ``(height, width)`` / ``(top, left)``); ``None`` sizes mean the generated image's size and
    the crop defaults to ``(0, 0)``, as diffusers' ``StableDiffusionXLPipeline``. A batch of
    empty prompts (the default negative prompt) is conditioned on zeros, context and pooled
    alike, as SDXL dropped captions in training and as diffusers does for a missing negative
    prompt (``force_zeros_for_empty_prompt``); set ``zero_empty_prompts = False`` to encode "".

    Args:
        unet: An SDXL-layout ``UNetModel`` (``adm_in_channels`` = pooled width + 6 × 256).
        autoencoder: The VAE (SDXL: scale factor 0.13025).
        conditioner: The two frozen text encoders.
        schedule: The training noise schedule.
        prediction: ``eps``, ``v`` or ``x0``.
    """

    def __init__(self, unet: nn.Module, autoencoder: nn.Module, conditioner: SDXLConditioner,
                 schedule: NoiseSchedule, prediction: str = "eps") -> None:
        super().__init__(unet, autoencoder, conditioner, schedule, prediction)
        self.original_size: tuple[int, int] | None = None
        self.crop_top_left: tuple[int, int] = (0, 0)
        self.target_size: tuple[int, int] | None = None
        self.zero_empty_prompts = True

    def prompt_conditioning(self, prompts: Sequence[str], device: torch.device,
                            dtype: torch.dtype, size: tuple[int, int]) -> dict[str, Tensor | None]:
        """``context`` (both encoders' states), ``y`` (pooled text + embedded sizes)."""
        prompts = list(prompts)
        context, pooled = self.text_encoder.encode(prompts)
        if self.zero_empty_prompts and all(p == "" for p in prompts):
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        numbers = size_numbers(self.original_size or size, self.crop_top_left,
                               self.target_size or size, batch=len(prompts))  # fmt: skip
        y = sdxl_vector(pooled.to(device), numbers)
        return {"context": context.to(device, dtype), "context_mask": None, "y": y.to(dtype)}
