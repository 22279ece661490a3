"""Text-to-image latent diffusion as one plain module: frozen autoencoder and text encoder, the
trainable U-Net, the noise schedule and the sampling loop (no Lightning; ``sample.py`` uses it).

Rombach et al. 2022, eq. 3: the U-Net ε_θ(z_t, t, τ_θ(y)) denoises autoencoder latents
z = scale_factor · E(x), conditioned by cross-attention on the text encoding τ_θ(y).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm.diffusion import CFGDenoiser, Denoiser, NoiseSchedule, Sampler


class LatentDiffusion(nn.Module):
    """U-Net + frozen autoencoder + frozen text encoder + noise schedule.

    Args:
        unet: The denoising network ``unet(x_t, t, context=..., context_mask=...)``.
        autoencoder: An ``AutoencoderKL`` whose ``scale_factor`` buffer scales the latents.
        text_encoder: A ``TextEncoder`` (``encode(prompts) -> (context, mask)``).
        schedule: The training noise schedule.
        prediction: What the U-Net predicts: ``eps``, ``v`` or ``x0``.
        use_context_mask: Pass the text padding mask to cross-attention (useful for T5/BERT-like
            encoders; SD's CLIP models were trained attending to padding, so off for them).
        vae_precision: Precision of :meth:`encode_images`: ``float32`` turns any surrounding
            autocast off there (fp16 VAE activations overflow to inf/NaN), ``bfloat16`` or
            ``float16`` autocast the encode to that dtype.
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        text_encoder: nn.Module,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        use_context_mask: bool = False,
        vae_precision: str = "float32",
    ) -> None:
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.prediction = prediction
        self.use_context_mask = use_context_mask
        self.vae_precision = vae_precision

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Only the U-Net trains; the autoencoder and text encoder stay in eval mode."""
        super().train(mode)
        self.autoencoder.eval()
        self.text_encoder.eval()
        return self

    @property
    def latent_channels(self) -> int:
        return int(self.autoencoder.embed_dim)

    @property
    def downsample_factor(self) -> int:
        return int(self.autoencoder.downsample_factor)

    def conditioning(self, context: Tensor, mask: Tensor | None) -> dict[str, Tensor | None]:
        """The U-Net's conditioning keyword arguments for a text encoding."""
        return {"context": context, "context_mask": mask if self.use_context_mask else None}

    def prompt_conditioning(self, prompts: Sequence[str], device: torch.device,
                            dtype: torch.dtype, size: tuple[int, int]) -> dict[str, Tensor | None]:
        """The U-Net's conditioning keyword arguments for prompts and an image ``size``
        (height, width in pixels; unused here, SDXL's micro-conditioning reads it)."""
        context, mask = self.encode_prompts(prompts)
        return self.conditioning(context.to(device, dtype), mask.to(device))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(B, L, D) context and (B, L) mask; empty prompts reuse the cached empty encoding."""
        prompts = list(prompts)
        if all(p == "" for p in prompts):
            context, mask = self.text_encoder.empty_embedding()
            return context.expand(len(prompts), -1, -1), mask.expand(len(prompts), -1)
        return self.text_encoder.encode(prompts)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled float32 latents of images in [-1, 1] (posterior samples), with the VAE run
        in ``vae_precision`` whatever autocast is active around the call."""
        dtype = getattr(torch, self.vae_precision)
        kind = images.device.type
        precision = (torch.autocast(kind, enabled=False) if dtype == torch.float32
                     else torch.autocast(kind, dtype=dtype))
        with precision:
            z = self.autoencoder.encode_latents(images.float(), sample=True, generator=generator)
        return z.float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from scaled latents."""
        return self.autoencoder.decode_latents(latents.float()).clamp(-1, 1)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """The latent shape for images of ``height`` × ``width`` pixels.

        Raises:
            ValueError: A side is not a multiple of the autoencoder's downsampling factor.
        """
        f = self.downsample_factor
        if height % f or width % f:
            raise ValueError(
                f"height and width must be multiples of {f} (the autoencoder's downsampling "
                f"factor); got {height}x{width}"
            )
        return batch, self.latent_channels, height // f, width // f

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        sampler: Sampler,
        guidance: float = 7.5,
        negative_prompts: Sequence[str] | str = "",
        guidance_rescale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | None = None,
        latents: Tensor | None = None,
        net: Callable[..., Tensor] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample images for prompts with classifier-free guidance.

        Args:
            prompts: B prompts.
            sampler: A configured ``Sampler`` (name, steps, spacing, ...).
            guidance: CFG scale (1 disables guidance and the unconditional pass).
            negative_prompts: One string for all, or B strings; they replace the unconditional
                (empty-prompt) context.
            guidance_rescale: Guidance rescale φ (Lin et al. 2024).
            height: Image height in pixels (default: the autoencoder's training resolution).
            width: Image width in pixels (default: height).
            generator: RNG for the initial noise (drawn on the CPU, so results do not depend on
                the device) and for stochastic samplers.
            latents: Initial DDPM-space noise (B, C, h, w) instead of drawing it.
            net: The network to use instead of ``self.unet`` (e.g. EMA weights).
            callback: Per-step callback passed to the sampler.

        Returns:
            (images in [-1, 1] of shape (B, 3, H, W), final scaled latents (B, C, h, w)).
        """
        prompts = list(prompts)
        batch = len(prompts)
        if isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * batch
        if len(negative_prompts) != batch:
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {batch} prompts")
        device = next(self.unet.parameters()).device
        dtype = next(self.unet.parameters()).dtype
        if latents is None:
            height = height or int(getattr(self.autoencoder, "resolution", 256))
            width = width or height
            shape = self.latent_shape(batch, height, width)
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        latents = latents.to(device)

        f = self.downsample_factor
        size = (latents.shape[-2] * f, latents.shape[-1] * f)  # pixels (height, width)
        cond = self.prompt_conditioning(prompts, device, dtype, size)
        denoiser = Denoiser(net or self.unet, self.schedule, self.prediction)
        if guidance != 1.0:
            uncond = self.prompt_conditioning(negative_prompts, device, dtype, size)
            guided = CFGDenoiser(denoiser, cond, uncond, scale=guidance, rescale=guidance_rescale)
            z = sampler(guided, latents, self.schedule, generator=generator, callback=callback)
        else:
            z = sampler(denoiser, latents, self.schedule, generator=generator, callback=callback,
                        extra_args=cond)
        return self.decode_latents(z), z
