"""Training objective of the KL autoencoder: reconstruction (+ LPIPS) under a learned variance,
KL to N(0, I), and a PatchGAN adversarial term (Rombach et al. 2022, App. G; Esser et al. 2021,
"Taming Transformers", Sec. 3.1). Mirrors ``LPIPSWithDiscriminator`` of the original code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.models.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from ldm.models.distributions import DiagonalGaussian
from ldm.models.lpips import LPIPS

__all__ = ["AutoencoderLoss"]

_DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def _drop_perceptual(module: nn.Module, state_dict: dict, prefix: str, *_: object) -> None:
    """state_dict post-hook: leave out the frozen LPIPS tensors."""
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _keep_perceptual(
    module: nn.Module, state_dict: dict, prefix: str, *_: object, **__: object
) -> None:
    """load_state_dict pre-hook: LPIPS tensors absent from ``state_dict`` keep their values."""
    for key, value in module.perceptual.state_dict().items():
        state_dict.setdefault(f"{prefix}perceptual.{key}", value)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of the KL autoencoder.

    Generator: ``sum(rec / exp(logvar) + logvar) / B + kl_weight * KL + lambda * f * L_G`` where
    ``rec = |x - x_hat|`` (or squared) ``+ perceptual_weight * LPIPS``, ``L_G = -mean(D(x_hat))``,
    ``f = disc_factor`` once ``global_step >= disc_start`` (else 0) and ``lambda`` the adaptive
    weight of Esser et al. 2021, eq. 7.

    Args:
        rec_loss: Pixel reconstruction loss, ``"l1"`` or ``"l2"``.
        perceptual_weight: Weight of the LPIPS term; 0 disables it (no weights needed).
        lpips_weights: Local path of the LPIPS/VGG16 weights (see :mod:`ldm.models.lpips`).
        logvar_init: Initial value of the learned (scalar) log-variance of the NLL.
        kl_weight: Weight of the KL term.
        disc_loss: Discriminator loss, ``"hinge"`` or ``"vanilla"``.
        disc_weight: Multiplier of the adaptive GAN weight.
        disc_factor: GAN factor once the discriminator is on.
        disc_start: Global step at which the GAN terms switch on.
        disc_num_layers: Stride-2 layers of the PatchGAN discriminator.
        disc_ndf: Channels of the discriminator's first layer.
        disc_in_channels: Image channels seen by the discriminator.

    The frozen LPIPS network is not part of ``state_dict()`` (it is loaded from
    ``lpips_weights``); the learned ``logvar`` and the discriminator are.

    Raises:
        FileNotFoundError: ``perceptual_weight > 0`` without an existing ``lpips_weights`` file.
        ValueError: Unknown ``rec_loss`` or ``disc_loss``.
    """

    def __init__(
        self,
        rec_loss: str = "l1",
        perceptual_weight: float = 0.0,
        lpips_weights: str | None = None,
        logvar_init: float = 0.0,
        kl_weight: float = 1e-6,
        disc_loss: str = "hinge",
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_start: int = 50001,
        disc_num_layers: int = 3,
        disc_ndf: int = 64,
        disc_in_channels: int = 3,
    ) -> None:
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        if disc_loss not in _DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(_DISC_LOSSES)}, got {disc_loss!r}")
        self.rec_loss = rec_loss
        self.perceptual_weight = perceptual_weight
        self.perceptual: LPIPS | None = None
        if perceptual_weight > 0:
            if lpips_weights is None or not Path(lpips_weights).is_file():
                raise FileNotFoundError(
                    f"perceptual_weight={perceptual_weight} needs LPIPS/VGG16 weights but "
                    f"lpips_weights={lpips_weights!r} is not a file: download them (see "
                    "ldm/models/lpips.py), set loss.lpips_weights to the local path, or set "
                    "loss.perceptual_weight=0"
                )
            self.perceptual = LPIPS(lpips_weights)
            # The frozen LPIPS net is re-read from lpips_weights: keep it out of checkpoints.
            self.register_state_dict_post_hook(_drop_perceptual)
            self.register_load_state_dict_pre_hook(_keep_perceptual)
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.kl_weight = kl_weight
        self.disc_loss_fn = _DISC_LOSSES[disc_loss]
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_start = disc_start
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)

    def disc_factor_at(self, global_step: int) -> float:
        """The GAN factor at ``global_step``: 0 before ``disc_start``, ``disc_factor`` after."""
        return self.disc_factor if global_step >= self.disc_start else 0.0

    def adaptive_weight(
        self, nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor | None
    ) -> Tensor:
        """Balance of GAN and reconstruction gradients at the decoder's last layer.

        Esser et al. 2021, eq. 7: ``lambda = ||grad L_rec|| / (||grad L_GAN|| + 1e-4)``, clamped
        to [0, 1e4], detached, times ``disc_weight``. Falls back to 0 where the gradients cannot
        be taken (no grad mode, eval, ``last_layer`` None or outside the graph).
        """
        zero = torch.zeros((), device=nll_loss.device)
        if (
            last_layer is None
            or not torch.is_grad_enabled()
            or not (nll_loss.requires_grad and g_loss.requires_grad and last_layer.requires_grad)
        ):
            return zero
        nll_grad, g_grad = (
            torch.autograd.grad(term, last_layer, retain_graph=True, allow_unused=True)[0]
            for term in (nll_loss, g_loss)
        )
        if nll_grad is None or g_grad is None:
            return zero
        weight = torch.norm(nll_grad) / (torch.norm(g_grad) + 1e-4)
        return torch.clamp(weight, 0.0, 1e4).detach() * self.disc_weight

    def generator_loss(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        posterior: DiagonalGaussian,
        global_step: int,
        last_layer: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder (generator) loss.

        Args:
            inputs: Images (B, C, H, W) in [-1, 1].
            reconstructions: Decoder outputs, same shape.
            posterior: q(z | inputs) from the encoder.
            global_step: Training step (switches the GAN term on at ``disc_start``).
            last_layer: ``autoencoder.get_last_layer()`` for the adaptive GAN weight.

        Returns:
            ``(loss, log)``: a scalar to minimise and detached scalars for logging.
        """
        diff = inputs.contiguous() - reconstructions.contiguous()
        pixel = diff.abs() if self.rec_loss == "l1" else diff.pow(2)  # (B, C, H, W)
        rec = pixel
        log: dict[str, Tensor] = {}
        if self.perceptual is not None:
            p_loss = self.perceptual(inputs.contiguous(), reconstructions.contiguous())
            rec = rec + self.perceptual_weight * p_loss  # (B, 1, 1, 1) broadcast per pixel
            log["p_loss"] = p_loss.detach().mean()
        batch = inputs.shape[0]
        # Laplace (l1) / Gaussian (l2) NLL with one learned scale: rec / exp(s) + s, per image.
        nll_loss = (rec / torch.exp(self.logvar) + self.logvar).sum() / batch
        kl_loss = posterior.kl().sum() / batch
        disc_factor = self.disc_factor_at(global_step)
        if disc_factor > 0.0:
            g_loss = -self.discriminator(reconstructions.contiguous()).mean()
            d_weight = self.adaptive_weight(nll_loss, g_loss, last_layer)
        else:  # skip the discriminator entirely before disc_start
            g_loss = torch.zeros((), device=inputs.device)
            d_weight = torch.zeros((), device=inputs.device)
        loss = nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log.update(
            total_loss=loss.detach(),
            rec_loss=pixel.detach().mean(),
            nll_loss=nll_loss.detach(),
            kl_loss=kl_loss.detach(),
            g_loss=g_loss.detach(),
            d_weight=d_weight.detach(),
            disc_factor=torch.tensor(disc_factor, device=inputs.device),
            logvar=self.logvar.detach(),
        )
        return loss, log

    def discriminator_loss(
        self, inputs: Tensor, reconstructions: Tensor, global_step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """PatchGAN loss on real ``inputs`` and (detached) ``reconstructions``.

        Returns:
            ``(loss, log)``; the loss is ``disc_factor_at(global_step)`` times the hinge/vanilla
            loss, so it is 0 before ``disc_start`` (callers may skip the step then).
        """
        logits_real = self.discriminator(inputs.contiguous().detach())
        logits_fake = self.discriminator(reconstructions.contiguous().detach())
        disc_factor = self.disc_factor_at(global_step)
        d_loss = disc_factor * self.disc_loss_fn(logits_real, logits_fake)
        log = {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "disc_factor": torch.tensor(disc_factor, device=inputs.device),
        }
        return d_loss, log
