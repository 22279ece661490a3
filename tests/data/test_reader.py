"""Reading shards: bad input counted per reason, interop with webdataset, transforms."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.reader import ShardDataset, extract_caption, parse_caption_key
from ldm.data.shard_writer import ShardWriter
from ldm.data.tarstream import iter_tar_samples
from ldm.data.transforms import ImageSpec, crop_box, image_to_tensor


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    """A small random JPEG (width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def drain(dataset: ShardDataset, num_workers: int = 0) -> list[dict]:
    """All batches of one pass."""
    return list(DataLoader(dataset, batch_size=None, num_workers=num_workers))


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], set[str]]:
    """Shard 0: good samples mixed with bad ones; shard 1: a tar truncated mid-member."""
    root = tmp_path_factory.mktemp("bad")
    good = set()
    with ShardWriter(str(root / "bad-%06d.tar"), max_samples=None) as writer:
        for i in range(12):
            key = f"s{i:03d}"
            sample = {"__key__": key, "jpg": jpeg_bytes(i), "txt": f"caption {i}"}
            if i == 2:
                sample["jpg"] = b"definitely not a jpeg"
            elif i == 4:
                del sample["txt"]
            elif i == 6:
                sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
            elif i == 8:
                sample["jpg"] = b""
            elif i == 10:
                sample["txt"] = "   "
            else:
                good.add(key)
            writer.write(sample)
    full = root / "full.tar"
    with ShardWriter(str(full).replace("%", "%%"), max_samples=None) as writer:
        for i in range(4):
            writer.write({"__key__": f"t{i:03d}", "jpg": jpeg_bytes(100 + i), "txt": f"t {i}"})
    with tarfile.open(full) as tar:
        cut_member = next(m for m in tar.getmembers() if m.name == "t002.jpg")
    cut = cut_member.offset_data + cut_member.size // 2
    (root / "bad-000001.tar").write_bytes(full.read_bytes()[:cut])
    good |= {"t000", "t001"}
    return [str(root / "bad-{000000..000001}.tar")], good


EXPECTED_SKIPS = {
    "corrupt_image": 1,
    "missing_caption": 2,
    "truncated_image": 1,
    "empty_member": 1,
    "truncated_tar": 1,
}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(bad_shards, num_workers: int) -> None:
    shards, good = bad_shards
    ds = ShardDataset(shards, batch_size=3, image_size=16, shuffle_buffer=10, num_slots=3)
    batches = drain(ds, num_workers)
    assert sorted(keys_of(batches)) == sorted(good)
    counts = ds.counter.counts()
    assert {k: v for k, v in counts.items() if v and k != "ok"} == EXPECTED_SKIPS
    assert counts["ok"] == len(good)
    for batch in batches:
        assert batch["image"].dtype == torch.float32
        assert batch["image"].shape[1:] == (3, 16, 16)
        assert len(batch["caption"]) == len(batch["key"]) == batch["image"].shape[0]


def test_counters_accumulate_across_epochs_and_log(bad_shards, caplog) -> None:
    shards, good = bad_shards
    ds = ShardDataset(shards, batch_size=4, image_size=16, num_slots=3)
    drain(ds, 2)  # counted in worker processes
    ds.set_position(epoch=1)
    with caplog.at_level("WARNING", logger="ldm.data"):  # workers' logs don't reach caplog
        drain(ds, 0)
    assert ds.counter.counts()["corrupt_image"] == 2
    assert ds.counter.counts()["ok"] == 2 * len(good)
    messages = [r.getMessage() for r in caplog.records]
    assert any("corrupt_image" in m and "s002" in m for m in messages)  # first few, detailed
    assert any(": skipped 6 (delivered" in m for m in messages)  # the per-pass summary


def test_header_truncation_and_garbage_tar(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    with ShardWriter(str(good).replace("%", "%%"), max_samples=None) as writer:
        for i in range(3):
            writer.write({"__key__": f"k{i}", "jpg": jpeg_bytes(i), "txt": "x"})
    raw = good.read_bytes()
    with tarfile.open(good) as tar:
        offset = next(m for m in tar.getmembers() if m.name == "k2.jpg").offset
    (tmp_path / "cut.tar").write_bytes(raw[: offset + 100])  # cut inside a header
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 40)
    ds = ShardDataset([str(tmp_path / "cut.tar"), str(tmp_path / "junk.tar")], batch_size=8)
    from ldm.data.counters import SkipCounter

    counter = SkipCounter(num_slots=1)
    keys = [s["__key__"] for url in ds.urls for s in iter_tar_samples(url, counter)]
    assert keys == ["k0", "k1"]
    assert counter.counts()["truncated_tar"] == 1
    assert counter.counts()["bad_tar"] == 1


