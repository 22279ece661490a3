"""Training loss: targets, min-SNR weights, oracle zero loss, timestep sampling, offset noise."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor

from ldm.diffusion import (
    DiffusionLoss,
    NoiseSchedule,
    diffusion_loss,
    min_snr_weight,
    offset_noise,
    output_to_x0_eps,
    prediction_target,
    sample_timesteps,
)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_formula(gamma: float) -> None:
    snr = torch.tensor([0.0, 0.01, 0.5, 1.0, 4.0, 5.0, 20.0, 1e4])
    clipped = torch.minimum(snr, torch.tensor(gamma))
    assert torch.allclose(min_snr_weight(snr, "x0", gamma), clipped)
    eps = min_snr_weight(snr, "eps", gamma)
    assert torch.allclose(eps[1:], clipped[1:] / snr[1:])
    assert eps[0] == 1.0  # zero SNR: min(SNR, γ)/SNR → 1
    assert torch.allclose(min_snr_weight(snr, "v", gamma), clipped / (snr + 1))


def test_v_target_matches_diffusers_velocity() -> None:
    sched = NoiseSchedule("scaled_linear")
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, noise, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([3, 400, 999])
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(t))
    ours = prediction_target("v", x0, noise, alpha, sigma)
    assert torch.allclose(ours, ref.get_velocity(x0, noise, t), atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_output_to_x0_eps_inverts_targets(prediction: str) -> None:
    sched = NoiseSchedule()
    x0, noise, t = torch.randn(3, 4, 4, 4), torch.randn(3, 4, 4, 4), torch.tensor([5, 500, 990])
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(t))
    x_t = alpha * x0 + sigma * noise
    target = prediction_target(prediction, x0, noise, alpha, sigma)
    got_x0, got_eps = output_to_x0_eps(prediction, target, x_t, alpha, sigma)
    assert torch.allclose(got_x0, x0, atol=1e-3)
    assert torch.allclose(got_eps, noise, atol=1e-3)


class Oracle:
    """A perfect network: knows x0 and reads ε off x_t."""

    def __init__(self, x0: Tensor, schedule: NoiseSchedule, prediction: str) -> None:
        self.x0, self.schedule, self.prediction = x0, schedule, prediction

    def __call__(self, x_t: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        assert t.dtype == torch.float32 and t.shape == (x_t.shape[0],)
        alpha, sigma = (c.view(-1, 1, 1, 1) for c in self.schedule.alpha_sigma(t.long()))
        eps = (x_t - alpha * self.x0) / sigma
        return prediction_target(self.prediction, self.x0, eps, alpha, sigma)


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("weighting", ["uniform", "min_snr"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_perfect_network_has_zero_loss(prediction: str, weighting: str, zero_snr: bool) -> None:
    if zero_snr and prediction == "eps":
        pytest.skip("ε is not identifiable from x_t at zero SNR")
    sched = NoiseSchedule("scaled_linear", zero_terminal_snr=zero_snr)
    x0 = torch.randn(16, 4, 8, 8)
    t = torch.tensor([0, 1, 998, 999] + list(range(100, 1000, 75)))[:16]
    out = diffusion_loss(
        Oracle(x0, sched, prediction),
        x0,
        sched,
        {"context": torch.zeros(16, 2, 3)},
        prediction=prediction,
        loss_weighting=weighting,
        offset_noise=0.1,
        t=t,
    )
    assert out.loss.shape == (16,) and torch.equal(out.t, t)
    assert out.loss.max().item() < 1e-8


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_value_and_weighting(prediction: str) -> None:
    sched = NoiseSchedule()
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([10, 200, 600, 950])

    def net(x_t: Tensor, t: Tensor) -> Tensor:
        return 0.3 * x_t

    plain = diffusion_loss(net, x0, sched, prediction=prediction, t=t, noise=noise).loss
    weighted = diffusion_loss(
        net, x0, sched, prediction=prediction, loss_weighting="min_snr", t=t, noise=noise
    ).loss
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(t))
    x_t = alpha * x0 + sigma * noise
    target = prediction_target(prediction, x0, noise, alpha, sigma)
    expected = ((0.3 * x_t - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(plain, expected, rtol=1e-5)
    w = min_snr_weight(sched.snr(t), prediction, 5.0)
    assert torch.allclose(weighted, expected * w, rtol=1e-5)


def test_generator_makes_loss_reproducible() -> None:
    sched = NoiseSchedule()
    x0 = torch.randn(8, 4, 4, 4)
    loss = DiffusionLoss(prediction="v", offset_noise=0.1, timestep_sampling="stratified")

    def net(x_t: Tensor, t: Tensor) -> Tensor:
        return x_t * 0.5

    a = loss(net, x0, sched, generator=torch.Generator().manual_seed(3))
    b = loss(net, x0, sched, generator=torch.Generator().manual_seed(3))
    c = loss(net, x0, sched, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.t, b.t)
    assert not torch.equal(a.loss, c.loss)


@pytest.mark.parametrize("batch", [1, 7, 8, 64])
def test_stratified_timesteps_cover_every_stratum(batch: int) -> None:
    """One draw per stratum [i·T/B, (i+1)·T/B) of [0, T), in shuffled batch order."""
    for seed in range(5):
        t = sample_timesteps(batch, 1000, "stratified", torch.Generator().manual_seed(seed))
        assert t.dtype == torch.int64 and t.shape == (batch,)
        for i, ti in enumerate(sorted(t.tolist())):
            assert i * 1000 // batch <= ti < (i + 1) * 1000 / batch
        if batch == 8:  # T/B integer: exactly one t per integer stratum
            assert sorted((t // 125).tolist()) == list(range(8))
        if batch == 64:
            assert t.tolist() != sorted(t.tolist())


def test_uniform_timesteps_range() -> None:
    t = sample_timesteps(20000, 1000, "uniform", torch.Generator().manual_seed(0))
    assert t.min() == 0 and t.max() == 999
    assert abs(t.float().mean().item() - 499.5) < 10


def test_offset_noise_statistics() -> None:
    like = torch.zeros(256, 4, 16, 16)
    g = torch.Generator().manual_seed(0)
    plain = offset_noise(like, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain, torch.randn(like.shape, generator=torch.Generator().manual_seed(0)))
    noisy = offset_noise(like, 1.0, g)
    # per-(sample, channel) means: variance 1/HW without offset, 1 + 1/HW with strength 1
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.15)
    assert noisy.mean(dim=(2, 3)).var().item() == pytest.approx(1 + 1 / 256, rel=0.15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prediction": "score"}, "unknown prediction 'score'"),
        ({"loss_weighting": "p2"}, "unknown loss weighting 'p2'"),
        ({"timestep_sampling": "sobol"}, "unknown timestep sampling 'sobol'"),
    ],
)
def test_option_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiffusionLoss(**kwargs)
