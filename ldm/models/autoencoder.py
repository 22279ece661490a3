"""KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models", Sec. 3.1 and App. G).

Module and parameter names follow the original Stable Diffusion autoencoder
(``encoder.down.N.block.M``, ``encoder.mid.attn_1``, ``decoder.up.N`` with ``up.0`` the highest
resolution, ...), so a released SD VAE state dict loads with ``strict=True`` once the
``first_stage_model.`` prefix is stripped (see :mod:`ldm.checkpoint.vae_keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.distributions import DiagonalGaussian

__all__ = ["AttnBlock", "AutoencoderKL", "Decoder", "DiagonalGaussian", "Encoder", "ResnetBlock"]


def _normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as ``Normalize`` in the original autoencoder."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block ``x + conv2(drop(silu(norm2(conv1(silu(norm1(x)))))))``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels; a 1x1 ``nin_shortcut`` is added when they differ.
        dropout: Dropout probability before ``conv2``.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``x`` of shape (B, C_in, H, W); returns (B, C_out, H, W)."""
        # In-place SiLU on fresh GroupNorm outputs (GroupNorm's backward needs only its input).
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections (``norm, q, k, v, proj_out``).

    Args:
        channels: Channels of the feature map (also the head dimension).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the H*W positions of ``x`` (B, C, H, W); returns the same shape."""
        b, c, h, w = x.shape
        hn = self.norm(x.reshape(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        # The 1x1 convs applied as linears on (B, HW, C): same maths, one layout change.
        q = _conv1x1_as_linear(self.q, hn)[:, None]  # (B, 1, HW, C)
        k = _conv1x1_as_linear(self.k, hn)[:, None]  # (B, 1, HW, C)
        v = _conv1x1_as_linear(self.v, hn)[:, None]  # (B, 1, HW, C)
        # softmax(q k^T / sqrt(C)) v (Vaswani et al. 2017, eq. 1)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        out = _conv1x1_as_linear(self.proj_out, out)  # (B, HW, C)
        # Operand order as in diffusers (the result keeps the projection's channels-last
        # strides), so the two implementations agree to the last bit.
        return out.transpose(1, 2).reshape(b, c, h, w) + x  # (B, C, H, W)


def _conv1x1_as_linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Apply a 1x1 ``conv`` to channels-last tokens ``x`` (B, N, C_in) -> (B, N, C_out)."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)  # weight (C_out, C_in, 1, 1) -> 2-D


class Downsample(nn.Module):
    """Halve H and W: asymmetric zero pad (0, 1, 0, 1) then a stride-2 3x3 conv, as in SD."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H/2, W/2)."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour interpolation then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(
    channels_in: int, channels_out: int, num_blocks: int, use_attn: bool, dropout: float
) -> nn.Module:
    """One resolution level: ``block`` (ResnetBlocks) and ``attn`` (AttnBlocks, maybe empty)."""
    level = nn.Module()
    level.block = nn.ModuleList(
        ResnetBlock(channels_in if i == 0 else channels_out, channels_out, dropout)
        for i in range(num_blocks)
    )
    level.attn = nn.ModuleList(
        AttnBlock(channels_out) for _ in range(num_blocks if use_attn else 0)
    )
    return level


def _mid(channels: int, dropout: float, mid_attention: bool) -> nn.Module:
    """The middle block: ``block_1``, ``attn_1`` (or identity), ``block_2``."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels) if mid_attention else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    """ResnetBlocks of a level, each followed by its AttnBlock when the level has attention."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


