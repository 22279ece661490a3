"""The cross-attention U-Net of latent diffusion (Rombach et al. 2022, Sec. 3.3).

A plain ``nn.Module`` whose module and parameter names follow the original Stable Diffusion
U-Net (CompVis ``openaimodel.UNetModel``): ``time_embed``, ``label_emb``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``. An original SD state dict (after stripping
``model.diffusion_model.``) loads with ``strict=True``; diffusers weights go through
:mod:`ldm.checkpoint.unet_keys`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.nn.attention import SpatialTransformer
from ldm.nn.conv import Conv2d
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.resnet import Downsample, ResBlock, Upsample, normalization
from ldm.nn.wrappers import unwrap


class TimestepEmbedSequential(nn.Sequential):
    """Sequential container that hands the timestep embedding to ResBlocks and the context to
    SpatialTransformers (also when FSDP or a checkpoint wrapper wraps them)."""

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Apply the layers in order to ``x`` (B, C, H, W); an upsampler's output is ``size``
        (H', W') when given."""
        for layer in self:
            kind = unwrap(layer)
            if isinstance(kind, ResBlock):
                x = layer(x, emb, size) if kind.updown else layer(x, emb)
            elif isinstance(kind, SpatialTransformer):
                x = layer(x, context, context_mask)
            elif isinstance(kind, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Cross-attention U-Net ε/v/x0-predictor (the parameterisation lives outside).

    Args:
        in_channels: Latent channels in.
        out_channels: Channels out.
        model_channels: Base width; level ``i`` has ``model_channels * channel_mult[i]`` channels.
        channel_mult: Width multiplier per resolution level.
        num_res_blocks: ResBlocks per level in the encoder (the decoder has one more).
        attention_resolutions: Downsampling factors (1, 2, 4, …) at which SpatialTransformers
            follow the ResBlocks.
        num_heads: Attention heads, used when ``num_head_channels == -1``.
        num_head_channels: Channels per head (heads = channels // this); -1 to use ``num_heads``.
        transformer_depth: Transformer blocks per SpatialTransformer, one value or one per level
            (the middle block uses the last level's).
        context_dim: Width of the text context; None for no cross-attention (``attn2`` then
            attends to the image tokens, as the original).
        use_linear_in_transformer: Linear ``proj_in``/``proj_out`` (SD2) instead of 1x1 convs.
        use_scale_shift_norm: Timestep injection as GroupNorm scale/shift in ResBlocks.
        resblock_updown: Down/upsample with ResBlocks instead of plain (conv) resampling.
        dropout: Dropout in ResBlocks.
        num_classes: Number of classes for class conditioning (``label_emb`` embedding of ``y``).
        adm_in_channels: Width of a vector condition ``y`` (``label_emb`` MLP, as SD's
            ``num_classes: sequential``). Mutually exclusive with ``num_classes``.
        use_checkpoint: Gradient checkpointing in ResBlocks and transformer blocks.
        upcast_attention: Compute attention in float32.
        conv_resample: Use 3x3 convs in Downsample/Upsample (else pooling / plain nearest).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (4, 2, 1),
        num_heads: int = 8,
        num_head_channels: int = -1,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | None = 768,
        use_linear_in_transformer: bool = False,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        dropout: float = 0.0,
        num_classes: int | None = None,
        adm_in_channels: int | None = None,
        use_checkpoint: bool = False,
        upcast_attention: bool = False,
        conv_resample: bool = True,
    ) -> None:
        super().__init__()
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if num_classes is not None and adm_in_channels is not None:
            raise ValueError("num_classes and adm_in_channels are mutually exclusive")
        levels = len(channel_mult)
        depths = (
            [transformer_depth] * levels
            if isinstance(transformer_depth, int)
            else list(transformer_depth)
        )
        if len(depths) != levels:
            raise ValueError(f"transformer_depth needs {levels} values, got {len(depths)}")
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.adm_in_channels = adm_in_channels
        time_embed_dim = model_channels * 4

        def res_block(ch: int, out_ch: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch, time_embed_dim, dropout, out_ch, use_scale_shift_norm=use_scale_shift_norm,
                up=up, down=down, use_checkpoint=use_checkpoint,
            )  # fmt: skip

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            return SpatialTransformer(
                ch, heads, ch // heads, depth, context_dim=context_dim,
                use_linear=use_linear_in_transformer, use_checkpoint=use_checkpoint,
                upcast_attention=upcast_attention,
            )  # fmt: skip

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        self.label_emb: nn.Module | None = None
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif adm_in_channels is not None:
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != levels - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else None
                self.input_blocks.append(
                    TimestepEmbedSequential(down or Downsample(ch, conv_resample))
                )
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), transformer(ch, depths[-1]), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res_block(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, depths[level]))
                if level and i == num_res_blocks:
                    up = res_block(ch, ch, up=True) if resblock_updown else None
                    layers.append(up or Upsample(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), Conv2d(model_channels, out_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Turn gradient checkpointing of ResBlocks and transformer blocks on or off."""
        for module in self.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enabled

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from noisy latents.

        Args:
            x: Noisy latents (B, in_channels, H, W), any H and W: a side that is not divisible
                by 2^(levels-1) is rounded up by each strided downsampling and each upsampler
                returns its skip connection's size (diffusers' ``upsample_size``).
            timesteps: (B,) float or integer timesteps (fractional allowed), or a scalar.
            context: Text context (B, L, context_dim), or None.
            y: Class labels (B,) long with ``num_classes``, or vectors (B, adm_in_channels).
            context_mask: (B, L) bool, True = keep the token (each row needs one); None keeps all.

        Returns:
            (B, out_channels, H, W).
        """
        if (y is not None) != (self.label_emb is not None):
            raise ValueError("y must be given if and only if the model is class/vector conditional")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.model_channels).to(x.dtype)  # (B, C)
        emb = self.time_embed(t_emb)  # (B, 4C)
        if self.label_emb is not None:
            emb = emb + self.label_emb(y).to(emb.dtype)

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context, context_mask)
            skips.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            size = tuple(skips[-1].shape[-2:]) if skips else None  # the next skip's (H, W)
            h = block(h, emb, context, context_mask, size)
        return self.out(h)
