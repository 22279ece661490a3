"""Shard specs, missing-shard errors, and exact splitting over ranks and DataLoader workers."""

from __future__ import annotations

import collections
import io
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.reader import ShardDataset
from ldm.data.shard_writer import ShardWriter
from ldm.data.shards import (
    MissingShardError,
    assign_shards,
    check_shards_exist,
    expand_shards,
    local_path,
    make_seed,
)

NUM_SHARDS = 7
PER_SHARD = 5


@pytest.fixture(scope="module")
def shard_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """7 shards x 5 tiny PNG samples; keys say which shard they come from."""
    root = tmp_path_factory.mktemp("split")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    png = buffer.getvalue()
    with ShardWriter(str(root / "part-%06d.tar"), max_samples=PER_SHARD) as writer:
        for i in range(NUM_SHARDS * PER_SHARD):
            writer.write({"__key__": f"x{i:04d}", "png": png, "txt": f"sample {i}"})
    return str(root / "part-{000000..000006}.tar")


def epoch_keys(spec: str, epoch: int, world: int, workers: int, **kw) -> list[list[str]]:
    """Keys each rank sees in one epoch, using real DataLoader workers."""
    per_rank = []
    for rank in range(world):
        ds = ShardDataset(spec, batch_size=2, image_size=8, rank=rank, world_size=world, **kw)
        ds.set_position(epoch)
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        per_rank.append([k for batch in loader for k in batch["key"]])
    return per_rank


def test_expand_and_local_paths(tmp_path: Path) -> None:
    assert expand_shards("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_shards(["x.tar", "y-{1..2}.tar"]) == ["x.tar", "y-1.tar", "y-2.tar"]
    assert expand_shards("a.tar::b.tar") == ["a.tar", "b.tar"]
    assert local_path("file:///d/a.tar") == "/d/a.tar"
    assert local_path("pipe:cat a.tar") is None
    assert local_path("s3://bucket/a.tar") is None


def test_missing_shard_is_a_one_line_error(shard_spec: str) -> None:
    bad = shard_spec.replace("000006}", "000009}")
    with pytest.raises(MissingShardError) as info:
        ShardDataset(bad, batch_size=2)
    message = str(info.value)
    assert "\n" not in message
    assert "part-000007.tar" in message and "7 of 10" in message and "3 missing" in message
    # remote URLs are not checked up front
    assert check_shards_exist(["pipe:cat nothing.tar"]) == ["pipe:cat nothing.tar"]


def test_assign_shards_partitions_exactly() -> None:
    urls = [f"u{i}" for i in range(23)]
    for epoch in range(3):
        parts = [
            assign_shards(
                urls,
                epoch=epoch,
                seed=5,
                shuffle=True,
                rank=r,
                world_size=3,
                worker=w,
                num_workers=4,
            )
            for r in range(3)
            for w in range(4)
        ]
        flat = [u for p in parts for u in p]
        assert sorted(flat) == sorted(urls)
    orders = [
        assign_shards(
            urls, epoch=e, seed=5, shuffle=True, rank=0, world_size=1, worker=0, num_workers=1
        )
        for e in range(2)
    ]
    assert orders[0] != orders[1]  # epoch-dependent shuffle
    assert make_seed(1, 2, 3) == make_seed(1, 2, 3) != make_seed(1, 2, 4)


def test_two_ranks_two_workers_see_every_sample_once(shard_spec: str) -> None:
    all_keys = {f"x{i:04d}" for i in range(NUM_SHARDS * PER_SHARD)}
    firsts = []
    for epoch in range(2):
        per_rank = epoch_keys(shard_spec, epoch, world=2, workers=2, shuffle_buffer=4)
        flat = [k for keys in per_rank for k in keys]
        assert len(flat) == len(all_keys) and set(flat) == all_keys
        assert not set(per_rank[0]) & set(per_rank[1])
        firsts.append(per_rank[0])
    assert firsts[0] != firsts[1]  # a new epoch reshuffles


def test_same_epoch_is_reproducible(shard_spec: str) -> None:
    a = epoch_keys(shard_spec, 3, world=1, workers=2, shuffle_buffer=6, random_crop=True)
    b = epoch_keys(shard_spec, 3, world=1, workers=2, shuffle_buffer=6, random_crop=True)
    assert a == b


@pytest.mark.parametrize("drop_last", [False, True])
def test_resampled_yields_epoch_samples_per_rank(shard_spec: str, drop_last: bool) -> None:
    kw = dict(resampled=True, epoch_samples=11, shuffle_buffer=3, drop_last=drop_last)
    per_rank = epoch_keys(shard_spec, 0, world=2, workers=2, **kw)
    expected = 10 if drop_last else 11  # batch_size 2
    assert [len(keys) for keys in per_rank] == [expected, expected]
    ds = ShardDataset(shard_spec, batch_size=2, **kw)
    assert len(ds) == (5 if drop_last else 6)
    # resampling draws with replacement: over many samples, all shards show up
    many = epoch_keys(
        shard_spec, 0, world=1, workers=0, resampled=True, epoch_samples=200, shuffle_buffer=8
    )
    shards = collections.Counter(int(k[1:]) // PER_SHARD for k in many[0])
    assert set(shards) == set(range(NUM_SHARDS))


def test_resampled_depends_on_step_and_rank(shard_spec: str) -> None:
    def keys(rank: int, step: int) -> list[str]:
        ds = ShardDataset(
            shard_spec,
            batch_size=4,
            image_size=8,
            shuffle_buffer=2,
            resampled=True,
            epoch_samples=8,
            rank=rank,
            world_size=2,
        )
        ds.set_position(0, step)
        return [k for b in ds for k in b["key"]]

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(1, 0)
    assert keys(0, 0) != keys(0, 100)


def test_epoch_samples_needs_resampled(shard_spec: str) -> None:
    with pytest.raises(ValueError, match="resampled"):
        ShardDataset(shard_spec, epoch_samples=10)
    with pytest.raises(TypeError):
        len(ShardDataset(shard_spec))
