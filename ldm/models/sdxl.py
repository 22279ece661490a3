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
from ldm.models.micro_conditioning import SIZE_EMBED_DIM, sdxl_vector, size_numbers


class SDXLLatentDiffusion(LatentDiffusion):
    """SDXL U-Net + VAE + two text encoders.

    Sampling conditions on ``original_size``, ``crop_top_left`` and ``target_size`` (pixel
    ``(height, width)`` / ``(top, left)``); ``None`` sizes mean the generated image's size and
    the crop defaults to ``(0, 0)``, as diffusers' ``StableDiffusionXLPipeline``. A batch of
    empty prompts (the default negative prompt) is conditioned on zeros, context and pooled
    alike, as SDXL dropped captions in training and as diffusers does for a missing negative
    prompt (``force_zeros_for_empty_prompt``); set ``zero_empty_prompts = False`` to encode "".
    The refiner (Podell et al. 2023, sec. 2.5; a U-Net taking five numbers) conditions on
    ``aesthetic_score`` (default 6.0) and its negative prompts on ``negative_aesthetic_score``
    (2.5) in place of the target size.

    Args:
        unet: An SDXL-layout ``UNetModel`` (``adm_in_channels`` = pooled width + 6 × 256).
        autoencoder: The VAE (SDXL: scale factor 0.13025).
        conditioner: The two frozen text encoders.
        schedule: The training noise schedule.
        prediction: ``eps``, ``v`` or ``x0``.
    """

    def __init__(
        self,
        unet: nn.Module,
        autoencoder: nn.Module,
        conditioner: SDXLConditioner,
        schedule: NoiseSchedule,
        prediction: str = "eps",
    ) -> None:
        super().__init__(unet, autoencoder, conditioner, schedule, prediction)
        self.original_size: tuple[int, int] | None = None
        self.crop_top_left: tuple[int, int] = (0, 0)
        self.target_size: tuple[int, int] | None = None
        self.zero_empty_prompts = True
        self.aesthetic_score = 6.0  # the refiner's (diffusers' defaults)
        self.negative_aesthetic_score = 2.5

    @property
    def is_refiner(self) -> bool:
        """Whether the U-Net takes the refiner's five numbers (aesthetic score for the target
        size): ``adm_in_channels`` = pooled width + 5 × 256."""
        adm = getattr(self.unet, "adm_in_channels", None)
        return adm == self.text_encoder.pooled_dim + 5 * SIZE_EMBED_DIM

    def prompt_conditioning(
        self,
        prompts: Sequence[str],
        device: torch.device,
        dtype: torch.dtype,
        size: tuple[int, int],
        negative: bool = False,
    ) -> dict[str, Tensor | None]:
        """``context`` (both encoders' states), ``y`` (pooled text + embedded sizes; the
        refiner: original size, crop and the aesthetic score, ``negative_aesthetic_score`` for
        the ``negative`` prompts, as diffusers' ``StableDiffusionXLImg2ImgPipeline``)."""
        prompts = list(prompts)
        context, pooled = self.text_encoder.encode(prompts)
        if self.zero_empty_prompts and all(p == "" for p in prompts):
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        numbers = size_numbers(self.original_size or size, self.crop_top_left,
                               self.target_size or size, batch=len(prompts))  # fmt: skip
        if self.is_refiner:
            score = self.negative_aesthetic_score if negative else self.aesthetic_score
            numbers = torch.cat([numbers[:, :4], torch.full_like(numbers[:, :1], score)], 1)
        return self.vector_conditioning(context.to(device, dtype), pooled.to(device), numbers)

    def vector_conditioning(
        self, context: Tensor, pooled: Tensor, numbers: Tensor
    ) -> dict[str, Tensor | None]:
        """The U-Net's keyword arguments for encoded prompts: ``context`` (B, L, D) as given and
        ``y`` = [pooled, embedded numbers] (B, adm_in_channels) in ``context``'s dtype.

        Args:
            context: Both encoders' states (B, L, D1 + D2).
            pooled: The second encoder's pooled projection (B, P).
            numbers: (B, 6) ``size_numbers`` (training: from the batch).
        """
        y = sdxl_vector(pooled.to(context.device).float(), numbers)
        return {"context": context, "context_mask": None, "y": y.to(context.dtype)}

    def empty_prompt(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(1, L, D) states and (1, P) pooled vector of the empty prompt: zeros with
        ``zero_empty_prompts`` (SDXL's unconditional input), else the encoded ``""`` (with
        gradients into encoders that train, as their captions)."""
        c = self.text_encoder
        if self.zero_empty_prompts:
            return (torch.zeros(1, c.max_length, c.dim, device=device),
                    torch.zeros(1, c.pooled_dim, device=device))  # fmt: skip
        context, pooled = c.encode([""])
        return context.to(device), pooled.to(device)


def drop_captions(
    context: Tensor,
    pooled: Tensor,
    empty_context: Tensor,
    empty_pooled: Tensor,
    drop_first: Tensor,
    drop_second: Tensor,
    split: int,
) -> tuple[Tensor, Tensor]:
    """Classifier-free guidance dropout (Ho & Salimans 2022, sec. 3.2) per SDXL encoder.

    Where ``drop_first`` is set, a sample's first-encoder states ``context[..., :split]`` become
    the empty prompt's; where ``drop_second`` is set, its second-encoder states and its pooled
    vector do (generative-models drops each embedder's outputs with its own ``ucg_rate``; equal
    masks drop the whole caption, as diffusers' and kohya's caption dropout).

    Args:
        context: (B, L, D1 + D2) both encoders' states.
        pooled: (B, P) pooled vectors.
        empty_context: (1, L, D1 + D2) the empty prompt's states.
        empty_pooled: (1, P) its pooled vector.
        drop_first: (B,) bool.
        drop_second: (B,) bool.
        split: D1, the first encoder's width.

    Returns:
        (context, pooled) with the dropped parts replaced.
    """
    empty_context, empty_pooled = empty_context.to(context), empty_pooled.to(pooled)
    first = torch.where(drop_first[:, None, None], empty_context[..., :split],
                        context[..., :split])  # fmt: skip
    second = torch.where(drop_second[:, None, None], empty_context[..., split:],
                         context[..., split:])  # fmt: skip
    return torch.cat([first, second], dim=-1), torch.where(
        drop_second[:, None], empty_pooled, pooled
    )
