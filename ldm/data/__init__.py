"""Data: webdataset shard reading/writing, transforms, caching, and the synthetic shapes set.

Nothing here imports ``ldm.models``; only :mod:`ldm.data.datamodule` imports Lightning, and it is
loaded lazily (``from ldm.data import ShardDataModule`` works; ``import ldm.data`` stays light).
The ``precompute`` and ``write_shards`` functions are not re-exported here because they would
shadow their modules of the same name: import them from ``ldm.data.precompute`` and
``ldm.data.write_shards``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ldm.data.cached import load_empty_prompt, sample_latents
from ldm.data.counters import REASONS, SkipCounter, SkipSample
from ldm.data.reader import ShardDataset
from ldm.data.shards import MissingShardError, assign_shards, check_shards_exist, expand_shards
from ldm.data.transforms import ImageSpec, image_to_tensor

__all__ = [
    "REASONS",
    "ImageSpec",
    "MissingShardError",
    "ShardDataModule",
    "ShardDataset",
    "ShardWriter",
    "SkipCounter",
    "SkipSample",
    "assign_shards",
    "check_shards_exist",
    "expand_shards",
    "image_to_tensor",
    "load_empty_prompt",
    "sample_latents",
]


# Loaded on first access: the DataModule pulls in Lightning, and importing write_shards here
# would make ``python -m ldm.data.write_shards`` warn about a module imported twice.
_LAZY = {"ShardDataModule": "ldm.data.datamodule", "ShardWriter": "ldm.data.write_shards"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm.data' has no attribute {name!r}")
