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
from ldm.diffusion.noise import randn
from ldm.models.distributions import DiagonalGaussian
from ldm.models.image_to_image import ConcatInputs, KeepRegion, img2img_start, offset_steps


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

    def prompt_conditioning(
        self,
        prompts: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        size: tuple[int, int],
        negative: bool = False,
    ) -> dict[str, Tensor | None]:
        """The U-Net's conditioning keyword arguments for prompts and an image ``size``
        (height, width in pixels; unused here, SDXL's micro-conditioning reads it, and the
        SDXL refiner whether these are the ``negative`` prompts, for its aesthetic score)."""
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
        return self._scaled(self._posterior(images).sample(generator))

    def _posterior(self, images: Tensor) -> DiagonalGaussian:
        """q(z | x) for images in [-1, 1], the VAE run in ``vae_precision``."""
        dtype = getattr(torch, self.vae_precision)
        kind = images.device.type
        precision = (
            torch.autocast(kind, enabled=False)
            if dtype == torch.float32
            else torch.autocast(kind, dtype=dtype)
        )
        # In the weights' dtype: under a "true" precision (bf16-true, 16-true) they were
        # converted, and a float32 input would not match them.
        weights = next(self.autoencoder.parameters()).dtype
        with precision:
            return self.autoencoder.encode(images.to(weights))

    def _scaled(self, z: Tensor) -> Tensor:
        """Float32 ``scale_factor · z``, as ``encode_latents``."""
        return (z * self.autoencoder.scale_factor.to(z.dtype)).float()

    @torch.no_grad()
    def image_inputs(
        self,
        image: Tensor,
        generators: Sequence[torch.Generator],
        strength: float = 1.0,
        keep: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Per-sample random draws for img2img and inpainting, in diffusers' order.

        Each sample's generator draws, as ``StableDiffusionImg2ImgPipeline`` /
        ``StableDiffusionInpaintPipeline`` draw from ``generator=[...]`` with one image per
        sample: the init image's posterior sample (skipped by SD inpainting U-Nets at strength
        1, whose start is pure noise), then the noise, then (inpainting) the masked image's
        posterior sample; the sampler's own noise follows in ``generate``. With a 4-channel
        U-Net the masked image's latents are unused, so only its draw is taken (the generator
        advances as diffusers' does) and the VAE is not run for it. The image is encoded once
        and the posterior sampled per sample, which equals encoding it once per sample.

        Args:
            image: The init image (1, 3, H, W) in [-1, 1], on the model's device.
            generators: One generator per sample.
            strength: img2img strength (only 1 vs less matters here).
            keep: Inpainting: the (1, 1, H, W) pixel mask of what to keep (1 keeps, 0 repaints).

        Returns:
            ``(init_latents or None, noise, masked_latents or None)``: (B, C, h, w) each; the
            init latents are None where they are not drawn (9-channel U-Net at strength 1),
            the masked latents None without ``keep`` or with a 4-channel U-Net.
        """
        inpainting_unet = self.unet_in_channels == self.latent_channels + 5
        init = self._posterior(image)
        masked = self._posterior(image * keep) if keep is not None and inpainting_unet else None
        draw_init = not (inpainting_unet and keep is not None and strength == 1.0)
        shape = init.mean.shape  # (1, C, h, w)
        z0, noise, zm = [], [], []
        for g in generators:
            if draw_init:
                z0.append(self._scaled(init.sample(g)))
            noise.append(randn(shape, generator=g, device=image.device))
            if masked is not None:
                zm.append(self._scaled(masked.sample(g)))
            elif keep is not None:  # diffusers samples the masked image's posterior here too
                randn(shape, generator=g, dtype=init.mean.dtype)  # (unused): the same draw
        return (torch.cat(z0) if z0 else None, torch.cat(noise), torch.cat(zm) if zm else None)

    @property
    def unet_in_channels(self) -> int:
        """The U-Net's input channels (latent channels + 5 for SD inpainting U-Nets)."""
        return int(self.unet.input_blocks[0][0].in_channels)

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
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        latents: Tensor | None = None,
        net: Callable[..., Tensor] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        init_latents: Tensor | None = None,
        strength: float = 1.0,
        mask: Tensor | None = None,
        masked_latents: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Sample images for prompts with classifier-free guidance.

        Args:
            prompts: B prompts.
            sampler: A configured ``Sampler`` (name, steps, spacing, ...).
            guidance: CFG scale; at most 1 disables guidance and the unconditional pass (as
                diffusers' pipelines do).
            negative_prompts: One string for all, or B strings; they replace the unconditional
                (empty-prompt) context.
            guidance_rescale: Guidance rescale φ (Lin et al. 2024).
            height: Image height in pixels (default: the autoencoder's training resolution).
            width: Image width in pixels (default: height).
            generator: RNG for the initial noise (drawn on the CPU, so results do not depend on
                the device) and for stochastic samplers; a list of B generators gives each sample
                its own stream (initial noise, then the sampler's noise), as diffusers' lists do.
            latents: Initial DDPM-space noise (B, C, h, w) instead of drawing it.
            net: The network to use instead of ``self.unet`` (e.g. EMA weights).
            callback: Per-step callback passed to the sampler.
            init_latents: img2img (SDEdit, Meng et al. 2022): scaled latents of the init images
                (B, C, h, w); they are noised to the grid's σ at ``strength`` and denoised from
                there, with ``latents`` as the noise (required then).
            strength: Fraction of the sampler's steps that run, in (0, 1]; as diffusers'
                ``StableDiffusionImg2ImgPipeline``, the last ``int(steps · strength)`` steps.
            mask: Inpainting with this (4-channel) U-Net: (B, 1, h, w) latent-size mask, 1 where
                to repaint (see :func:`ldm.models.image_to_image.latent_mask`); after every
                step the kept region is replaced by ``init_latents`` noised to the step's σ
                (latent blending, as diffusers' ``StableDiffusionInpaintPipeline`` for 4-channel
                U-Nets; Heun's
                corrector and DPM++ 2M's next step see the blended state, as there). At
                ``strength`` 1 sampling starts from pure noise, as there.
            masked_latents: With ``mask``, for SD inpainting U-Nets (``in_channels`` = latent
                channels + 5): scaled latents of the image with the repainted region zeroed;
                every U-Net call sees ``[x, mask, masked_latents]`` along channels (Rombach et
                al. 2022's inpainting model) and no blending is done.

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
            if init_latents is not None:
                shape = tuple(init_latents.shape)
            latents = randn(shape, generator=generator, device="cpu")
        latents = latents.to(device)

        f = self.downsample_factor
        size = (latents.shape[-2] * f, latents.shape[-1] * f)  # pixels (height, width)
        cond = self.prompt_conditioning(prompts, device, dtype, size)
        net = net or self.unet
        if masked_latents is not None:
            if mask is None:
                raise ValueError("masked_latents need a mask")
            net = ConcatInputs(net, torch.cat([mask, masked_latents], 1).to(device, dtype))
        denoiser = Denoiser(net, self.schedule, self.prediction)
        extra: dict[str, Any] | None = cond
        if guidance > 1.0:
            uncond = self.prompt_conditioning(negative_prompts, device, dtype, size, negative=True)
            denoiser = CFGDenoiser(denoiser, cond, uncond, scale=guidance, rescale=guidance_rescale)
            extra = None
        if init_latents is None:
            z = sampler(
                denoiser,
                latents,
                self.schedule,
                generator=generator,
                callback=callback,
                extra_args=extra,
            )
        else:
            grid = sampler.grid(self.schedule, tuple(latents.shape[-2:]))  # (flow shift size)
            start = img2img_start(sampler.steps, strength)
            sigmas = grid.sigmas[start:]
            z0, eps = init_latents.to(device).float(), latents.float()
            # SDEdit's forward process, in σ space (Karras et al. 2022): x = z_0 + σ·ε (for a
            # flow model x_t = (1 − t)·z_0 + t·ε read at σ = t/(1 − t), diffusers' scale_noise);
            # for inpainting at strength 1, or a grid starting at σ = ∞ (flow, zero terminal
            # SNR), pure noise at the grid's start, as diffusers' pipelines.
            pure = (mask is not None and strength == 1.0) or bool(torch.isinf(sigmas[0]))
            x = eps * grid.init_scale if pure else z0 + sigmas[0] * eps
            if mask is None or masked_latents is not None:  # img2img, or an inpainting U-Net
                z = sampler.run(
                    denoiser,
                    x,
                    grid,
                    start,
                    generator=generator,
                    callback=callback,
                    extra_args=extra,
                )
                mask = None
            elif sampler.sampler == "dpmpp_2m":  # multistep: one run, every call blended
                m = mask.to(device).float()
                keep = KeepRegion(denoiser, m > 0.5, z0, eps, sigmas[0] if pure else None)
                z = sampler.run(
                    keep, x, grid, start, generator=generator, callback=callback, extra_args=extra
                )
            else:
                m = mask.to(device).float()
                n = len(grid.sigmas) - 1
                if sampler.sampler == "heun":  # diffusers blends after Heun's predictor too
                    denoiser = KeepRegion(denoiser, m > 0.5, z0, eps, sigmas[0] if pure else None)
                for i in range(start, n):
                    step = None if callback is None else offset_steps(callback, i - start)
                    x = sampler.run(
                        denoiser,
                        x,
                        grid,
                        i,
                        i + 1,
                        generator=generator,
                        callback=step,
                        extra_args=extra,
                    )
                    if i < n - 1:
                        x = (1 - m) * (z0 + grid.sigmas[i + 1] * eps) + m * x
                z = x
            z = z / grid.final_scale  # σ space → DDPM space
            if mask is not None:  # the last blend uses the clean latents, in DDPM space
                z = (1 - m) * z0 + m * z
        return self.decode_latents(z), z
