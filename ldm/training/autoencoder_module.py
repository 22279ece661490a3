"""The Lightning system that trains the KL autoencoder with its GAN loss.

Manual optimisation with ONE AdamW holding two parameter groups (autoencoder + learned log-variance,
and the discriminator with its own learning rate). Each step backpropagates the generator loss
with the discriminator frozen, then (once ``disc_start`` is reached) the discriminator loss on
detached reconstructions, and takes a single optimiser step. One ``optimizer.step()`` per batch
keeps ``trainer.global_step`` equal to the number of batches trained (Lightning counts every
optimiser step in manual optimisation, so two optimisers would double it and halve
``max_steps``), and the learning-rate schedule applies to both groups alike.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.eval.reconstruction import psnr, ssim
from ldm.training.nonfinite import NonFiniteGuard
from ldm.training.optim import build_optimizer, build_scheduler, scaled_clipping
from ldm.training.sharding import full_state_dict, outermost_module


class AutoencoderModule(pl.LightningModule):
    """Trains an ``AutoencoderKL`` with reconstruction + KL + PatchGAN losses.

    Args:
        autoencoder: The ``AutoencoderKL`` to train.
        loss: The ``AutoencoderLoss`` (owns the discriminator and the learned log-variance).
        lr: Learning rate of the autoencoder group.
        disc_lr: Learning rate of the discriminator group (None: ``lr``).
        betas: AdamW betas (taming/SD use (0.5, 0.9) for GAN training).
        weight_decay: AdamW weight decay.
        eps: AdamW epsilon.
        optim_implementation: AdamW's implementation (``optim.implementation``:
            :func:`ldm.training.optim.implementation_kwargs`).
        warmup_steps: Linear warm-up steps.
        lr_schedule: ``constant`` or ``cosine`` after warm-up.
        min_lr_ratio: Cosine floor.
        total_steps: Steps the cosine schedule spans.
        gradient_clip_val: Gradient-norm clipping (None: off); done here because Lightning
            does not clip in manual optimisation.
        max_bad_steps: Consecutive non-finite losses tolerated (each skips its step) before
            training stops with :class:`ldm.training.nonfinite.NonFiniteLossError`.
    """

    checkpoint_kind = "autoencoder"

    def __init__(
        self,
        autoencoder: nn.Module,
        loss: nn.Module,
        lr: float = 4.5e-6,
        disc_lr: float | None = None,
        betas: tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        optim_implementation: str = "auto",
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        min_lr_ratio: float = 0.0,
        total_steps: int = 0,
        gradient_clip_val: float | None = None,
        max_bad_steps: int = 20,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.loss = loss
        self.lr = lr
        self.disc_lr = lr if disc_lr is None else disc_lr
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.eps = eps
        self.optim_implementation = optim_implementation
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.total_steps = total_steps
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = False
        self.guard = NonFiniteGuard(max_bad_steps)

    @property
    def discriminator(self) -> nn.Module:
        return self.loss.discriminator

    def _disc_active(self, step: int) -> bool:
        return step >= self.loss.disc_start and self.loss.disc_factor > 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        step = self.global_step
        opt = self.optimizers()
        sched = self.lr_schedulers()

        reconstruction, posterior = self.autoencoder(x)
        self.discriminator.requires_grad_(False)
        g_loss, g_log = self.loss.generator_loss(
            x, reconstruction, posterior, step, self.autoencoder.get_last_layer()
        )
        self.discriminator.requires_grad_(True)
        logs = {f"train/{k}": v for k, v in g_log.items()}
        losses = [g_loss]
        if self._disc_active(step):
            d_loss, d_log = self.loss.discriminator_loss(x, reconstruction.detach(), step)
            losses.append(d_loss)
            logs.update({f"train/{k}": v for k, v in d_log.items()})
        opt.zero_grad(set_to_none=True)
        if not self.guard.check(step, *losses):  # the same on every rank: all skip together
            self.log("train/skipped_steps", float(self.guard.skipped_steps), batch_size=len(x))
            return g_loss.detach()
        self.manual_backward(g_loss)  # its graph was built with the discriminator frozen
        if len(losses) > 1:
            self.manual_backward(losses[1])
        if self.gradient_clip_val:
            self.clip_gradients(
                opt, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        opt.step()
        sched.step()
        logs["train/lr"] = torch.tensor(sched.get_last_lr()[0])
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(x))
        self.log("train/loss", g_loss.detach(), prog_bar=True, on_step=True, batch_size=len(x))
        return g_loss.detach()

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        posterior = self.autoencoder.encode(x)
        reconstruction = self.autoencoder.decode(posterior.mode())
        g_loss, g_log = self.loss.generator_loss(
            x, reconstruction, posterior, self.global_step, None
        )
        logs = {f"val/{k}": v for k, v in g_log.items() if k in ("rec_loss", "kl_loss", "nll_loss")}
        logs["val/psnr"] = psnr(reconstruction, x).mean()
        if min(x.shape[-2:]) >= 11:  # SSIM's 11x11 window needs at least that much image
            logs["val/ssim"] = ssim(reconstruction, x).mean()
        self.log_dict(logs, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=len(x))

    @torch.no_grad()
    def log_images(
        self, batch: dict[str, Any], max_images: int = 8
    ) -> dict[str, tuple[torch.Tensor, list[str] | None]]:
        """Inputs and their reconstructions (posterior mode), for the image logger."""
        x = batch["image"][:max_images].to(self.device)
        reconstruction = self.autoencoder.decode(self.autoencoder.encode(x).mode())
        return {"inputs": (x, None), "reconstructions": (reconstruction, None)}

    def export_modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Weights saved in our checkpoints: the autoencoder (with its scale_factor buffer).
        Under FSDP every rank must call (shards are gathered)."""
        root = outermost_module(self)
        return {
            "autoencoder": full_state_dict(self.autoencoder, root),
            "loss": full_state_dict(self.loss, root),
        }

    def configure_optimizers(self) -> Any:
        disc_params = {id(p) for p in self.discriminator.parameters()}
        ae_params = list(self.autoencoder.parameters()) + [
            p for p in self.loss.parameters() if id(p) not in disc_params
        ]
        optimizer = build_optimizer(
            [
                {"params": ae_params, "lr": self.lr},
                {"params": list(self.discriminator.parameters()), "lr": self.disc_lr},
            ],
            lr=self.lr,
            betas=self.betas,
            weight_decay=self.weight_decay,
            eps=self.eps,
            implementation=self.optim_implementation,
            scaled_clipping=scaled_clipping(self._trainer, self.gradient_clip_val),
        )
        scheduler = build_scheduler(
            optimizer, self.warmup_steps, self.lr_schedule, self.total_steps, self.min_lr_ratio
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
