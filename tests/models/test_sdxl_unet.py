"""SDXL U-Net: the shipped configs' parameter counts, and parity with diffusers' SDXL
``UNet2DConditionModel`` (``addition_embed_type="text_time"``) on tiny random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint.sdxl_keys import (
    sdxl_unet_diffusers_to_ldm,
    sdxl_unet_kwargs_from_diffusers_config,
    sdxl_unet_kwargs_to_diffusers_config,
    sdxl_unet_ldm_to_diffusers,
)
from ldm.config import load
from ldm.models.micro_conditioning import sdxl_vector, size_numbers
from ldm.models.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ldm"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "params"), [("sdxl.yaml", 2_567_463_684), ("sdxl-refiner.yaml", 2_259_526_660)]
)
def test_sdxl_configs_match_the_published_parameter_counts(name: str, params: int) -> None:
    cfg = load([CONFIGS / name])
    kwargs = OmegaConf.to_container(cfg.model.unet, resolve=True)
    with torch.device("meta"):
        ours = UNetModel(**kwargs)
        theirs = diffusers.UNet2DConditionModel(**sdxl_unet_kwargs_to_diffusers_config(kwargs))
    assert _count(ours) == params
    assert _count(theirs) == params


TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=48,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=16 + 6 * 256, norm_num_groups=32,
)  # fmt: skip


def test_tiny_sdxl_unet_matches_diffusers() -> None:
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**TINY).eval()
    kwargs = sdxl_unet_kwargs_from_diffusers_config(theirs.config)
    assert kwargs["adm_in_channels"] == 16 + 6 * 256
    ours = UNetModel(**kwargs).eval()
    ours.load_state_dict(sdxl_unet_diffusers_to_ldm(theirs.state_dict(), kwargs), strict=True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 12, generator=g)
    t = torch.tensor([999.0, 37.0])
    context = torch.randn(2, 7, 48, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 128.0, 96.0],
                             [512.0, 512.0, 64.0, 0.0, 128.0, 96.0]])  # fmt: skip
    with torch.no_grad():
        expected = theirs(x, t, context, added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids}).sample  # fmt: skip
        numbers = size_numbers(time_ids[:, :2], time_ids[:, 2:4], time_ids[:, 4:])
        got = ours(x, t, context, y=sdxl_vector(pooled, numbers))
    assert expected.abs().max() > 1e-3  # the output layer is not zero-initialised in diffusers
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 1e-5, rel

    back = sdxl_unet_ldm_to_diffusers(ours.state_dict(), kwargs)
    twin = diffusers.UNet2DConditionModel(**sdxl_unet_kwargs_to_diffusers_config(kwargs))
    twin.load_state_dict(back, strict=True)
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())


def test_size_numbers_broadcast_one_pair_and_refuse_bad_shapes() -> None:
    numbers = size_numbers((1024, 768), (0, 0), (1024, 768), batch=3)
    assert numbers.shape == (3, 6)
    assert numbers[2].tolist() == [1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0]
    with pytest.raises(ValueError, match="crop_top_left must be"):
        size_numbers((1024, 768), (0, 0, 0), (1024, 768))
    with pytest.raises(ValueError, match="not an SDXL U-Net config"):
        sdxl_unet_kwargs_from_diffusers_config({"addition_embed_type": None})
