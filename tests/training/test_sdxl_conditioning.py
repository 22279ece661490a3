"""The SDXL training module's conditioning: ``y`` carries the pooled text and the batch's own
micro-conditioning (aspect buckets' original size, crop, target size; else the image size and
crop (0, 0), as diffusers), bad sizes are refused in one line, and CFG dropout drops jointly or
per encoder (the second encoder's states with its pooled vector)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from ldm import build
from ldm.config import load
from ldm.models.micro_conditioning import embed_numbers
from tests.models.sdxl_tiny import POOLED, WIDTH_1, build_tiny_sdxl

pytest.importorskip("diffusers")
TINY = Path(__file__).resolve().parents[1] / "configs" / "sdxl-tiny.yaml"
BUCKETS = ["data.buckets.enabled=true", "data.buckets.resolutions=[32]", "data.buckets.step=8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def test_y_takes_the_batch_micro_conditioning(
    folder: Path, mixed_aspect_shards: str, tmp_path: Path
) -> None:
    cfg = load(
        [TINY],
        [
            f"model.text_encoder.name_or_path={folder}",
            *BUCKETS,
            f"data.train_shards={mixed_aspect_shards}",
            "data.random_crop=true",
        ],
    )
    dm = build.build_datamodule(cfg)
    dm.setup("fit")
    module = build.build_module(cfg).eval()
    batch = next(iter(dm.train_dataloader()))
    h, w = batch["image"].shape[-2:]
    z = torch.randn(len(batch["key"]), 4, h // 2, w // 2)
    numbers = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1)
    assert (batch["original_size"] != batch["target_size"]).any()  # resized: not the defaults
    y = module.unet_conditioning(batch, z)["y"]
    _, pooled = module.model.text_encoder.encode(batch["caption"])
    torch.testing.assert_close(y, torch.cat([pooled, embed_numbers(numbers.float())], 1))

    plain = {"image": batch["image"], "caption": batch["caption"]}  # no sizes: diffusers' defaults
    defaults = torch.tensor([[h, w, 0, 0, h, w]] * len(z), dtype=torch.float32)
    torch.testing.assert_close(
        module.unet_conditioning(plain, z)["y"][:, POOLED:], embed_numbers(defaults)
    )
    with pytest.raises(ValueError, match=r"crop_top_left \[-4, 0\] of sample 0: sizes must be"):
        module.unet_conditioning({**batch, "crop_top_left": batch["crop_top_left"] * 0 - 4 +
                                  torch.tensor([0, 4])}, z)  # fmt: skip

    args = ["-c", str(TINY), f"model.text_encoder.name_or_path={folder}", *BUCKETS,
            f"data.train_shards={mixed_aspect_shards}", "trainer.max_steps=2",
            f"run.root={tmp_path}", "run.name=bucketed", "logging.logger=csv"]  # fmt: skip
    assert train.main(args) == 0


@pytest.mark.parametrize("mode", ["joint", "per_encoder"])
def test_caption_dropout_per_encoder(folder: Path, mode: str) -> None:
    cfg = load(
        [TINY],
        [
            f"model.text_encoder.name_or_path={folder}",
            f"model.sdxl.uncond={mode}",
            "model.p_uncond=0.5",
            "data.train_shards=[x.tar]",
        ],
    )
    module = build.build_module(cfg).train()
    batch = {"caption": ["the red"] * 256}
    context, pooled = module.sdxl_context(batch)
    first = (context[:, :, :WIDTH_1] == 0).flatten(1).all(1)  # zero_empty_prompt: zeros
    second = (context[:, :, WIDTH_1:] == 0).flatten(1).all(1)
    assert torch.equal(second, (pooled == 0).all(1))  # the pooled vector goes with encoder 2
    assert 0.35 < first.float().mean() < 0.65 and 0.35 < second.float().mean() < 0.65
    if mode == "joint":
        assert torch.equal(first, second)
    else:
        assert (first != second).any()
