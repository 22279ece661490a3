"""The Lightning system that trains the text-conditioned latent diffusion U-Net.

Each step: latents z = scale_factor · E(x) from the frozen autoencoder (or sampled from cached
posterior mean/std), text context from the frozen encoder (or cached embeddings), captions
replaced by the empty prompt with probability ``p_uncond`` (classifier-free guidance training,
Ho & Salimans 2022, §3.2), then the weighted denoising loss of the chosen parameterisation.
A non-finite loss skips the step on every rank; ``max_bad_steps`` in a row stop training.

``resume.ckpt`` leaves out the frozen parts (`ldm.training.frozen_resume`).
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from ldm.data.cached import sample_latents
from ldm.diffusion import DiffusionLoss, Sampler
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.models.micro_conditioning import batch_size_numbers
from ldm.models.sdxl import SDXLLatentDiffusion, drop_captions
from ldm.training.ema import EMA
from ldm.training.frozen_resume import FROZEN_PREFIXES, FrozenResume  # noqa: F401 (re-export)
from ldm.training.nonfinite import NonFiniteGuard, NonFiniteLossError  # noqa: F401 (re-export)
from ldm.training.optim import build_optimizer, build_scheduler, scaled_clipping
from ldm.training.sharding import full_parameters, full_state_dict, outermost_module

log = logging.getLogger(__name__)

NUM_T_BUCKETS = 4


def freeze_parameters(module: torch.nn.Module, patterns: Sequence[str]) -> int:
    """``requires_grad_(False)`` on the parameters whose names match an fnmatch pattern.

    Returns:
        How many parameters were frozen.

    Raises:
        ValueError: A pattern matches no parameter, or every parameter is frozen.
    """
    if not patterns:
        return 0
    names = [name for name, _ in module.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(
                f"model.freeze: pattern {pattern!r} matches no U-Net parameter "
                f"(names look like {names[0]!r})"
            )
    frozen = 0
    for name, param in module.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen += 1
    if frozen == len(names):
        raise ValueError("model.freeze freezes every U-Net parameter: nothing would train")
    log.info("model.freeze: %d of %d U-Net parameters frozen", frozen, len(names))
    return frozen


class DiffusionModule(FrozenResume, pl.LightningModule):
    """Trains ``model.unet``; the autoencoder and text encoder stay frozen.

    Args:
        model: The ``LatentDiffusion`` composite.
        loss: The configured ``DiffusionLoss``.
        p_uncond: Probability of training a sample with the empty prompt.
        lr: AdamW learning rate (never scaled silently).
        text_encoder_lr: Learning rate of the text encoder's trainable weights (None: ``lr``).
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        eps: AdamW epsilon.
        optim_implementation: AdamW's implementation (``optim.implementation``:
            :func:`ldm.training.optim.implementation_kwargs`).
        warmup_steps: Linear warm-up steps.
        lr_schedule: ``constant`` or ``cosine`` after warm-up.
        min_lr_ratio: Cosine floor.
        total_steps: Steps the cosine schedule spans.
        ema_decay: EMA decay; None disables the EMA.
        ema_every: EMA update interval in optimizer steps.
        sampler: Sampler for logged image grids.
        sample_prompts: Prompts for logged grids (default: the batch's captions).
        guidance: CFG scale of logged grids.
        negative_prompt: Negative prompt of logged grids.
        sample_seed: Seed of logged grids (the same noise every time).
        empty_context: Cached mode: the empty prompt's ``(context L×D, mask L)`` as stored with
            the shards (default: encode "" with the text encoder).
        empty_pooled: Cached SDXL mode: the empty prompt's pooled vector (P,) as stored.
        sdxl_uncond: SDXL: ``joint`` drops whole captions, ``per_encoder`` each encoder's
            outputs independently (``model.sdxl.uncond``).
        max_bad_steps: Consecutive non-finite losses tolerated before stopping.
        freeze: fnmatch patterns of U-Net parameter names kept fixed (``requires_grad=False``,
            left out of the optimizer).
        omit_frozen_unet: The config rebuilds the U-Net's frozen parameters (LoRA bases, frozen
            patterns) from ``model.init_from``: leave them (and their EMA copies, which equal
            them) out of ``resume.ckpt`` like the frozen encoders, behind a fingerprint.

    Raises:
        ValueError: A ``freeze`` pattern that matches no parameter, or one that freezes all.
    """

    checkpoint_kind = "ldm"

    def __init__(
        self,
        model: LatentDiffusion,
        loss: DiffusionLoss,
        p_uncond: float = 0.1,
        lr: float = 1e-4,
        text_encoder_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        optim_implementation: str = "auto",
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        total_steps: int = 0,
        ema_decay: float | None = 0.9999,
        ema_every: int = 1,
        sampler: Sampler | None = None,
        sample_prompts: list[str] | None = None,
        guidance: float = 7.5,
        negative_prompt: str = "",
        sample_seed: int = 0,
        empty_context: tuple[torch.Tensor, torch.Tensor] | None = None,
        empty_pooled: torch.Tensor | None = None,
        sdxl_uncond: str = "joint",
        max_bad_steps: int = 20,
        freeze: Sequence[str] = (),
        omit_frozen_unet: bool = False,
    ) -> None:
        super().__init__()
        freeze_parameters(model.unet, freeze)
        self._frozen_unet = (
            [name for name, p in model.unet.named_parameters() if not p.requires_grad]
            if omit_frozen_unet
            else []
        )
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
        self.model = model
        self.loss_fn = loss
        self.p_uncond = p_uncond
        self.optim_args = dict(
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            eps=eps,
            implementation=optim_implementation,
        )
        self.text_encoder_lr = lr if text_encoder_lr is None else text_encoder_lr
        #: The text encoder's trainable parameter names (empty: it is frozen).
        self._text_trainable = {
            name for name, p in model.text_encoder.named_parameters() if p.requires_grad
        }
        self.sched_args = dict(
            warmup_steps=warmup_steps,
            schedule=lr_schedule,
            total_steps=total_steps,
            min_lr_ratio=min_lr_ratio,
        )
        self.ema = EMA(model.unet, decay=ema_decay, update_every=ema_every) if ema_decay else None
        self.sampler = sampler or Sampler("ddim", steps=25, disable_progress=True)
        self.sample_prompts = list(sample_prompts or [])
        self.guidance = guidance
        self.negative_prompt = negative_prompt
        self.sample_seed = sample_seed
        self._empty_context = empty_context
        self._empty_pooled = empty_pooled
        if sdxl_uncond not in ("joint", "per_encoder"):
            raise ValueError(f"sdxl_uncond must be joint or per_encoder, got {sdxl_uncond!r}")
        self.sdxl_uncond = sdxl_uncond
        self.guard = NonFiniteGuard(max_bad_steps)
        self._skipped = False
        # Taken once, as built from the config: before any device move or precision conversion
        # (``bf16-true`` converts after a resume is loaded, FSDP before), so saves and resumes
        # compare like with like; the frozen weights never change afterwards.
        self.frozen_fingerprint = self._fingerprint_frozen()

    # -- batch preparation ---------------------------------------------------------------------

    def empty_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, L, D)`` context and ``(1, L)`` mask of the empty prompt, on this device."""
        if self._empty_context is not None:
            context, mask = self._empty_context
            return context.to(self.device).reshape(1, *context.shape[-2:]), mask.to(
                self.device
            ).reshape(1, -1).bool()
        return self.model.text_encoder.empty_embedding()

    def _unet_dtype(self) -> torch.dtype:
        """The U-Net's weight dtype: float32, or bf16/fp16 under a "true" trainer precision."""
        return next(self.model.unet.parameters()).dtype

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents of a batch (cached posterior or freshly encoded images)."""
        if "latent_mean" in batch:
            z = sample_latents(batch["latent_mean"].float(), batch["latent_std"].float())
            return z * self.model.autoencoder.scale_factor.to(z.dtype)
        return self.model.encode_images(batch["image"])

    def context(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text context and mask, with captions dropped to the empty prompt w.p. ``p_uncond``."""
        if "context" in batch:
            context, mask = batch["context"].float(), batch["context_mask"].bool()
        else:
            context, mask = self.model.text_encoder.encode(list(batch["caption"]))
        if self.training and self.p_uncond > 0:
            drop = torch.rand(context.shape[0], device=context.device) < self.p_uncond  # (B,)
            if drop.any():
                e_context, e_mask = self.empty_context()
                context = torch.where(drop[:, None, None], e_context.to(context), context)
                mask = torch.where(drop[:, None], e_mask.to(mask.device), mask)
        return context, mask

    def sdxl_context(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL: both encoders' states (B, L, D) and the pooled vector (B, P), cached or
        encoded, each encoder's outputs dropped to the empty prompt's w.p. ``p_uncond``
        (jointly or per encoder, ``sdxl_uncond``; :func:`ldm.models.sdxl.drop_captions`)."""
        if "context" in batch:
            if "pooled" not in batch:
                raise ValueError(
                    "the cached shards hold no pooled text embedding, which SDXL "
                    "needs: re-run python -m ldm.cache with this SDXL config"
                )
            context, pooled = batch["context"].float(), batch["pooled"].float()
        else:
            context, pooled = self.model.text_encoder.encode(list(batch["caption"]))
        if self.training and self.p_uncond > 0:
            first = torch.rand(context.shape[0], device=context.device) < self.p_uncond  # (B,)
            second = (
                first
                if self.sdxl_uncond == "joint"
                else torch.rand(context.shape[0], device=context.device) < self.p_uncond
            )
            if (first | second).any():
                if self._empty_pooled is not None and not self.model.zero_empty_prompts:
                    e_context = self._empty_context[0].reshape(1, *context.shape[-2:])
                    e_pooled = self._empty_pooled.reshape(1, -1)
                else:  # zeros (SDXL's unconditional input), or "" encoded
                    e_context, e_pooled = self.model.empty_prompt(self.device)
                context, pooled = drop_captions(
                    context,
                    pooled,
                    e_context,
                    e_pooled,
                    first,
                    second,
                    self.model.text_encoder.split,
                )
        return context, pooled

    def unet_conditioning(
        self, batch: dict[str, Any], z: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """The U-Net's keyword arguments for a batch whose latents are ``z``: the text context
        (:meth:`context`); SDXL: also ``y``, the pooled vector and the batch's micro-conditioning
        (its ``original_size``/``crop_top_left``/``target_size``, else the image size and
        crop (0, 0), as diffusers)."""
        if isinstance(self.model, SDXLLatentDiffusion):
            context, pooled = self.sdxl_context(batch)
            f = self.model.downsample_factor
            numbers = batch_size_numbers(batch, (z.shape[-2] * f, z.shape[-1] * f), z.shape[0])
            return self.model.vector_conditioning(context.to(z.dtype), pooled, numbers)
        context, mask = self.context(batch)
        return self.model.conditioning(context.to(z.dtype), mask)

    # -- training ------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        z = self.latents(batch).to(self._unet_dtype())  # bf16/16-true converted the U-Net
        cond = self.unet_conditioning(batch, z)
        out = self.loss_fn(self.model.unet, z, self.model.schedule, cond)
        loss = out.loss.mean()
        batch_size = z.shape[0]
        if not self.guard.check(self.global_step, loss):
            self.log("train/skipped_steps", float(self.guard.skipped_steps), batch_size=batch_size)
            self._skipped = True
            return None  # every rank skips together (the flag is all-reduced)
        self._skipped = False
        logs = {"train/loss": loss.detach()}
        buckets = (out.t * NUM_T_BUCKETS // self.model.schedule.num_timesteps).clamp(
            max=NUM_T_BUCKETS - 1
        )
        for b in range(NUM_T_BUCKETS):
            sel = buckets == b
            if sel.any():
                logs[f"train/loss_t{b}"] = out.loss.detach()[sel].mean()
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log(
            "loss", loss.detach(), prog_bar=True, on_step=True, logger=False, batch_size=batch_size
        )
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update (before any callback sees the batch end, so
        checkpoints written at batch end include it)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._skipped:
            root = outermost_module(self)
            self.ema.step(self.model.unet, gather=lambda: full_parameters(root))

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        generator = torch.Generator(device=self.device).manual_seed(batch_idx)
        z = self.latents(batch).to(self._unet_dtype())
        cond = self.unet_conditioning(batch, z)
        net = self.ema.model if self.ema is not None else self.model.unet
        out = self.loss_fn(net, z, self.model.schedule, cond, generator=generator)
        self.log("val/loss", out.loss.mean(), prog_bar=True, sync_dist=True, batch_size=z.shape[0])

    # -- images and export ---------------------------------------------------------------------

    @torch.no_grad()
    def log_images(
        self, batch: dict[str, Any], max_images: int = 8
    ) -> dict[str, tuple[torch.Tensor, list[str] | None]]:
        """Samples for fixed prompts (or the batch's captions) at a fixed seed."""
        prompts = (self.sample_prompts or list(batch["caption"]))[:max_images]
        generator = torch.Generator().manual_seed(self.sample_seed)
        net = self.ema.model if self.ema is not None else None
        height = width = None  # the batch's size (one aspect bucket, or the square)
        if "latent_mean" in batch:
            f = self.model.downsample_factor
            height, width = (n * f for n in batch["latent_mean"].shape[-2:])
        elif "image" in batch:
            height, width = batch["image"].shape[-2:]
        images, _ = self.model.generate(
            prompts,
            self.sampler,
            guidance=self.guidance,
            negative_prompts=self.negative_prompt,
            height=height,
            width=width,
            generator=generator,
            net=net,
        )
        return {"samples": (images, prompts)}

    def export_modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """U-Net (raw and EMA) and the autoencoder; the text encoder is named in the config.
        Under FSDP every rank must call (the U-Net's shards are gathered)."""
        modules = {
            "unet": full_state_dict(self.model.unet, outermost_module(self)),
            "autoencoder": self.model.autoencoder.state_dict(),
        }
        if self.ema is not None:
            modules["unet_ema"] = self.ema.averaged_state_dict()
        if self._text_trainable:
            params = dict(self.model.text_encoder.named_parameters())
            modules["text_encoder"] = {
                name: params[name].detach() for name in sorted(self._text_trainable)
            }
        return modules

    def configure_optimizers(self) -> Any:
        groups = [{"params": list(self.model.unet.parameters())}]
        if self._text_trainable:
            groups.append(
                {"params": list(self.model.text_encoder.parameters()), "lr": self.text_encoder_lr}
            )
        trainer = self._trainer
        clip = trainer.gradient_clip_val if trainer is not None else None
        optimizer = build_optimizer(
            groups, **self.optim_args, scaled_clipping=scaled_clipping(trainer, clip)
        )
        scheduler = build_scheduler(optimizer, **self.sched_args)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)
        if self._text_trainable:
            self.log(
                "train/lr_text_encoder",
                optimizer.param_groups[1]["lr"],
                on_step=True,
                on_epoch=False,
            )
