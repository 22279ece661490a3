"""U-Net residual blocks with timestep injection, and 2x down/upsampling.

Module and parameter names follow the original Stable Diffusion U-Net (CompVis ``openaimodel.py``)
so released weights load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.conv import Conv2d


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The U-Net's normalisation layer: 32-group GroupNorm.

    Args:
        channels: Number of channels; must be divisible by 32.
        eps: Variance epsilon (1e-5 in ResBlocks, 1e-6 in SpatialTransformer, as in SD).

    Returns:
        The GroupNorm module.
    """
    return GroupNorm32(32, channels, eps=eps)


class Downsample(nn.Module):
    """2x spatial downsampling: strided 3x3 conv (``op``) or 2x2 average pooling.

    Args:
        channels: Input channels.
        use_conv: Strided convolution if True, otherwise average pooling.
        out_channels: Output channels (defaults to ``channels``; must equal it without a conv).
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.op: nn.Module
        if use_conv:
            self.op = Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ValueError("Downsample without a conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Downsample (B, C, H, W) -> (B, C_out, H/2, W/2)."""
        return self.op(x)


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, optionally followed by a 3x3 conv (``conv``).

    Args:
        channels: Input channels.
        use_conv: Apply a 3x3 convolution after upsampling.
        out_channels: Output channels (defaults to ``channels``; must equal it without a conv).
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the channel count")
        self.conv = Conv2d(channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Upsample (B, C, H, W) -> (B, C_out, 2H, 2W), or to ``size`` (the skip connection's
        (H', W') when a side was odd before downsampling, as diffusers' ``upsample_size``)."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return x if self.conv is None else self.conv(x)


class ResBlock(nn.Module):
    """Residual block with timestep-embedding injection (Ho et al. 2020, Appendix B).

    ``h = conv(SiLU(GN(x)))``; then either ``h + W·SiLU(emb)`` or, with scale-shift norm
    (Dhariwal & Nichol 2021, Sec. 3, "AdaGN"), ``GN(h)·(1 + s) + b`` with ``(s, b) = W·SiLU(emb)``;
    then ``conv(dropout(SiLU(GN(h))))`` and a residual connection.

    Args:
        channels: Input channels.
        emb_channels: Width of the timestep embedding.
        dropout: Dropout probability before the second conv.
        out_channels: Output channels (defaults to ``channels``).
        use_conv: With a channel change, use a 3x3 conv (instead of 1x1) on the skip path.
        use_scale_shift_norm: Inject the embedding as a scale and shift of the second norm.
        up: Upsample 2x inside the block (``resblock_updown``).
        down: Downsample 2x inside the block (``resblock_updown``).
        use_checkpoint: Recompute activations in backward (gradient checkpointing).
        zero_init: Zero-initialise the last conv so the block starts as the identity (as SD).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if zero_init:
            nn.init.zeros_(self.out_layers[-1].weight)
            nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection: nn.Module
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel = 3 if use_conv else 1
            self.skip_connection = Conv2d(channels, out_channels, kernel, padding=kernel // 2)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Features (B, C, H, W).
            emb: Timestep embedding (B, emb_channels).
            size: Output (H', W') of an upsampling block (default: twice the input's).

        Returns:
            Features (B, out_channels, H', W').
        """
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, size, use_reentrant=False)
        return self._forward(x, emb, size)

    def _forward(
        self, x: torch.Tensor, emb: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            up = isinstance(self.h_upd, Upsample)
            h = self.h_upd(h, size) if up else self.h_upd(h)
            x = self.x_upd(x, size) if up else self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, C', 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h
