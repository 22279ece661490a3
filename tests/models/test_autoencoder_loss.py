"""Autoencoder loss: GAN schedule and adaptive weight, discriminator, LPIPS loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.models.autoencoder import AutoencoderKL
from ldm.models.autoencoder_loss import AutoencoderLoss
from ldm.models.discriminator import NLayerDiscriminator, hinge_d_loss, vanilla_d_loss
from ldm.models.lpips import LPIPS

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32)
SMALL_DISC = dict(disc_num_layers=2, disc_ndf=8)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random LPIPS weights saved in our layout (safetensors): nothing is downloaded."""
    torch.manual_seed(0)
    state = {k: v for k, v in LPIPS().state_dict().items() if k not in ("shift", "scale")}
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg16.safetensors"
    # LPIPS' linear heads are non-negative weights.
    save_file({k: v.abs() if k.startswith("lin") else v for k, v in state.items()}, str(path))
    return path


def _generator_step(
    loss_fn: AutoencoderLoss, step: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], AutoencoderKL, torch.Tensor]:
    model = AutoencoderKL(**TINY)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    loss, log = loss_fn.generator_loss(x, rec, post, step, last_layer=model.get_last_layer())
    return loss, log, model, x


def test_gan_weight_is_zero_before_disc_start_and_positive_after() -> None:
    loss_fn = AutoencoderLoss(disc_start=10, **SMALL_DISC)
    loss, log, _, _ = _generator_step(loss_fn, step=9)
    assert log["disc_factor"] == 0 and log["d_weight"] == 0 and log["g_loss"] == 0
    assert torch.isclose(loss, log["nll_loss"] + loss_fn.kl_weight * log["kl_loss"])
    loss, log, model, _ = _generator_step(loss_fn, step=10)
    assert log["disc_factor"] == 1.0
    assert torch.isfinite(log["d_weight"]) and 0 < log["d_weight"] <= 1e4 * loss_fn.disc_weight
    assert not log["d_weight"].requires_grad
    loss.backward()
    assert model.get_last_layer().grad is not None and torch.isfinite(loss)
    expected = {"rec_loss", "kl_loss", "nll_loss", "g_loss", "d_weight", "disc_factor", "logvar"}
    assert expected <= log.keys()


def test_adaptive_weight_matches_gradient_norm_ratio() -> None:
    loss_fn = AutoencoderLoss(disc_start=0, disc_weight=0.5, **SMALL_DISC)
    _, log, model, x = _generator_step(loss_fn, step=0)
    # Recompute eq. 7 of Esser et al. 2021 by hand.
    rec, post = model(x, generator=torch.Generator().manual_seed(0))
    last = model.get_last_layer()
    nll = (rec - x).abs().sum() / x.shape[0]  # logvar = 0
    g = -loss_fn.discriminator(rec).mean()
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g, last)[0]
    expected = 0.5 * g_nll.norm() / (g_gan.norm() + 1e-4)
    assert torch.allclose(log["d_weight"], expected, rtol=1e-4)


def test_adaptive_weight_falls_back_without_gradients() -> None:
    loss_fn = AutoencoderLoss(disc_start=0, **SMALL_DISC).eval()
    with torch.no_grad():
        loss, log, _, _ = _generator_step(loss_fn, step=5)
    assert log["d_weight"] == 0 and torch.isfinite(loss)
    model = AutoencoderKL(**TINY)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    rec, post = model(x)
    _, log = loss_fn.generator_loss(x, rec, post, 5, last_layer=None)
    assert log["d_weight"] == 0


