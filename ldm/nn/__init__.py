"""Neural-network building blocks: attention, timestep embeddings, U-Net residual blocks."""

from __future__ import annotations

from ldm.nn.attention import (
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
)
from ldm.nn.embeddings import timestep_embedding
from ldm.nn.resnet import Downsample, GroupNorm32, ResBlock, Upsample, normalization

__all__ = [
    "GEGLU",
    "BasicTransformerBlock",
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
