"""Classifier-free guidance: identities, one batched call, whole-output guidance, rescale."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg
from torch import Tensor, nn

from ldm.diffusion import CFGDenoiser, Denoiser, NoiseSchedule, rescale_guidance


class ContextNet(nn.Module):
    """Elementwise in the batch (so batching cannot change a sample's bits); counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.calls.append(x.shape[0])
        s = t.view(-1, 1, 1, 1) / 1000
        c = context.mean(dim=1).view(x.shape[0], -1, 1, 1)  # (B, C, 1, 1) from (B, L, C)
        return x * (0.5 + s) + c * torch.cos(3 * s) + 0.1 * x.flip(1)


def make(prediction: str = "eps") -> tuple[ContextNet, Denoiser, dict[str, Any]]:
    net = ContextNet()
    denoiser = Denoiser(net, NoiseSchedule(), prediction)
    g = torch.Generator().manual_seed(0)
    data = {
        "x": torch.randn(3, 4, 6, 6, generator=g) * 3,
        "sigma": torch.tensor([2.0, 0.7, 9.0]),
        "cond": {"context": torch.randn(3, 5, 4, generator=g)},
        "uncond": {"context": torch.randn(3, 5, 4, generator=g)},
    }
    return net, denoiser, data


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_scale_one_is_conditional_and_zero_is_unconditional(prediction: str) -> None:
    net, denoiser, d = make(prediction)
    cond = denoiser(d["x"], d["sigma"], **d["cond"])
    uncond = denoiser(d["x"], d["sigma"], **d["uncond"])
    net.calls.clear()
    one = CFGDenoiser(denoiser, d["cond"], d["uncond"], scale=1.0)(d["x"], d["sigma"])
    zero = CFGDenoiser(denoiser, d["cond"], d["uncond"], scale=0.0)(d["x"], d["sigma"])
    assert torch.equal(one, cond)
    assert torch.equal(zero, uncond)
    assert net.calls == [6, 6]  # one batched forward of [uncond, cond] per call


def test_guides_the_whole_output() -> None:
    _, denoiser, d = make("v")
    scale = 7.5
    cond = denoiser(d["x"], d["sigma"], **d["cond"])
    uncond = denoiser(d["x"], d["sigma"], **d["uncond"])
    guided = CFGDenoiser(denoiser, d["cond"], d["uncond"], scale=scale)(d["x"], d["sigma"])
    expected = uncond + scale * (cond - uncond)  # Ho & Salimans 2022, eq. 6
    assert torch.allclose(guided, expected, atol=1e-5)
    # every channel is guided (DiT guided only 3 of 4)
    for ch in range(guided.shape[1]):
        assert not torch.allclose(guided[:, ch], cond[:, ch])


def test_guiding_x0_equals_guiding_network_output() -> None:
    """Guiding x̂0 equals guiding ε̂ (what diffusers does) then converting."""
    net, denoiser, d = make("eps")
    x, sigma, scale = d["x"], d["sigma"], 5.0
    x_t = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5
    t = denoiser.schedule.sigma_to_t(sigma)
    eps_c, eps_u = net(x_t, t, **d["cond"]), net(x_t, t, **d["uncond"])
    eps = eps_u + scale * (eps_c - eps_u)
    expected = x - sigma.view(-1, 1, 1, 1) * eps
    guided = CFGDenoiser(denoiser, d["cond"], d["uncond"], scale=scale)(x, sigma)
    assert torch.allclose(guided, expected, atol=1e-4)


def test_negative_prompt_is_just_another_uncond() -> None:
    _, denoiser, d = make()
    negative = {"context": d["uncond"]["context"] * -2}
    plain = CFGDenoiser(denoiser, d["cond"], d["uncond"], scale=4.0)(d["x"], d["sigma"])
    neg = CFGDenoiser(denoiser, d["cond"], negative, scale=4.0)(d["x"], d["sigma"])
    neg_out = denoiser(d["x"], d["sigma"], **negative)
    cond = denoiser(d["x"], d["sigma"], **d["cond"])
    assert not torch.allclose(plain, neg)
    assert torch.allclose(neg, neg_out + 4.0 * (cond - neg_out), atol=1e-5)


def test_rescale_formula_matches_diffusers() -> None:
    g = torch.Generator().manual_seed(1)
    guided, cond = torch.randn(4, 4, 8, 8, generator=g) * 3, torch.randn(4, 4, 8, 8, generator=g)
    for phi in (0.0, 0.7, 1.0):
        ours = rescale_guidance(guided, cond, phi)
        assert torch.equal(ours, rescale_noise_cfg(guided, cond, guidance_rescale=phi))
    # φ = 1 matches the conditional std exactly (Lin et al. 2024, eq. 16)
    full = rescale_guidance(guided, cond, 1.0)
    assert torch.allclose(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_rescaled_cfg_matches_diffusers_pipeline(prediction: str) -> None:
    """Applied the same way as diffusers (on the network's output): same x̂0."""
    net, denoiser, d = make(prediction)
    x, sigma, scale, phi = d["x"], d["sigma"], 7.5, 0.7
    s = sigma.view(-1, 1, 1, 1)
    alpha = 1 / (s**2 + 1) ** 0.5
    x_t = x * alpha
    t = denoiser.schedule.sigma_to_t(sigma)
    out_c, out_u = net(x_t, t, **d["cond"]), net(x_t, t, **d["uncond"])
    out = rescale_noise_cfg(out_u + scale * (out_c - out_u), out_c, guidance_rescale=phi)
    expected = x - s * out if prediction == "eps" else alpha * x_t - s * alpha * out
    cfg = CFGDenoiser(denoiser, d["cond"], d["uncond"], scale=scale, rescale=phi)
    assert cfg.rescale_space == prediction
    assert torch.allclose(cfg(x, sigma), expected, atol=1e-4)


def test_condition_mismatch_errors() -> None:
    _, denoiser, d = make()
    with pytest.raises(ValueError, match="same keys"):
        CFGDenoiser(denoiser, d["cond"], {"y": torch.zeros(3)})
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        CFGDenoiser(denoiser, d["cond"], d["uncond"], rescale_space="score")
