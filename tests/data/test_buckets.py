"""Aspect-ratio buckets: sizes, cover+crop with its metadata, the streaming batcher, and the
bucketed reader over 2 ranks x 2 workers (exactly once, one shape per batch, exact resume)."""

from __future__ import annotations

import io
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import ShardDataModule
from ldm.data.bucket_batcher import BucketBatcher
from ldm.data.buckets import (
    area_buckets,
    bucket_set,
    cover_crop_box,
    image_to_bucket,
    parse_aspect,
    size_for_aspect,
)
from ldm.data.counters import SkipSample
from ldm.data.reader import ShardDataset
from ldm.data.transforms import ImageSpec

BUCKETS = {"enabled": True, "resolutions": [32], "step": 8, "max_aspect": 2.0}


def png(h: int, w: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_area_buckets_are_multiples_within_area_and_aspect() -> None:
    sizes = area_buckets(1024, 64, 2.0)
    assert (1024, 1024) in sizes and (768, 1344) in sizes and (1344, 768) in sizes  # SDXL's
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0
        assert h * w <= 1024 * 1024 and max(h, w) / min(h, w) <= 2.0
    assert sizes == sorted(sizes, key=lambda s: s[0] / s[1])
    assert {(w, h) for h, w in sizes} == set(sizes)  # portrait and landscape alike


def test_bucket_config_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"max_aspect must be >= 1") as err:
        bucket_set({**BUCKETS, "max_aspect": 0.5})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"\[30, 48\] must be \[height, width\].*step=8"):
        bucket_set({**BUCKETS, "sizes": [[32, 48], [30, 48]]})
    assert bucket_set({**BUCKETS, "enabled": False}) is None
    explicit = bucket_set({**BUCKETS, "sizes": [[32, 48], [48, 32], [32, 48]]})
    assert explicit.sizes == [(32, 48), (48, 32)]


def test_assign_nearest_log_ratio_and_multi_resolution() -> None:
    buckets = bucket_set({**BUCKETS, "resolutions": [32, 64]})
    # 48 high x 32 wide: log ratio 0.405; nearest of the 64-area buckets it covers
    assert buckets.assign(96, 64) == (80, 48)
    # too small for any 64-area bucket without upscaling -> the 32 area
    assert buckets.assign(48, 32) == (40, 24)
    assert buckets.assign(32, 32) == (32, 32)
    # nearest by log ratio, not by linear ratio: 2:1 is nearer to 5:3 (40x24) than 1:1
    ratio = math.log(2)
    assert abs(ratio - math.log(40 / 24)) < abs(ratio - 0.0)
    assert buckets.assign(64, 32) == (40, 24)
    assert buckets.assign(12, 20) is None
    generous = bucket_set({**BUCKETS, "max_upscale": 3.0})
    assert generous.assign(12, 20) == (24, 40)


def test_cover_crop_metadata_and_pixels() -> None:
    buckets = bucket_set(BUCKETS)
    spec = ImageSpec(size=999)  # unused with buckets
    data = png(60, 36)  # portrait 60 high, 36 wide -> bucket 40x24, resized 40x24 exactly
    out = image_to_bucket(data, spec, buckets, random.Random(0))
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 40, 24)
    assert out["original_size"] == (60, 36) and out["target_size"] == (40, 24)
    assert out["crop_top_left"] == (0, 0)
    # 64 high x 44 wide -> bucket 40x24 (ratio 1.45 nearest 1.67): resized 40x28, centre crop
    data = png(64, 44, seed=1)
    out = image_to_bucket(data, spec, buckets, random.Random(0))
    assert out["target_size"] == (40, 24) and out["crop_top_left"] == (0, 2)
    # resizing just the window equals resize-then-crop
    full = (
        Image.open(io.BytesIO(data))
        .convert("RGB")
        .resize((28, 40), Image.Resampling.BICUBIC, reducing_gap=3.0)
    )
    expected = torch.from_numpy(np.asarray(full.crop((2, 0, 26, 40))).copy()).permute(2, 0, 1)
    assert (out["image"].int() - expected.int()).abs().float().mean() < 4.0
    # random crops are seeded and stay inside the resized image
    offsets = set()
    for seed in range(20):
        box, (top, left) = cover_crop_box(64, 44, (40, 24), True, random.Random(seed))
        assert top == 0 and 0 <= left <= 4
        assert box[2] <= 44 + 1e-9 and box[3] <= 64 + 1e-9
        offsets.add(left)
        assert cover_crop_box(64, 44, (40, 24), True, random.Random(seed))[1] == (top, left)
    assert len(offsets) > 2


def test_too_small_is_a_counted_skip() -> None:
    with pytest.raises(SkipSample) as err:
        image_to_bucket(png(12, 20), ImageSpec(), bucket_set(BUCKETS), random.Random(0))
    assert err.value.reason == "too_small" and "max_upscale" in err.value.detail


def fake(key: int, shape: tuple[int, int]) -> dict:
    return {"image": torch.zeros(3, *shape, dtype=torch.uint8), "key": key}


