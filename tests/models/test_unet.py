"""U-Net: diffusers parity, checkpoint key mapping, SD1/SD2 sizes, timesteps, context mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from omegaconf import OmegaConf

from ldm.checkpoint.unet_keys import (
    strip_prefix,
    unet_diffusers_to_ldm,
    unet_kwargs_from_diffusers_config,
    unet_kwargs_to_diffusers_config,
    unet_ldm_to_diffusers,
)
from ldm.models.unet import UNetModel
from ldm.nn.embeddings import timestep_embedding

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ldm"

SD1_TINY = dict(
    model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[1, 2],
    num_heads=4, transformer_depth=[1, 2, 1], context_dim=24,
)  # fmt: skip
SD2_TINY = dict(
    model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 4],
    num_heads=-1, num_head_channels=16, transformer_depth=1, context_dim=24,
    use_linear_in_transformer=True, upcast_attention=True,
)  # fmt: skip
VECTOR_COND = {**SD2_TINY, "use_scale_shift_norm": True, "adm_in_channels": 12}
CLASS_COND = {**SD1_TINY, "attention_resolutions": [1], "num_classes": 10}


def load_unet_yaml(name: str) -> dict:
    """The ``model.unet`` section of ``configs/ldm/unet-<name>.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"unet-{name}.yaml"))["model"]["unet"]


