"""Self/cross attention (SDPA), GEGLU feed-forward and the U-Net's SpatialTransformer.

Names follow the original Stable Diffusion (CompVis ``attention.py``), which diffusers'
``Transformer2DModel`` shares, so the transformer keys are identical in both layouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.nn.resnet import normalization


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` to a context (itself when no context is given).

    ``softmax(QKᵀ/√d)V`` (Vaswani et al. 2017, Eq. 1) with ``Q = W_q x``, ``K = W_k c``,
    ``V = W_v c`` (Rombach et al. 2022, Eq. 3), computed by
    ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query_dim: Width of ``x``.
        context_dim: Width of the context; ``None`` for self-attention (context = ``x``).
        heads: Number of heads.
        dim_head: Width of each head.
        dropout: Dropout after the output projection.
        upcast: Compute the attention in float32 (avoids fp16 overflow, e.g. SD2 black images).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            x: Queries (B, N, query_dim).
            context: Keys/values source (B, L, context_dim); ``x`` when None.
            mask: Key mask (B, L) bool, True = attend. Each row needs at least one True.

        Returns:
            (B, N, query_dim).
        """
        context = x if context is None else context
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (B, H, N, D)
        m = context.shape[1]
        k = self.to_k(context).view(b, m, self.heads, -1).transpose(1, 2)  # (B, H, L, D)
        v = self.to_v(context).view(b, m, self.heads, -1).transpose(1, 2)  # (B, H, L, D)
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        if self.upcast and q.dtype != torch.float32:
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(
                    q.float(), k.float(), v.float(), attn_mask=attn_mask
                ).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU unit ``a ⊙ GELU(g)`` with ``[a, g] = W x + b`` (Shazeer 2020, Eq. 5).

    Args:
        dim_in: Input width.
        dim_out: Output width (the projection is ``2 * dim_out`` wide).
    """

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim_in) -> (..., dim_out)."""
        x, gate = self.proj(x).chunk(2, dim=-1)  # two (..., dim_out) views
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU to ``mult * dim``, dropout, linear back to ``dim``.

    Args:
        dim: Input and output width.
        mult: Hidden width multiplier.
        dropout: Dropout on the hidden activations.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU feed-forward.

    Args:
        dim: Token width.
        n_heads: Number of attention heads.
        d_head: Width of each head.
        dropout: Dropout in attention outputs and feed-forward.
        context_dim: Width of the cross-attention context (None: ``attn2`` attends to ``x``).
        use_checkpoint: Recompute activations in backward (gradient checkpointing).
        upcast_attention: Compute attention in float32.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_checkpoint: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout, upcast_attention)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, upcast_attention)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Tokens (B, N, dim).
            context: Cross-attention context (B, L, context_dim), or None (``attn2`` on ``x``).
            context_mask: (B, L) bool, True = attend; only with a context.

        Returns:
            Tokens (B, N, dim).
        """
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, context_mask, use_reentrant=False)
        return self._forward(x, context, context_mask)

    def _forward(
        self, x: torch.Tensor, context: torch.Tensor | None, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, context_mask) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned by cross-attention.

    GroupNorm, projection to ``n_heads * d_head`` tokens (1x1 conv as SD1, or linear as SD2),
    ``depth`` :class:`BasicTransformerBlock` s, projection back, residual connection
    (Rombach et al. 2022, Sec. 3.3).

    Args:
        in_channels: Channels of the feature map.
        n_heads: Number of attention heads.
        d_head: Width of each head.
        depth: Number of transformer blocks.
        dropout: Dropout inside the transformer blocks.
        context_dim: Width of the cross-attention context (None: no external context).
        use_linear: Linear ``proj_in``/``proj_out`` (SD2) instead of 1x1 convolutions (SD1).
        use_checkpoint: Gradient checkpointing in each transformer block.
        upcast_attention: Compute attention in float32.
        zero_init: Zero-initialise ``proj_out`` so the block starts as the identity (as SD).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | None = None,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        upcast_attention: bool = False,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = normalization(in_channels, eps=1e-6)
        self.proj_in: nn.Linear | nn.Conv2d
        self.proj_out: nn.Linear | nn.Conv2d
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        if zero_init:
            nn.init.zeros_(self.proj_out.weight)
            nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout, context_dim, use_checkpoint, upcast_attention
            )
            for _ in range(depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply the transformer.

        Args:
            x: Feature map (B, C, H, W).
            context: Cross-attention context (B, L, context_dim), or None.
            context_mask: (B, L) bool, True = attend.

        Returns:
            Feature map (B, C, H, W).
        """
        b, c, height, width = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)  # (B, HW, C)
        # A 1x1 conv on NCHW equals a linear map on (B, HW, C) tokens: apply it as one.
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context, context_mask)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        h = h.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        return x + h