@pytest.mark.parametrize("cap", [4, 7, 100])
def test_batcher_one_shape_exactly_once_within_cap(cap: int) -> None:
    rng = random.Random(0)
    shapes = [(24, 40), (32, 32), (40, 24)]
    samples = [fake(i, rng.choice(shapes)) for i in range(101)]
    batcher = BucketBatcher(batch_size=4, max_buffered=cap)
    batches = list(batcher.batches(iter(samples)))
    keys = [s["key"] for b in batches for s in b]
    assert sorted(keys) == list(range(101))
    for batch in batches:
        assert len({tuple(s["image"].shape) for s in batch}) == 1 and 1 <= len(batch) <= 4
    assert batcher.peak <= cap
    if cap >= 3 * 3 + 1:  # (batch - 1) x buckets + 1: only the end of the pass is partial
        assert batcher.forced == 0 and sum(len(b) < 4 for b in batches) <= 3
        dropped = list(BucketBatcher(4, cap, drop_last=True).batches(iter(samples)))
        assert all(len(b) == 4 for b in dropped)
        assert len(dropped) == sum(len(b) == 4 for b in batches)
    if cap == 4:
        assert batcher.forced > 0


def test_batcher_resampled_sizes() -> None:
    shapes = [(24, 40), (40, 24)]
    samples = (fake(i, shapes[i % 3 == 0]) for i in range(10_000))
    batches = list(BucketBatcher(4, 7).batches(samples, iter([4, 4, 4, 2])))
    assert [len(b) for b in batches] == [4, 4, 4, 2]
    with pytest.raises(ValueError, match="max_buffered=3 is below the batch size 4"):
        BucketBatcher(4, 3)


def epoch(dataset: ShardDataset, workers: int, epoch_: int = 0) -> list[dict]:
    dataset.set_position(epoch_, 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    return list(loader)


def test_two_ranks_two_workers_see_every_sample_once(mixed_aspect_shards: str) -> None:
    seen: Counter[str] = Counter()
    shapes = set()
    skipped = Counter()
    for rank in range(2):
        ds = ShardDataset(
            mixed_aspect_shards,
            batch_size=4,
            rank=rank,
            world_size=2,
            shuffle_buffer=8,
            random_crop=True,
            hflip=True,
            seed=3,
            buckets=bucket_set({**BUCKETS, "max_buffered": 5}),
        )
        for batch in epoch(ds, workers=2):
            images = batch["image"]
            assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
            assert len(batch["key"]) == images.shape[0] <= 4
            shapes.add(tuple(images.shape[2:]))
            assert (batch["target_size"] == torch.tensor(images.shape[2:])).all()
            assert batch["original_size"].shape == batch["crop_top_left"].shape == (len(images), 2)
            seen.update(batch["key"])
        skipped.update(ds.counter.counts())
    expected = {f"s{i:03d}" for i in range(48) if i not in (7, 30)}
    assert set(seen) == expected and max(seen.values()) == 1
    assert shapes == {(24, 40), (32, 32), (40, 24)}
    assert skipped["too_small"] == 2 and skipped["ok"] == 46


def test_bucketed_resume_skips_exactly(mixed_aspect_shards: str) -> None:
    dm = ShardDataModule(
        [mixed_aspect_shards],
        batch_size=3,
        num_workers=2,
        shuffle_buffer=8,
        random_crop=True,
        seed=5,
        buckets={**BUCKETS},
    )
    dm.train_dataloader()  # binds rank/world
    full = list(dm.train_dataloader())
    resumed_loader = dm.train_dataloader()
    resumed_loader.position_fn = lambda: (0, 0, 4)  # resumed mid-epoch after 4 batches
    resumed = list(resumed_loader)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed, strict=True):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)
        assert torch.equal(a["crop_top_left"], b["crop_top_left"])


def test_aspect_sizes() -> None:
    assert parse_aspect("3:2") == 1.5 and parse_aspect("0.5") == 0.5
    with pytest.raises(ValueError, match="width:height"):
        parse_aspect("wide")
    assert size_for_aspect(1.5, 256 * 256, 64) == (192, 320)
    assert size_for_aspect(1.5, 0, 8, height=32) == (32, 48)
    assert size_for_aspect(2 / 3, 0, 8, width=32) == (48, 32)


def test_resampled_bucketed_epoch_has_the_fixed_batch_count(mixed_aspect_shards: str) -> None:
    ds = ShardDataset(
        mixed_aspect_shards,
        batch_size=4,
        resampled=True,
        epoch_samples=30,
        rank=0,
        world_size=2,
        shuffle_buffer=8,
        buckets=bucket_set(BUCKETS),
    )
    batches = epoch(ds, workers=2)
    assert len(batches) == len(ds) == 8
    assert [len(b["key"]) for b in batches] == [4] * 7 + [2]
    assert all((b["target_size"] == b["target_size"][0]).all() for b in batches)
