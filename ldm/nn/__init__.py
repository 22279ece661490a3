"""Neural-network building blocks: attention, timestep embeddings, U-Net residual blocks, the
CPU GEMM convolution."""

from __future__ import annotations

from ldm.nn.attention import (
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
)
from ldm.nn.conv import Conv2d
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.resnet import Downsample, GroupNorm32, ResBlock, Upsample, normalization

__all__ = [
    "GEGLU",
    "BasicTransformerBlock",
    "Conv2d",
    "CrossAttention",
    "Downsample",
    "FeedForward",
    "GroupNorm32",
    "ResBlock",
    "SpatialTransformer",
    "Upsample",
    "normalization",
    "timestep_embedding",
]
