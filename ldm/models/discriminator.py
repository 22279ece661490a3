"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional
Adversarial Networks", Sec. 3.2.2), as ``NLayerDiscriminator`` in pix2pix / taming-transformers.

Parameter names (``main.N``) match taming's, so its discriminator weights load unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["NLayerDiscriminator", "hinge_d_loss", "vanilla_d_loss"]


class NLayerDiscriminator(nn.Module):
    """Fully-convolutional discriminator giving one real/fake logit per image patch.

    ``n_layers`` stride-2 4x4 convs (channels ``ndf * min(2**n, 8)``), one stride-1 conv, and a
    final 1-channel conv; BatchNorm and LeakyReLU(0.2) between them. Weights are initialised as
    in pix2pix (conv N(0, 0.02); BatchNorm scale N(1, 0.02), bias 0).

    Args:
        in_channels: Image channels.
        ndf: Channels of the first conv.
        n_layers: Number of stride-2 convs (the receptive field grows with it).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(
                    ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False
                ),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits (B, 1, H', W') for images ``x`` (B, C, H, W)."""
        return self.main(x)


def _pix2pix_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Hinge discriminator loss (Lim & Ye 2017, "Geometric GAN"):
    ``0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))])``.
    """
    return 0.5 * ((1.0 - logits_real).relu().mean() + (1.0 + logits_fake).relu().mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Original GAN discriminator loss (Goodfellow et al. 2014, eq. 1) on logits:
    ``0.5 * (E[softplus(-D(x))] + E[softplus(D(x_hat))])``.
    """
    return 0.5 * (
        nn.functional.softplus(-logits_real).mean() + nn.functional.softplus(logits_fake).mean()
    )
