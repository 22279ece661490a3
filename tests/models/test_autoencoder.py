"""KL autoencoder: parity with diffusers, key mapping, SD-layout loading, posterior, overfitting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ldm.checkpoint.vae_keys import (
    strip_first_stage_prefix,
    vae_config_diffusers_to_ldm,
    vae_config_ldm_to_diffusers,
    vae_diffusers_to_ldm,
    vae_ldm_to_diffusers,
)
from ldm.models.autoencoder import AutoencoderKL, DiagonalGaussian

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "autoencoder"

# Two parity configs: 3 levels + mid attention (kl-tiny); 2 levels, wider, attention in the
# lower level (8x8 for 16x16 inputs), no mid attention, 8 latent channels.
PARITY_CONFIGS: dict[str, dict[str, Any]] = {
    "kl-tiny": {},  # filled from the YAML below
    "attn-levels": dict(
        ch=64,
        ch_mult=[1, 2],
        num_res_blocks=2,
        attn_resolutions=[8],
        z_channels=8,
        embed_dim=8,
        resolution=16,
        mid_attention=False,
    ),
}


def load_kwargs(name: str) -> dict[str, Any]:
    """``model.autoencoder`` section of ``configs/autoencoder/<name>.yaml``."""
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["autoencoder"]


def config_kwargs(name: str) -> dict[str, Any]:
    return load_kwargs(name) if name == "kl-tiny" else PARITY_CONFIGS[name]


def diffusers_pair(kwargs: dict[str, Any]) -> tuple[AutoencoderKL, torch.nn.Module]:
    """Ours with random weights and diffusers' AutoencoderKL holding the same weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    ours = AutoencoderKL(**kwargs).eval()
    theirs = DiffusersAutoencoderKL(**vae_config_ldm_to_diffusers(**kwargs)).eval()
    theirs.load_state_dict(vae_ldm_to_diffusers(ours.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_parity_with_diffusers(name: str) -> None:
    kwargs = config_kwargs(name)
    ours, theirs = diffusers_pair(kwargs)
    size = kwargs["resolution"]
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        assert (post.mean - ref.mean).abs().max() <= 1e-5
        assert (post.logvar - ref.logvar).abs().max() <= 1e-5
        z = torch.randn_like(post.mean)
        assert (ours.decode(z) - theirs.decode(z).sample).abs().max() <= 1e-5
        rec, _ = ours(x, sample_posterior=False)
        assert (rec - theirs(x, sample_posterior=False).sample).abs().max() <= 1e-5


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_key_mapping_round_trips_exactly(name: str) -> None:
    ours = AutoencoderKL(**config_kwargs(name))
    sd = ours.state_dict()
    theirs = vae_ldm_to_diffusers(sd)
    assert "scale_factor" not in theirs
    assert not any(k.startswith("decoder.up.") for k in theirs)
    back = vae_diffusers_to_ldm(theirs, scale_factor=sd["scale_factor"])
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = vae_ldm_to_diffusers(back)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_key_mapping_details() -> None:
    sd = AutoencoderKL(**load_kwargs("kl-tiny")).state_dict()
    theirs = vae_ldm_to_diffusers(sd)
    # 3 levels: our up.0 (highest resolution) is diffusers' up_blocks.2, attention 4-D -> 2-D.
    assert torch.equal(
        theirs["decoder.up_blocks.2.resnets.0.conv1.weight"],
        sd["decoder.up.0.block.0.conv1.weight"],
    )
    assert torch.equal(
        theirs["decoder.up_blocks.0.upsamplers.0.conv.bias"], sd["decoder.up.2.upsample.conv.bias"]
    )
    assert theirs["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
    assert sd["encoder.mid.attn_1.q.weight"].ndim == 4
    assert "encoder.conv_norm_out.weight" in theirs
    assert "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" in theirs
    legacy = {k.replace("to_q", "query"): v for k, v in theirs.items()}  # old diffusers names
    q_weight = vae_diffusers_to_ldm(legacy)["decoder.mid.attn_1.q.weight"]
    assert torch.equal(q_weight, sd["decoder.mid.attn_1.q.weight"])
    with pytest.raises(KeyError, match="unknown autoencoder key"):
        vae_ldm_to_diffusers({**sd, "encoder.down.0.block.0.bogus.weight": torch.zeros(1)})


def test_config_mapping_round_trip() -> None:
    kwargs = PARITY_CONFIGS["attn-levels"]
    back = vae_config_diffusers_to_ldm(vae_config_ldm_to_diffusers(**kwargs, scale_factor=0.5))
    assert {k: back[k] for k in kwargs} == kwargs and back["scale_factor"] == 0.5
    with pytest.raises(ValueError):
        vae_config_ldm_to_diffusers(ch_mult=[2, 4])


def test_loads_original_sd_layout_strictly() -> None:
    kwargs = load_kwargs("kl-tiny")
    source = AutoencoderKL(**kwargs)
    ckpt = {
        f"first_stage_model.{k}": v for k, v in source.state_dict().items() if k != "scale_factor"
    }
    ckpt["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    ckpt["cond_stage_model.transformer.x"] = torch.zeros(1)
    target = AutoencoderKL(**kwargs)
    target.load_state_dict(strip_first_stage_prefix(ckpt, scale_factor=0.18215), strict=True)
    loaded = {k: v for k, v in target.state_dict().items() if k != "scale_factor"}
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
    assert target.scale_factor.item() == pytest.approx(0.18215)
    # A stand-alone VAE checkpoint: training-loss entries dropped, top-level scale_factor kept.
    standalone = {**source.state_dict(), "loss.logvar": torch.zeros(())}
    standalone["scale_factor"] = torch.tensor(0.5)
    target.load_state_dict(strip_first_stage_prefix(standalone), strict=True)
    assert target.scale_factor.item() == 0.5


def test_parameter_count_matches_sd_vae() -> None:
    with torch.device("meta"):
        model = AutoencoderKL(**load_kwargs("kl-f8"))
    assert sum(p.numel() for p in model.parameters()) == 83_653_863  # SD v1/v2 VAE
    assert model.downsample_factor == 8


def test_shapes_scale_factor_buffer_and_latent_helpers() -> None:
    model = AutoencoderKL(**load_kwargs("kl-tiny")).eval()
    assert model.downsample_factor == 4
    assert "scale_factor" in model.state_dict() and "scale_factor" in dict(model.named_buffers())
    assert model.get_last_layer() is model.decoder.conv_out.weight
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        new = model.update_scale_factor(x, generator=torch.Generator().manual_seed(0))
        z = model.encode_latents(x, sample=False)
        assert z.shape == (3, 4, 8, 8)
        assert torch.allclose(z, model.encode(x).mode() * new)
        assert model.state_dict()["scale_factor"].item() == pytest.approx(new)
        assert torch.allclose(model.decode_latents(z), model.decode(z / new), atol=1e-6)
        sampled = model.encode_latents(x, generator=torch.Generator().manual_seed(0))
        assert sampled.std().item() == pytest.approx(1.0, rel=1e-4)  # what the scale is for
    fresh = AutoencoderKL(**load_kwargs("kl-tiny"))
    fresh.load_state_dict(model.state_dict())
    assert fresh.scale_factor.item() == pytest.approx(new)


def test_gradient_checkpointing_matches() -> None:
    kwargs = load_kwargs("kl-tiny")
    plain, ckpt = AutoencoderKL(**kwargs), AutoencoderKL(**{**kwargs, "use_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for model in (plain, ckpt):
        rec, post = model(x, generator=torch.Generator().manual_seed(0))
        ((rec - x).abs().mean() + post.kl().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_diagonal_gaussian() -> None:
    mean, logvar = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    assert torch.equal(post.mode(), mean)
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl_ref = torch.distributions.kl_divergence(ref, std_normal).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(), kl_ref, atol=1e-5)
    other = DiagonalGaussian(torch.randn(2, 6, 4, 4))
    kl_other = torch.distributions.kl_divergence(
        ref, torch.distributions.Normal(other.mean, other.std)
    ).sum(dim=(1, 2, 3))
    assert torch.allclose(post.kl(other), kl_other, atol=1e-4)
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(post.nll(x), -ref.log_prob(x).sum(dim=(1, 2, 3)), atol=1e-4)
    # Sampling: reproducible with a generator, right moments.
    a = post.sample(torch.Generator().manual_seed(3))
    assert torch.equal(a, post.sample(torch.Generator().manual_seed(3)))
    moments = torch.cat([torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200), -1.0)])
    big = DiagonalGaussian(moments.reshape(1, 2, 200, 200))  # mean 2, logvar -1
    s = big.sample(torch.Generator().manual_seed(0))
    assert s.mean().item() == pytest.approx(2.0, abs=0.01)
    assert s.std().item() == pytest.approx(np.exp(-0.5), abs=0.01)
    # N(0, I) has zero KL; the log-variance is clamped to [-30, 20]; deterministic = mean.
    assert DiagonalGaussian(torch.zeros(1, 8, 2, 2)).kl().abs().max() == 0
    clamped = DiagonalGaussian(
        torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 99.0)], 1)
    )
    assert clamped.logvar.item() == 20.0
    det = DiagonalGaussian(torch.cat([mean, logvar], dim=1), deterministic=True)
    assert torch.equal(det.sample(), mean) and det.kl().abs().sum() == 0


def _astronaut(size: int) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def test_tiny_autoencoder_overfits_one_image() -> None:
    x = _astronaut(32)
    model = AutoencoderKL(**load_kwargs("kl-tiny"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(80):
        rec, post = model(x, generator=gen)
        loss = (rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        (loss + 1e-6 * post.kl().mean()).backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) / 3, losses[::10]
