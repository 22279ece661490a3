"""Caching latents + text embeddings: round trip, dtypes, rank split, cached DataModule."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.data.cached import load_empty_prompt, sample_latents
from ldm.data.precompute import CaptionMemo, output_name, precompute
from ldm.data.reader import ShardDataset
from ldm.data.shard_writer import ShardWriter

L, D = 6, 8


def encode_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dummy 'autoencoder': 4×(H/4)×(W/4) posterior from average pooling."""
    pooled = F.avg_pool2d(images, 4)  # (B, 3, h, w)
    mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)  # (B, 4, h, w)
    return mean, torch.sigmoid(mean) * 0.1 + 0.01


def encode_texts(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dummy text encoder: character codes, mask over the first len(words)+1 tokens."""
    context = torch.zeros(len(captions), L, D)
    mask = torch.zeros(len(captions), L, dtype=torch.bool)
    for i, caption in enumerate(captions):
        codes = torch.tensor([ord(c) / 128.0 for c in (caption + " " * L * D)[: L * D]])
        context[i] = codes.view(L, D) - 0.5  # (L, D)
        mask[i, : min(L, len(caption.split()) + 1)] = True
    return context, mask


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> str:
    """3 shards x 5 samples, one of them without caption."""
    root = tmp_path_factory.mktemp("src")
    with ShardWriter(str(root / "img-%06d.tar"), max_samples=5) as writer:
        for i in range(15):
            sample = {"__key__": f"k{i:03d}", "png": png_bytes(i), "json": {"n": i}}
            if i != 7:
                sample["txt"] = f"a picture number {i}"
            writer.write(sample)
    return str(root / "img-{000000..000002}.tar")


def expected_by_key(source: str) -> dict[str, dict]:
    """Encoder outputs computed directly from the decoded source images."""
    ds = ShardDataset(source, batch_size=32, image_size=16, shuffle_buffer=0)
    out = {}
    for batch in ds:
        mean, std = encode_images(batch["image"])
        context, mask = encode_texts(batch["caption"])
        for i, key in enumerate(batch["key"]):
            out[key] = {
                "latent_mean": mean[i],
                "latent_std": std[i],
                "context": context[i],
                "context_mask": mask[i],
                "caption": batch["caption"][i],
            }
    return out


@pytest.mark.parametrize(
    ("dtype", "tol"), [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0.0)]
)
def test_round_trip(source: str, tmp_path: Path, dtype: str, tol: float) -> None:
    summary = precompute(
        source,
        str(tmp_path),
        encode_images,
        encode_texts,
        image_size=16,
        batch_size=3,
        dtype=dtype,
        progress=False,
    )
    assert summary.samples == 14 and summary.skipped == {"missing_caption": 1}
    assert sorted(os.path.basename(s) for s in summary.shards) == [
        f"img-00000{i}.tar" for i in range(3)
    ]
    expected = expected_by_key(source)
    cached = ShardDataset(
        str(tmp_path / "img-{000000..000002}.tar"), batch_size=4, cached=True, shuffle_buffer=0
    )
    seen = set()
    for batch in cached:
        assert batch["latent_mean"].dtype == torch.float32
        assert batch["context_mask"].dtype == torch.bool
        assert batch["latent_mean"].shape[1:] == (4, 4, 4)
        assert batch["context"].shape[1:] == (L, D)
        for i, key in enumerate(batch["key"]):
            ref = expected[key]
            for name in ("latent_mean", "latent_std", "context"):
                torch.testing.assert_close(batch[name][i], ref[name], rtol=tol, atol=tol)
            assert torch.equal(batch["context_mask"][i], ref["context_mask"])
            assert batch["caption"][i] == ref["caption"]
            seen.add(key)
    assert seen == set(expected)
    empty = load_empty_prompt(str(tmp_path / "empty_prompt.safetensors"))
    ref_context, ref_mask = encode_texts([""])
    torch.testing.assert_close(empty["context"], ref_context[0])
    assert torch.equal(empty["context_mask"], ref_mask[0])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["dtype"] == dtype and manifest["shapes"]["latent"] == [4, 4, 4]


def test_json_is_copied_and_reruns_skip_existing(source: str, tmp_path: Path) -> None:
    import webdataset as wds

    precompute(source, str(tmp_path), encode_images, encode_texts, image_size=16, progress=False)
    sample = next(iter(wds.WebDataset(str(tmp_path / "img-000000.tar"), shardshuffle=False)))
    assert json.loads(sample["json"]) == {"n": 0}
    again = precompute(
        source, str(tmp_path), encode_images, encode_texts, image_size=16, progress=False
    )
    assert again.samples == 0 and len(again.existing) == 3


def test_ranks_and_workers_split_the_work(source: str, tmp_path: Path) -> None:
    outputs = []
    for rank in range(2):
        summary = precompute(
            source,
            str(tmp_path),
            encode_images,
            encode_texts,
            image_size=16,
            rank=rank,
            world_size=2,
            num_workers=2 if rank == 0 else 0,
            progress=False,
        )
        outputs.append({os.path.basename(s) for s in summary.shards})
    assert outputs == [{"img-000000.tar", "img-000002.tar"}, {"img-000001.tar"}]
    assert output_name("pipe:curl -s https://host/dir/a-001.tar") == "a-001.tar"


def test_sample_latents_and_cached_datamodule(source: str, tmp_path: Path) -> None:
    from ldm.data.datamodule import ShardDataModule

    precompute(source, str(tmp_path), encode_images, encode_texts, image_size=16, progress=False)
    dm = ShardDataModule(
        train_shards=[str(tmp_path / "img-{000000..000002}.tar")],
        batch_size=4,
        num_workers=0,
        cached=True,
        shuffle_buffer=4,
    )
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"latent_mean", "latent_std", "context", "context_mask", "caption", "key"}
    assert dm.empty_prompt()["context"].shape == (L, D)
    gen = torch.Generator().manual_seed(0)
    z = sample_latents(batch["latent_mean"], batch["latent_std"], generator=gen)
    eps = torch.randn(batch["latent_mean"].shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(z, batch["latent_mean"] + batch["latent_std"] * eps)
    big_mean, big_std = torch.full((20000,), 2.0), torch.full((20000,), 0.5)
    draws = sample_latents(big_mean, big_std, generator=gen)
    assert abs(draws.mean().item() - 2.0) < 0.02 and abs(draws.std().item() - 0.5) < 0.02


def test_caption_memo_encodes_each_distinct_caption_once_and_evicts_oldest() -> None:
    calls: list[list[str]] = []

    def counting(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(list(captions))
        return encode_texts(captions)

    memo = CaptionMemo(counting, max_entries=3)
    batch = ["a b", "c", "a b", "d e f"]
    context, mask = memo(batch)
    ref_context, ref_mask = encode_texts(batch)
    assert torch.equal(context, ref_context) and torch.equal(mask, ref_mask)
    assert calls == [["a b", "c", "d e f"]]
    memo(["c", "g"])  # "a b" is now least recently used and evicted
    assert calls[-1] == ["g"] and list(memo.entries) == ["d e f", "c", "g"]
    memo(["a b"])
    assert calls[-1] == ["a b"] and (memo.hits, memo.misses) == (2, 5)


def test_repeated_captions_are_encoded_once_with_the_same_result(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    with ShardWriter(str(root / "img-%06d.tar"), max_samples=6) as writer:
        for i in range(12):
            writer.write({"__key__": f"k{i:03d}", "png": png_bytes(i), "txt": f"caption {i % 3}"})
    source = str(root / "img-{000000..000001}.tar")
    memo_summary = precompute(
        source,
        str(tmp_path / "memo"),
        encode_images,
        encode_texts,
        image_size=16,
        batch_size=4,
        progress=False,
    )
    plain_summary = precompute(
        source,
        str(tmp_path / "plain"),
        encode_images,
        encode_texts,
        image_size=16,
        batch_size=4,
        progress=False,
        memo_captions=0,
    )
    assert (memo_summary.captions_encoded, plain_summary.captions_encoded) == (3, 12)
    for name in ("img-000000.tar", "img-000001.tar"):
        memo = (tmp_path / "memo" / name).read_bytes()
        assert memo == (tmp_path / "plain" / name).read_bytes()
