"""Cached SDXL text embeddings: `python -m ldm.cache` with an SDXL config stores both encoders'
states and the pooled embedding (and the empty prompt's), train.py trains on them, and on the
same batch the cached and the raw-text conditioning, hence the loss, are the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train
from ldm import build
from ldm.cache import main as cache_main
from ldm.config import load
from tests.models.sdxl_tiny import POOLED, WIDTH_1, WIDTH_2, build_tiny_sdxl

pytest.importorskip("diffusers")
TINY = Path(__file__).resolve().parents[1] / "configs" / "sdxl-tiny.yaml"


def _first_batch(cfg: object) -> dict:
    dm = build.build_datamodule(cfg)
    dm.setup("fit")
    return next(iter(dm.train_dataloader())), dm


def test_sdxl_cache_matches_raw_text(
    shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = build_tiny_sdxl(tmp_path / "sdxl")
    common = [f"model.text_encoder.name_or_path={folder}", f"model.autoencoder_ckpt={folder}"]
    out = tmp_path / "cache"
    assert cache_main(["-c", str(TINY), "--train-shards", shapes_data["train"], "--out", str(out),
                       "--dtype", "float32", *common]) == 0  # fmt: skip
    line = capsys.readouterr().out.strip().splitlines()[-1]
    cached_shards = line.split("data.train_shards=")[1].strip("'")
    with safe_open(str(out / "train" / "empty_prompt.safetensors"), "pt") as f:
        assert f.get_tensor("context").shape == (16, WIDTH_1 + WIDTH_2)
        assert f.get_tensor("pooled").shape == (POOLED,)

    order = ["data.shuffle_buffer=0", "data.shard_shuffle=false", "model.p_uncond=0"]
    raw_cfg = load([TINY], [*common, f"data.train_shards={shapes_data['train']}", *order])
    cached_cfg = load([TINY], [*common, "data.cached=true", f"data.train_shards={cached_shards}",
                               *order])  # fmt: skip
    raw, _ = _first_batch(raw_cfg)
    cached, dm = _first_batch(cached_cfg)
    assert raw["key"] == cached["key"] and cached["pooled"].shape == (4, POOLED)
    module = build.build_module(build.resolve(cached_cfg), dm)
    torch.testing.assert_close(
        cached["latent_mean"], module.model.autoencoder.encode(raw["image"]).mean
    )
    z = cached["latent_mean"] * module.model.autoencoder.scale_factor
    losses = []
    for batch in (raw, cached):
        cond = module.unet_conditioning(batch, z)
        out_ = module.loss_fn(
            module.model.unet,
            z,
            module.model.schedule,
            cond,
            generator=torch.Generator().manual_seed(0),
        )
        losses.append((cond, out_.loss.mean()))
    (raw_cond, raw_loss), (cached_cond, cached_loss) = losses
    torch.testing.assert_close(cached_cond["context"], raw_cond["context"], rtol=0, atol=1e-6)
    torch.testing.assert_close(cached_cond["y"], raw_cond["y"], rtol=0, atol=1e-6)
    torch.testing.assert_close(cached_loss, raw_loss, rtol=1e-6, atol=0)

    # Dropped captions become the stored empty prompt (zero_empty_prompt=false) or zeros.
    module.train()
    module.p_uncond = 1.0
    for zero in (False, True):
        module.model.zero_empty_prompts = zero
        context, pooled = module.sdxl_context(cached)
        empty = torch.zeros(16, WIDTH_1 + WIDTH_2) if zero else dm.empty_prompt()["context"]
        torch.testing.assert_close(context, empty.expand_as(context))
        assert (pooled == 0).all() == zero

    run = [
        *common,
        "data.cached=true",
        f"data.train_shards={cached_shards}",
        "model.p_uncond=0.5",
        "trainer.max_steps=2",
        f"run.root={tmp_path}",
        "run.name=cached",
        "logging.logger=csv",
    ]
    assert train.main(["-c", str(TINY), *run]) == 0