def _maybe_checkpoint(
    fn: Callable[[nn.Module, Tensor], Tensor], enabled: bool, module: nn.Module, h: Tensor
) -> Tensor:
    """``fn(module, h)``, recomputed in backward when ``enabled`` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, module, h, use_reentrant=False)
    return fn(module, h)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels, H/f, W/f), f = 2**(levels-1).

    Args:
        in_channels: Image channels.
        ch: Base channel count (multiplied by ``ch_mult`` per level).
        ch_mult: Channel multiplier per resolution level.
        num_res_blocks: ResnetBlocks per level.
        attn_resolutions: Feature-map sizes (relative to ``resolution``) that get attention.
        z_channels: Latent channels; the output has twice as many (mean and log-variance).
        resolution: Nominal input size, used only to place ``attn_resolutions``.
        dropout: Dropout probability in the ResnetBlocks.
        mid_attention: Whether the middle block has ``attn_1``.
        use_checkpoint: Recompute each level in the backward pass to save memory.
    """

    def __init__(
        self,
        in_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in, curr_res = ch, resolution
        for i_level, mult in enumerate(ch_mult):
            down = _level(
                block_in, ch * mult, num_res_blocks, curr_res in attn_resolutions, dropout
            )
            block_in = ch * mult
            if i_level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)
        self.mid = _mid(block_in, dropout, mid_attention)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode ``x`` (B, C, H, W) into Gaussian moments (B, 2*z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for down in self.down:
            h = _maybe_checkpoint(_run_level, self.use_checkpoint, down, h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = _maybe_checkpoint(_run_mid, self.use_checkpoint, self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f).

    ``up`` is indexed like the encoder's ``down``: ``up.0`` is the highest resolution and runs
    last. Each level has ``num_res_blocks + 1`` ResnetBlocks. Arguments as in :class:`Encoder`.
    """

    def __init__(
        self,
        out_channels: int,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        dropout: float = 0.0,
        mid_attention: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (num_levels - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout, mid_attention)
        up_levels: list[nn.Module] = []
        for i_level in reversed(range(num_levels)):
            block_out = ch * ch_mult[i_level]
            use_attn = curr_res in attn_resolutions
            up = _level(block_in, block_out, num_res_blocks + 1, use_attn, dropout)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            up_levels.insert(0, up)  # up.0 is the highest resolution, as in SD
        self.up = nn.ModuleList(up_levels)
        self.norm_out = _normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Decode ``z`` (B, z_channels, h, w) into an image (B, out_channels, h*f, w*f)."""
        h = self.conv_in(z)
        h = _maybe_checkpoint(_run_mid, self.use_checkpoint, self.mid, h)
        for up in reversed(self.up):
            h = _maybe_checkpoint(_run_level, self.use_checkpoint, up, h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encoder -> quant_conv -> N(mean, var) -> post_quant_conv -> decoder``.

    Args:
        in_channels: Image channels.
        out_channels: Reconstruction channels.
        ch: Base channel count; every level's channels must be divisible by 32 (GroupNorm).
        ch_mult: Channel multiplier per level; ``len(ch_mult) - 1`` downsamplings.
        num_res_blocks: ResnetBlocks per encoder level (decoder levels have one more).
        attn_resolutions: Feature-map sizes at which the levels get self-attention.
        z_channels: Channels of the encoder output / decoder input.
        embed_dim: Latent channels after ``quant_conv`` (the diffusion model's channels).
        resolution: Nominal image size; only places ``attn_resolutions``.
        dropout: Dropout probability in the ResnetBlocks.
        mid_attention: Whether encoder and decoder middle blocks have self-attention.
        scale_factor: Latent scale used by :meth:`encode_latents` / :meth:`decode_latents`; a
            persistent buffer saved with the weights (set it from data with
            :meth:`update_scale_factor`).
        use_checkpoint: Gradient checkpointing of each level (saves activation memory).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (),
        z_channels: int = 4,
        embed_dim: int = 4,
        resolution: int = 256,
        dropout: float = 0.0,
        mid_attention: bool = True,
        scale_factor: float = 1.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        common = dict(
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions,
            z_channels=z_channels,
            resolution=resolution,
            dropout=dropout,
            mid_attention=mid_attention,
            use_checkpoint=use_checkpoint,
        )
        self.encoder = Encoder(in_channels=in_channels, **common)
        self.decoder = Decoder(out_channels=out_channels, **common)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.ch_mult = ch_mult
        self.scale_factor: Tensor
        self.register_buffer("scale_factor", torch.tensor(float(scale_factor)), persistent=True)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction factor ``f = 2**(len(ch_mult) - 1)``."""
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Posterior q(z | x) for images ``x`` (B, C, H, W) in [-1, 1]."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2*E, H/f, W/f)

    def decode(self, z: Tensor) -> Tensor:
        """Image (B, out_channels, h*f, w*f) from unscaled latents ``z`` (B, embed_dim, h, w)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruct ``x`` from a posterior sample (or its mode).

        Args:
            x: Images (B, C, H, W) in [-1, 1].
            sample_posterior: Decode ``z ~ q(z|x)`` if True, else the posterior mean.
            generator: Optional RNG for the posterior sample.

        Returns:
            ``(reconstruction, posterior)``.
        """
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> Tensor:
        """Weight of the decoder's last conv, for the adaptive GAN weight (Esser et al. 2021)."""
        return self.decoder.conv_out.weight

    def encode_latents(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> Tensor:
        """Scaled latents ``scale_factor * z`` for the diffusion model (z sampled or the mode)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor.to(z.dtype)

    def decode_latents(self, z_scaled: Tensor) -> Tensor:
        """Images from scaled latents (the inverse scaling of :meth:`encode_latents`)."""
        return self.decode(z_scaled / self.scale_factor.to(z_scaled.dtype))

    @torch.no_grad()
    def update_scale_factor(self, x: Tensor, generator: torch.Generator | None = None) -> float:
        """Set ``scale_factor = 1 / std(z)`` over posterior samples of ``x`` and return it.

        This is SD's ``scale_by_std``: unit-variance latents for the diffusion model.
        """
        z = self.encode(x).sample(generator)
        value = 1.0 / z.float().flatten().std()
        self.scale_factor.copy_(value)
        return float(value)
