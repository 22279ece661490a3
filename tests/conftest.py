"""Shared test set-up: offline everything, seeded RNGs, `gpu` tests skipped without CUDA."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One intra-op thread per test process (and per subprocess a test starts, so that runs compared
# across processes use the same kernels): the suite runs as two pytest-xdist workers on two
# cores, and tiny models are slower with threads fighting over cores than on one core each.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny captioned-shapes shards at 32x32 (train/val/heldout), generated once per session."""
    from ldm.data.shapes import ShapesConfig, generate

    out = tmp_path_factory.mktemp("shapes")
    cfg = ShapesConfig(image_size=32, num_train=96, num_val=16, num_heldout=16,
                       samples_per_shard=48, seed=0, workers=1, supersample=2)
    meta = generate(cfg, str(out))
    return {split: info["shards"] for split, info in meta["splits"].items()}

