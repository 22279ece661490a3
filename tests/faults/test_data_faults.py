"""Bad data is counted, never a crash or a hang: a shard written by webdataset's own
``TarWriter`` holding every bad-member kind, hand-damaged tar metadata, odd cached samples, and
a source with no usable sample at all (the no-progress watchdog)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.cached import encode_cached_sample
from ldm.data.reader import ShardDataset
from tests.faults.faultkit import tiny_ae_args
from tests.faults.test_bad_input import assert_one_line_exit_2


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rgb(seed: int, side: int = 8) -> bytes:
    return png(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def drain(dataset: ShardDataset) -> list[dict]:
    return list(DataLoader(dataset, batch_size=None, num_workers=0))


def test_reference_written_bad_members_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 8x8 images are fine, 40x40 not
    grey16 = png(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey at 16 bits
    samples = {
        "good0": {"png": rgb(0), "json": {"caption": "a"}},
        "bomb": {"png": rgb(1, side=48), "json": {"caption": "b"}},  # > 2x the pixel limit
        "large": {"png": rgb(2, side=40), "json": {"caption": "c"}},  # over it (PIL warns)
        "deep": {"png": rgb(3), "json": "[" * 100_000},  # RecursionError in json
        "notjson": {"png": rgb(4), "json": "{caption"},
        "nofield": {"png": rgb(5), "json": {"text": "d"}},
        "noimage": {"json": {"caption": "e"}},
        "badimage": {"png": b"not a png", "json": {"caption": "f"}},
        "cut": {"png": rgb(6)[:40], "json": {"caption": "g"}},
        "empty": {"png": b"", "json": {"caption": "h"}},
        "grey16": {"png": grey16, "json": {"caption": "grey"}},
        "good1": {"png": rgb(7), "json": {"caption": "i"}},
    }
    path = tmp_path / "ref-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for key, members in samples.items():
            writer.write(
                {
                    "__key__": key,
                    **{
                        ext: json.dumps(v).encode()
                        if ext == "json" and isinstance(v, dict)
                        else v.encode()
                        if isinstance(v, str)
                        else v
                        for ext, v in members.items()
                    },
                }
            )
    ds = ShardDataset(
        str(path),
        batch_size=16,
        image_size=8,
        caption_key="json:caption",
        shuffle_buffer=0,
        num_slots=2,
    )
    (batch,) = drain(ds)
    assert batch["key"] == ["good0", "grey16", "good1"]
    grey = batch["image"][1]
    torch.testing.assert_close(grey, torch.full_like(grey, 128 / 127.5 - 1))  # not white
    counts = {k: v for k, v in ds.counter.counts().items() if v}
    assert counts == {
        "ok": 3,
        "too_large": 2,
        "corrupt_caption": 2,
        "missing_caption": 1,
        "missing_image": 1,
        "corrupt_image": 2,
        "empty_member": 1,
    }


def _header(name: str, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with a raw 12-byte size field and a correct checksum."""
    info = tarfile.TarInfo(name)
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT)[:512])
    block[124:136] = size_field
    block[156:157] = kind
    block[148:156] = b" " * 8
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, f"{len(data):011o}\0".encode()) + data + bytes(-len(data) % 512)


def _pax(records: bytes) -> bytes:
    return (
        _header("pax", f"{len(records):011o}\0".encode(), b"x")
        + records
        + bytes(-len(records) % 512)
    )


GOOD = _member("ok.png", rgb(0)) + _member("ok.txt", b"fine")
END = bytes(1024)
DAMAGED_TARS = {
    "pax_length_zero": _pax(b"0 path=x.png\n"),
    "pax_no_length": _pax(b"path=x.png\n"),
    "pax_length_past_end": _pax(b"99 path=x.png\n"),
    "pax_size_not_a_number": _pax(b"17 size=12abc34\n") + _member("x.png", b""),
    "gnu_base256_huge": _header("x.png", b"\x80" + (2**80).to_bytes(11, "big")),
    "gnu_base256_negative": _header("x.png", b"\xff" * 12),
    "long_name_huge": _header("././@LongLink", b"\x80" + (2**40).to_bytes(11, "big"), b"L"),
}


@pytest.mark.parametrize("damage", DAMAGED_TARS.values(), ids=DAMAGED_TARS.keys())
def test_damaged_tar_metadata_is_bad_tar(damage: bytes, tmp_path: Path) -> None:
    path = tmp_path / "damaged.tar"
    path.write_bytes(GOOD + damage + GOOD.replace(b"ok.", b"no.") + END)
    ds = ShardDataset(str(path), batch_size=4, image_size=8, shuffle_buffer=0, num_slots=2)
    batches = drain(ds)
    assert [k for b in batches for k in b["key"]] == ["ok"]  # read up to the damage
    counts = ds.counter.counts()
    assert counts["bad_tar"] == 1 and counts["ok"] == 1


def test_cached_sample_with_odd_shapes_is_counted(tmp_path: Path) -> None:
    def sample(key: str, latent: tuple[int, ...], context: tuple[int, int]) -> dict:
        data = encode_cached_sample(
            torch.zeros(latent),
            torch.ones(latent),
            torch.zeros(context),
            torch.ones(context[0], dtype=bool),
        )
        return {"__key__": key, "safetensors": data, "txt": b"c"}

    path = tmp_path / "cache-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        writer.write(sample("a", (4, 4, 4), (8, 16)))
        writer.write(sample("wide", (4, 4, 8), (8, 16)))
        writer.write(sample("ctx", (4, 4, 4), (8, 32)))
        writer.write(sample("b", (4, 4, 4), (8, 16)))
    ds = ShardDataset(str(path), batch_size=8, cached=True, shuffle_buffer=0, num_slots=2)
    (batch,) = drain(ds)
    assert batch["key"] == ["a", "b"]
    assert ds.counter.counts()["corrupt_latent"] == 2


def test_source_without_usable_sample_stops_in_one_line(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caption field no sample has: every epoch would be empty, forever."""
    import train

    rc = train.main(
        tiny_ae_args(six_batch_shard, tmp_path, "data.caption_key=json:nope", "trainer.max_steps=5")
    )
    assert_one_line_exit_2(
        rc, capsys.readouterr().err, "no usable sample", "caption_key", only=False
    )