def random_unet(seed: int = 0, **kwargs) -> UNetModel:
    """A U-Net with all weights random (SD zero-initialises the output convs)."""
    torch.manual_seed(seed)
    model = UNetModel(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def inputs(kwargs: dict, batch: int = 2, size: int = 16, seq: int = 7, seed: int = 1):
    """(x, timesteps, context, y) for a model built with ``kwargs``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([3.25, 917.0])[:batch]
    ctx = torch.randn(batch, seq, kwargs["context_dim"], generator=g)
    y = None
    if kwargs.get("adm_in_channels"):
        y = torch.randn(batch, kwargs["adm_in_channels"], generator=g)
    if kwargs.get("num_classes"):
        y = torch.arange(batch) % kwargs["num_classes"]
    return x, t, ctx, y


def structure(kwargs: dict) -> tuple:
    return kwargs["channel_mult"], kwargs["num_res_blocks"], kwargs["attention_resolutions"]


@pytest.mark.parametrize(
    "kwargs", [SD1_TINY, SD2_TINY, VECTOR_COND, CLASS_COND], ids=["sd1", "sd2", "vector", "class"]
)
def test_parity_with_diffusers(kwargs: dict) -> None:
    ours = random_unet(**kwargs)
    theirs = UNet2DConditionModel(**unet_kwargs_to_diffusers_config(kwargs)).eval()
    theirs.load_state_dict(unet_ldm_to_diffusers(ours.state_dict(), *structure(kwargs)))
    x, t, ctx, y = inputs(kwargs)
    with torch.no_grad():
        expected = theirs(x, t, ctx, class_labels=y).sample
        actual = ours(x, t, ctx, y=y)
    assert actual.shape == x.shape
    assert (actual - expected).abs().max().item() <= 1e-5
    assert expected.abs().mean().item() > 0.01  # a non-trivial output


@pytest.mark.parametrize("kwargs", [SD1_TINY, VECTOR_COND], ids=["sd1", "vector"])
def test_key_mapping_round_trip_is_exact(kwargs: dict) -> None:
    ours = random_unet(**kwargs)
    sd = ours.state_dict()
    theirs_sd = unet_ldm_to_diffusers(sd, *structure(kwargs))
    theirs = UNet2DConditionModel(**unet_kwargs_to_diffusers_config(kwargs))
    assert set(theirs_sd) == set(theirs.state_dict())
    theirs.load_state_dict(theirs_sd, strict=True)
    back = unet_diffusers_to_ldm(theirs.state_dict(), *structure(kwargs))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_diffusers_config_round_trip() -> None:
    for kwargs in (SD1_TINY, SD2_TINY, VECTOR_COND, CLASS_COND, load_unet_yaml("sd2")):
        config = unet_kwargs_to_diffusers_config(kwargs)
        back = unet_kwargs_from_diffusers_config(config)
        back["attention_resolutions"] = sorted(back["attention_resolutions"])
        expected = {**kwargs, "attention_resolutions": sorted(kwargs["attention_resolutions"])}
        assert {k: back[k] for k in kwargs if k in back} == {
            k: v for k, v in expected.items() if k in back
        }
    same_heads = {**unet_kwargs_to_diffusers_config(SD1_TINY), "attention_head_dim": [4, 4, 4]}
    assert unet_kwargs_from_diffusers_config(same_heads)["num_heads"] == 4
    with pytest.raises(ValueError):
        unet_kwargs_to_diffusers_config({**SD1_TINY, "resblock_updown": True})


def test_mapping_rejects_unknown_keys() -> None:
    sd = {"input_blocks.1.0.in_layers.0.weight": torch.zeros(1), "nonsense.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match="nonsense"):
        unet_ldm_to_diffusers(sd, *structure(SD1_TINY))


def test_compvis_checkpoint_loads_strict() -> None:
    source = random_unet(**SD1_TINY)
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in source.state_dict().items()}
    checkpoint["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    checkpoint["cond_stage_model.transformer.x"] = torch.zeros(1)
    target = UNetModel(**SD1_TINY).eval()
    target.load_state_dict(strip_prefix(checkpoint, "model.diffusion_model."), strict=True)
    x, t, ctx, _ = inputs(SD1_TINY)
    with torch.no_grad():
        assert torch.equal(target(x, t, ctx), source(x, t, ctx))


def test_gradient_checkpointing_same_loss_and_grads() -> None:
    kwargs = {**SD1_TINY, "dropout": 0.1}
    model = random_unet(**kwargs).train()
    x, t, ctx, _ = inputs(kwargs, size=8)
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad()
        torch.manual_seed(123)  # same dropout masks
        loss = model(x, t, ctx).square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert (loss_a - loss_b).abs().item() <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b, strict=True)) <= 1e-5


@pytest.mark.parametrize(
    ("name", "count"), [("sd1", 859_520_964), ("sd2", 865_910_724), ("tiny", None)]
)
def test_config_parameter_counts(name: str, count: int | None) -> None:
    with torch.device("meta"):
        model = UNetModel(**load_unet_yaml(name))
    n = sum(p.numel() for p in model.parameters())
    assert n == count if count is not None else n < 3_000_000


def test_tiny_config_forward_and_zero_init() -> None:
    kwargs = load_unet_yaml("tiny")
    model = UNetModel(**kwargs)
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([1, 999]), torch.randn(2, 5, kwargs["context_dim"]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv, as SD


def test_timestep_embedding_matches_reference() -> None:
    t = torch.tensor([0.0, 0.5, 17.25, 999.0])
    ours = timestep_embedding(t, 33)
    ref = get_timestep_embedding(t, 33, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ours.shape == (4, 33)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.equal(ours[0, :16], torch.ones(16))  # cos first


def test_fractional_and_scalar_timesteps() -> None:
    model = random_unet(**SD1_TINY)
    x, _, ctx, _ = inputs(SD1_TINY, size=8)
    with torch.no_grad():
        a = model(x, torch.tensor([10.25, 10.25]), ctx)
        b = model(x, torch.tensor([10.75, 10.75]), ctx)
        c = model(x, 10.25, ctx)
        d = model(x, torch.tensor([10, 10]), ctx)
        e = model(x, torch.tensor([10.0, 10.0], dtype=torch.float64), ctx)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(a, c)
    assert torch.equal(d, e)


def test_context_mask_equals_dropping_tokens() -> None:
    model = random_unet(**SD2_TINY)
    x, t, ctx, _ = inputs(SD2_TINY, size=8, seq=7)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :5] = True
    with torch.no_grad():
        masked = model(x, t, ctx, context_mask=mask)
        unmasked = model(x, t, ctx)
        all_kept = model(x, t, ctx, context_mask=torch.ones(2, 7, dtype=torch.bool))
        first = model(x[:1], t[:1], ctx[:1, :3])
        second = model(x[1:], t[1:], ctx[1:, :5])
    assert torch.allclose(all_kept, unmasked, atol=1e-6)
    assert (masked - unmasked).abs().max() > 1e-3
    assert torch.allclose(masked, torch.cat([first, second]), atol=1e-5)


def test_conditioning_requires_y() -> None:
    model = random_unet(**CLASS_COND)
    x, t, ctx, y = inputs(CLASS_COND)
    with pytest.raises(ValueError):
        model(x, t, ctx)
    with torch.no_grad():
        assert (model(x, t, ctx, y=y) - model(x, t, ctx, y=y.flip(0))).abs().max() > 1e-4


@pytest.mark.gpu
def test_cuda_bf16_autocast_close_to_fp32() -> None:
    model = random_unet(**SD2_TINY).cuda()
    x, t, ctx = (v.cuda() for v in inputs(SD2_TINY)[:3])
    with torch.no_grad():
        expected = model(x, t, ctx)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            actual = model(x, t, ctx)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().mean() < 0.05 * expected.abs().mean()


@pytest.mark.parametrize(
    "extra", [{"resblock_updown": True}, {"conv_resample": False, "use_checkpoint": True}]
)
def test_resampling_variants(extra: dict) -> None:
    kwargs = {**SD1_TINY, "num_res_blocks": 1, **extra}
    model = random_unet(**kwargs)
    x, t, ctx, _ = inputs(kwargs, size=8)
    out = model(x, t, ctx)
    assert out.shape == x.shape and torch.isfinite(out).all()
    keys = model.state_dict().keys()
    if extra.get("resblock_updown"):  # original SD names: the down/up blocks are ResBlocks
        assert "input_blocks.2.0.in_layers.0.weight" in keys
        assert "output_blocks.1.1.out_layers.3.weight" in keys  # no attention at 4x
        assert "output_blocks.3.2.out_layers.3.weight" in keys  # after attention at 2x
    else:
        assert not any(".op." in k for k in keys)
        out.square().mean().backward()  # through the checkpointed blocks
