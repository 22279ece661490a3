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
    cfg = ShapesConfig(
        image_size=32,
        num_train=96,
        num_val=16,
        num_heldout=16,
        samples_per_shard=48,
        seed=0,
        workers=1,
        supersample=2,
    )
    meta = generate(cfg, str(out))
    return {split: info["shards"] for split, info in meta["splits"].items()}


@pytest.fixture(scope="session")
def mixed_aspect_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """4 shards x 12 captioned photos-like images: portrait, landscape and square, JPEG and PNG,
    plus two too small for any 32-px-area bucket (keys ``small*``). Returns the brace pattern."""
    import io

    import numpy as np
    from PIL import Image

    from ldm.data.shard_writer import ShardWriter

    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    sizes = [(48, 32), (32, 48), (40, 40), (36, 60), (60, 36), (64, 44)]  # (height, width)
    with ShardWriter(str(root / "mixed-%06d.tar"), max_samples=12) as writer:
        for i in range(48):
            key = f"s{i:03d}"
            h, w = sizes[i % len(sizes)]
            if i in (7, 30):
                key, h, w = f"small{i:03d}", 12, 20
            yy, xx = np.mgrid[0:h, 0:w]
            pixels = np.stack([255 * yy // h, 255 * xx // w, rng.integers(0, 256, (h, w))], -1)
            buffer = io.BytesIO()
            fmt = "JPEG" if i % 2 else "PNG"
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt)
            orient = "tall" if h > w else "wide" if w > h else "square"
            writer.write(
                {
                    "__key__": key,
                    "jpg" if fmt == "JPEG" else "png": buffer.getvalue(),
                    "txt": f"a {orient} picture {i}",
                }
            )
    return str(root / "mixed-{000000..000003}.tar")