def test_discriminator_loss_schedule_and_gradients() -> None:
    loss_fn = AutoencoderLoss(disc_start=3, **SMALL_DISC)
    x, rec = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    d_loss, log = loss_fn.discriminator_loss(x, rec, global_step=2)
    assert d_loss == 0 and log["disc_factor"] == 0
    d_loss, log = loss_fn.discriminator_loss(x, rec, global_step=3)
    assert d_loss > 0 and {"d_loss", "logits_real", "logits_fake"} <= log.keys()
    d_loss.backward()
    assert rec.grad is None  # reconstructions are detached
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_gan_losses_and_discriminator_layout() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))
    softplus = torch.nn.functional.softplus
    expected = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
    assert torch.isclose(vanilla_d_loss(real, fake), expected)
    disc = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    names = list(disc.state_dict())
    assert names[:2] == ["main.0.weight", "main.0.bias"] and "main.3.running_mean" in names
    assert disc(torch.randn(1, 3, 64, 64)).shape == (1, 1, 6, 6)  # 70x70 PatchGAN on 64x64
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633  # as taming's


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="rec_loss"):
        AutoencoderLoss(rec_loss="l3")
    with pytest.raises(ValueError, match="disc_loss"):
        AutoencoderLoss(disc_loss="wgan")
    loss_fn = AutoencoderLoss(rec_loss="l2", **SMALL_DISC)
    _, log, _, _ = _generator_step(loss_fn, step=0)
    assert log["rec_loss"] > 0


@pytest.mark.parametrize("path", [None, "/nonexistent/lpips_vgg16.safetensors"])
def test_missing_lpips_weights_give_one_line_error(path: str | None) -> None:
    with pytest.raises(FileNotFoundError) as err:
        AutoencoderLoss(perceptual_weight=1.0, lpips_weights=path)
    message = str(err.value)
    assert "\n" not in message
    assert "download" in message and "lpips_weights" in message
    assert "perceptual_weight=0" in message


def test_lpips_loads_local_file_and_is_zero_for_identical_images(lpips_file: Path) -> None:
    lpips = LPIPS(lpips_file)
    assert not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training  # frozen metric stays in eval mode
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    same, diff = lpips(x, x), lpips(x, y)
    assert same.shape == (2, 1, 1, 1) and same.abs().max() < 1e-6
    assert (diff > 0).all()
    diff.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_lpips_accepts_lpips_package_names(lpips_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(lpips_file))
    slices = {range(0, 4): 1, range(4, 9): 2, range(9, 16): 3, range(16, 23): 4, range(23, 30): 5}
    renamed = {}
    for key, value in ours.items():
        kind, idx, param = key.split(".") if key.startswith("features") else (key, "", "")
        if kind == "features":
            k = next(n for r, n in slices.items() if int(idx) in r)
            renamed[f"net.slice{k}.{idx}.{param}"] = value
        else:
            renamed[key.replace(".weight", ".model.1.weight")] = value
    path = tmp_path / "lpips_package_style.pth"
    torch.save(renamed, path)  # read back with torch.load(weights_only=True)
    x, y = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(LPIPS(path)(x, y), LPIPS(lpips_file)(x, y))
    torch.save({k: v for k, v in renamed.items() if "lin" not in k}, path)
    with pytest.raises(KeyError, match="lacks"):
        LPIPS(path)


def test_perceptual_term_enters_the_loss(lpips_file: Path) -> None:
    loss_fn = AutoencoderLoss(perceptual_weight=1.0, lpips_weights=str(lpips_file), **SMALL_DISC)
    _, log, _, _ = _generator_step(loss_fn, step=0)
    assert log["p_loss"] > 0
    assert not any(p.requires_grad for p in loss_fn.perceptual.parameters())


def test_lpips_weights_stay_out_of_checkpoints(lpips_file: Path) -> None:
    loss_fn = AutoencoderLoss(perceptual_weight=1.0, lpips_weights=str(lpips_file), **SMALL_DISC)
    state = loss_fn.state_dict()
    assert "logvar" in state and "discriminator.main.0.weight" in state
    assert not any(k.startswith("perceptual.") for k in state)
    wrapper = torch.nn.ModuleDict({"loss": loss_fn})  # nested, as inside a LightningModule
    assert not any(".perceptual." in k for k in wrapper.state_dict())
    state["logvar"] = torch.tensor(0.25)
    loss_fn.load_state_dict(state, strict=True)
    assert loss_fn.logvar.item() == 0.25
