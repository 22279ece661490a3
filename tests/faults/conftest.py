"""Fault-injection fixtures: one 24-sample shard (six batches of four per epoch)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def six_batch_shard(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One train shard of 24 captioned 32 px shapes."""
    from ldm.data.shapes import ShapesConfig, generate

    out = tmp_path_factory.mktemp("faults-shapes")
    cfg = ShapesConfig(
        image_size=32,
        num_train=24,
        num_val=4,
        num_heldout=4,
        samples_per_shard=24,
        seed=0,
        workers=1,
        supersample=1,
    )
    return generate(cfg, str(out))["splits"]["train"]["shards"]
