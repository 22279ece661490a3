"""Writing shards: sources, rotation, atomic renames, summaries, and webdataset interop."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ldm.data import write_shards as ws
from ldm.data.reader import ShardDataset
from ldm.data.shard_writer import ShardWriter, encode_sample
from ldm.data.write_shards import iter_folder, iter_table, write_shards


def save_image(path: Path, seed: int, fmt: str) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """6 images: 4 captioned (jpg, png, webp, bmp), 1 without caption, 1 corrupt."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    specs = [("a.jpg", "JPEG"), ("b.png", "PNG"), ("sub/c.webp", "WEBP"), ("d.bmp", "BMP")]
    for i, (name, fmt) in enumerate(specs):
        save_image(root / name, i, fmt)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}\n")
    save_image(root / "nocap.jpg", 9, "JPEG")
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (root / "broken.txt").write_text("broken")
    return root


def test_folder_to_shards_read_by_webdataset(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = write_shards(
        iter_folder(str(folder)),
        str(out / "train-%06d.tar"),
        max_samples=3,
        caption_format="both",
        progress=False,
    )
    assert summary.written == 4
    assert dict(summary.skipped) == {"missing_caption": 1, "corrupt_image": 1}
    assert [os.path.basename(s) for s in summary.shards] == ["train-000000.tar", "train-000001.tar"]
    assert "wrote 4 samples to 2 shards; skipped 2" in str(summary)
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    reference = wds.WebDataset(
        str(out / "train-{000000..000001}.tar"), shardshuffle=False, empty_check=False
    ).decode("pil")
    samples = list(reference)
    assert len(samples) == 4
    exts = sorted(next(k for k in ("jpg", "png", "webp") if k in s) for s in samples)
    assert exts == ["jpg", "png", "png", "webp"]  # the bmp became a png
    for s in samples:
        assert s["txt"] == s["json"]["caption"] and s["txt"].startswith("caption of")
        image = next(s[k] for k in ("jpg", "png", "webp") if k in s)
        assert image.size == (32, 24)
    # the original JPEG bytes are stored as they were (no re-encode)
    first = ShardDataset(str(out / "train-000000.tar"), batch_size=8, image_size=8)
    assert len([k for b in first for k in b["key"]]) == 3


def test_tables_csv_and_jsonl(folder: Path, tmp_path: Path) -> None:
    rows = [{"file": "a.jpg", "text": "alpha"}, {"file": "missing.jpg", "text": "gone"}]
    rows.append({"file": "b.png", "text": ""})
    csv_path = folder / "table.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "text"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl_path = folder / "table.jsonl"
    jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for table in (csv_path, jsonl_path):
        items = iter_table(str(table), path_column="file", caption_column="text")
        out = tmp_path / table.suffix[1:]
        summary = write_shards(
            items,
            str(out / "s-%06d.tar"),
            caption_format="json",
            caption_field="prompt",
            progress=False,
        )
        assert summary.written == 1
        assert dict(summary.skipped) == {"missing_image": 1, "missing_caption": 1}
        ds = ShardDataset(str(out / "s-000000.tar"), batch_size=2, caption_key="json:prompt")
        batch = next(iter(ds))
        assert batch["caption"] == ["alpha"]


def test_max_bytes_rotation(tmp_path: Path) -> None:
    payload = bytes(3000)
    with ShardWriter(str(tmp_path / "b-%03d.tar"), max_samples=None, max_bytes=10_000) as writer:
        for i in range(5):
            writer.write({"__key__": f"k{i}", "bin": payload, "txt": "x"})
    sizes = [os.path.getsize(p) for p in writer.shards]
    assert len(writer.shards) == 3  # 2 + 2 + 1 samples of 4.5 KiB (headers + padded data)
    assert all(size <= 2 * 10240 for size in sizes)  # tar pads files to 10 KiB records
    keys = [s["__key__"] for p in writer.shards for s in wds.WebDataset(p, shardshuffle=False)]
    assert keys == [f"k{i}" for i in range(5)]


def test_writes_are_atomic(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path / "a-%03d.tar"), max_samples=2) as writer:
            for i in range(3):
                writer.write({"__key__": f"k{i}", "txt": "x"})
            names = sorted(os.listdir(tmp_path))
            assert names[0] == "a-000.tar" and names[1].startswith("a-001.tar.tmp-")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["a-000.tar"]  # the half shard never got its name


def test_cli(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert ws.main(["--folder", str(folder), "--out", str(out), "--prefix", "p", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 samples to 1 shards" in printed
    assert f"data.train_shards='{out}/p-000000.tar'" in printed
    assert os.listdir(out) == ["p-000000.tar"]


def test_cli_default_names_and_brace_pattern(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default names match the README (train-000000.tar...); the printed pattern reads
    back exactly the shards written."""
    from ldm.data.shards import expand_shards

    out = tmp_path / "data"
    assert (
        ws.main(["--folder", str(folder), "--out", str(out), "--max-samples", "1", "--quiet"]) == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == f"train with: data.train_shards='{out}/train-{{000000..000003}}.tar'"
    pattern = line.split("=", 1)[1].strip("'")
    assert expand_shards(pattern) == sorted(str(p) for p in out.iterdir())


def test_cli_every_option_has_help() -> None:
    actions = [a for a in ws.build_parser()._actions if a.option_strings]
    assert len(actions) >= 14
    assert [a.option_strings for a in actions if not a.help] == []


@pytest.mark.parametrize("flag", ["--folder", "--table"])
def test_cli_missing_source_exits_2(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ws.main([flag, str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cli_nothing_written_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "a.png")  # no caption
    assert (
        ws.main(["--folder", str(tmp_path / "src"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    )
    assert "no sample written" in capsys.readouterr().err


def test_decompression_bomb_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    src = tmp_path / "src"
    src.mkdir()
    for name, side in (("ok", 8), ("warn", 40), ("bomb", 48)):
        Image.new("RGB", (side, side)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text("caption")
    summary = write_shards(iter_folder(str(src)), str(tmp_path / "o-%06d.tar"), progress=False)
    assert summary.written == 1 and summary.skipped == {"too_large": 2}


def test_encode_sample_types() -> None:
    encoded = encode_sample({"__key__": "k", "txt": "é", "json": {"a": 1}, "bin": b"\x00"})
    assert encoded == {"__key__": "k", "txt": "é".encode(), "json": b'{"a": 1}', "bin": b"\x00"}
    assert io.BytesIO(encoded["bin"]).read() == b"\x00"
