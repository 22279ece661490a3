"""Attention blocks: SDPA attention against the textbook formula, masks, upcasting, GEGLU,
SpatialTransformer's conv/linear projections."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ldm.nn.attention import GEGLU, CrossAttention, SpatialTransformer


def reference_attention(
    attn: CrossAttention, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(QKᵀ/√d)V per head, written out (Vaswani et al. 2017, Eq. 1)."""
    b, n, _ = x.shape
    h = attn.heads
    q = attn.to_q(x).reshape(b, n, h, -1).permute(0, 2, 1, 3)  # (B, H, N, D)
    k = attn.to_k(context).reshape(b, context.shape[1], h, -1).permute(0, 2, 1, 3)
    v = attn.to_v(context).reshape(b, context.shape[1], h, -1).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, L)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, n, -1)  # (B, N, H*D)
    return attn.to_out(out)


def test_cross_attention_matches_formula() -> None:
    attn = CrossAttention(16, context_dim=12, heads=4, dim_head=8)
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, False, True, False], [True] * 5])
    with torch.no_grad():
        assert torch.allclose(attn(x, ctx), reference_attention(attn, x, ctx), atol=1e-6)
        assert torch.allclose(
            attn(x, ctx, mask), reference_attention(attn, x, ctx, mask), atol=1e-6
        )
        # no context: self-attention
        self_attn = CrossAttention(16, heads=2, dim_head=8)
        assert torch.allclose(self_attn(x), reference_attention(self_attn, x, x), atol=1e-6)


def test_upcast_attention_runs_in_float32() -> None:
    attn = CrossAttention(16, context_dim=12, heads=2, dim_head=8, upcast=True)
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 5, 12)
    with torch.no_grad():
        expected = attn(x, ctx)
        out = attn.to(torch.bfloat16)(x.bfloat16(), ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=5e-2)


def test_geglu() -> None:
    geglu = GEGLU(8, 6)
    x = torch.randn(3, 8)
    a, gate = geglu.proj(x).split(6, dim=-1)
    with torch.no_grad():
        assert torch.allclose(geglu(x), a * F.gelu(gate))
        assert geglu(x).shape == (3, 6)


@pytest.mark.parametrize("use_linear", [False, True])
def test_spatial_transformer_starts_as_identity(use_linear: bool) -> None:
    block = SpatialTransformer(32, n_heads=2, d_head=16, context_dim=8, use_linear=use_linear)
    x = torch.randn(2, 32, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 3, 8)), x)


def test_spatial_transformer_conv_and_linear_projections_agree() -> None:
    conv = SpatialTransformer(32, n_heads=2, d_head=16, depth=2, context_dim=8, zero_init=False)
    linear = SpatialTransformer(32, 2, 16, depth=2, context_dim=8, use_linear=True)
    state = {k: v.flatten(1) if k.startswith("proj_") and v.ndim == 4 else v
             for k, v in conv.state_dict().items()}  # fmt: skip
    linear.load_state_dict(state, strict=True)
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 3, 8)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    with torch.no_grad():
        expected = F.conv2d(conv.norm(x), conv.proj_in.weight, conv.proj_in.bias)  # (B, C, H, W)
        tokens = expected.flatten(2).transpose(1, 2)  # (B, HW, C)
        for blk in conv.transformer_blocks:
            tokens = blk(tokens, ctx, mask)
        tokens = tokens.transpose(1, 2).reshape(2, 32, 4, 6)  # (B, C, H, W)
        expected = x + F.conv2d(tokens, conv.proj_out.weight, conv.proj_out.bias)
        assert torch.allclose(conv(x, ctx, mask), expected, atol=1e-5)
        assert torch.allclose(linear(x, ctx, mask), expected, atol=1e-5)