def test_reads_webdataset_shardwriter_output_gz_and_pipe(tmp_path: Path) -> None:
    pattern = str(tmp_path / "ref-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=5, verbose=0) as sink:
        for i in range(12):
            sink.write(
                {"__key__": f"r{i:03d}", "jpg": jpeg_bytes(i), "json": {"caption": f"ref {i}"}}
            )
    spec = str(tmp_path / "ref-{000000..000002}.tar")
    ds = ShardDataset(spec, batch_size=4, image_size=8, caption_key="json:caption")
    batches = drain(ds)
    assert sorted(keys_of(batches)) == [f"r{i:03d}" for i in range(12)]
    captions = {k: c for b in batches for k, c in zip(b["key"], b["caption"], strict=True)}
    assert captions["r007"] == "ref 7"
    # gzip-compressed shard and a pipe: URL
    gz = tmp_path / "ref.tar.gz"
    gz.write_bytes(gzip.compress((tmp_path / "ref-000000.tar").read_bytes()))
    ds = ShardDataset(
        [str(gz), f"pipe:cat {tmp_path / 'ref-000001.tar'}"], batch_size=4, caption_key="json"
    )
    assert sorted(keys_of(drain(ds))) == [f"r{i:03d}" for i in range(10)]


def test_caption_keys() -> None:
    raw = {"__key__": "k", "txt": b" hi ", "json": json.dumps({"caption": "yo", "n": 1}).encode()}
    assert parse_caption_key("json") == ("json", "caption")
    assert extract_caption(raw, "txt") == "hi"
    assert extract_caption(raw, "json:caption") == "yo"
    from ldm.data.counters import SkipSample

    with pytest.raises(SkipSample, match="missing_caption"):
        extract_caption(raw, "json:n")
    with pytest.raises(SkipSample, match="corrupt_caption"):
        extract_caption({"__key__": "k", "json": b"{oops"}, "json:caption")
    with pytest.raises(ValueError):
        parse_caption_key("txt:field")


def test_filters_min_size_and_aspect(tmp_path: Path) -> None:
    sizes = {"a": (64, 64), "b": (20, 64), "c": (64, 20), "d": (30, 30)}
    with ShardWriter(str(tmp_path / "f-%06d.tar")) as writer:
        for key, size in sizes.items():
            writer.write({"__key__": key, "jpg": jpeg_bytes(1, size), "txt": key})
    ds = ShardDataset(
        str(tmp_path / "f-000000.tar"), batch_size=8, image_size=16, min_size=25, max_aspect=2.0
    )
    assert sorted(keys_of(drain(ds))) == ["a", "d"]
    counts = ds.counter.counts()
    assert counts["too_small"] == 2  # b and c have a 20 px shorter side
    ds = ShardDataset(str(tmp_path / "f-000000.tar"), batch_size=8, max_aspect=2.0)
    assert sorted(keys_of(drain(ds))) == ["a", "d"]
    assert ds.counter.counts()["bad_aspect"] == 2


def test_transforms_shape_range_crop_and_flip() -> None:
    data = jpeg_bytes(3, (48, 32))
    spec = ImageSpec(size=16)
    x = image_to_tensor(data, spec)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert crop_box(48, 32, False) == (8, 0, 40, 32)
    boxes = {crop_box(48, 32, True, random.Random(s)) for s in range(20)}
    assert len(boxes) > 1 and all(b[2] - b[0] == 32 and 0 <= b[0] <= 16 for b in boxes)
    # a horizontal gradient flips sign under hflip
    grad = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 1, 3))
    buffer = io.BytesIO()
    Image.fromarray(grad).save(buffer, format="PNG")
    flip_spec = ImageSpec(size=32, hflip=True)
    outs = [image_to_tensor(buffer.getvalue(), flip_spec, random.Random(s)) for s in range(8)]
    slopes = {bool((o[0, 0, -1] > o[0, 0, 0]).item()) for o in outs}
    assert slopes == {True, False}
    plain = image_to_tensor(buffer.getvalue(), ImageSpec(size=32))
    assert plain[0, 0, 0] == -1.0 and plain[0, 0, -1] == 1.0


def test_grayscale_and_rgba_become_rgb() -> None:
    for mode in ("L", "RGBA", "P"):
        buffer = io.BytesIO()
        Image.new(mode, (20, 20)).save(buffer, format="PNG")
        assert image_to_tensor(buffer.getvalue(), ImageSpec(size=8)).shape == (3, 8, 8)
