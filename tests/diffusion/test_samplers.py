"""Samplers: parity with diffusers' schedulers, registry, statelessness, callbacks."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from torch import Tensor, nn

from ldm.diffusion import (
    Denoiser,
    NoiseSchedule,
    Sampler,
    get_sampler,
    get_sigmas,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sigmas_for_timesteps,
)

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


class ToyNet(nn.Module):
    """A fixed random, deterministic function of (x_t, t): channel mix scaled by a smooth f(t)."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "mix", torch.eye(channels) + 0.1 * torch.randn(channels, channels, generator=g)
        )
        self.register_buffer("bias", 0.1 * torch.randn(channels, generator=g))

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        s = t.float().reshape(-1, 1, 1, 1) / 1000  # (B, 1, 1, 1)
        y = torch.einsum("oc,bchw->bohw", self.mix, x)
        return y * torch.sin(0.3 + 1.2 * s) + self.bias.view(1, -1, 1, 1) * torch.cos(4.0 * s)


NET = ToyNet()


def run_diffusers(
    scheduler: Any, steps: int, noise: Tensor, seed: int | None, **step_kw: Any
) -> Tensor:
    """The standard diffusers denoising loop with the toy network."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for t in scheduler.timesteps:
        out = NET(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        kw = dict(step_kw, generator=gen) if gen is not None else step_kw
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


@dataclass
class Case:
    """One parity case: a diffusers scheduler and our sampler on the same grid."""

    name: str
    cls: type
    fn: Callable[..., Tensor]
    spacing: str = "leading"
    offset: int = 0
    karras: bool = False
    steps: int = 15
    seed: int | None = None  # stochastic: same generator seed on both sides
    sched_kw: dict[str, Any] = field(default_factory=dict)
    step_kw: dict[str, Any] = field(default_factory=dict)
    ours_kw: dict[str, Any] = field(default_factory=dict)
    quantize: bool = False
    zero_snr: bool = False
    vp_state: bool = True  # diffusers' state is x_t (DDIM/DDPM/DPM) rather than σ-space x
    timesteps_from_diffusers: bool = False  # use the scheduler's own (DPM) timestep grid

    def __str__(self) -> str:
        bits = [self.name, self.spacing + (f"+{self.offset}" if self.offset else "")]
        bits += ["karras"] * self.karras + ["zsnr"] * self.zero_snr
        bits += ["own-grid"] * self.timesteps_from_diffusers
        return "-".join(bits)


DDIM_KW = {"clip_sample": False}
CASES = [
    Case("ddim", DDIMScheduler, sample_ddim, "leading", 1, steps=20, sched_kw=DDIM_KW),
    Case("ddim", DDIMScheduler, sample_ddim, "trailing", steps=20, sched_kw=DDIM_KW),
    Case(
        "ddim_eta1",
        DDIMScheduler,
        sample_ddim,
        "leading",
        1,
        steps=20,
        seed=3,
        sched_kw=DDIM_KW,
        step_kw={"eta": 1.0},
        ours_kw={"eta": 1.0},
    ),
    Case(
        "ddim_eta1",
        DDIMScheduler,
        sample_ddim,
        "trailing",
        steps=20,
        seed=3,
        sched_kw=DDIM_KW,
        step_kw={"eta": 1.0},
        ours_kw={"eta": 1.0},
    ),
    Case("ddpm", DDPMScheduler, sample_ddpm, "leading", seed=4, sched_kw=DDIM_KW),
    Case("ddpm", DDPMScheduler, sample_ddpm, "leading", 1, seed=4, sched_kw=DDIM_KW),
    Case("ddpm", DDPMScheduler, sample_ddpm, "trailing", seed=4, sched_kw=DDIM_KW),
    Case("euler", EulerDiscreteScheduler, sample_euler, "linspace", vp_state=False),
    Case("euler", EulerDiscreteScheduler, sample_euler, "leading", 1, vp_state=False),
    Case("euler", EulerDiscreteScheduler, sample_euler, "trailing", vp_state=False),
    Case("euler", EulerDiscreteScheduler, sample_euler, "linspace", karras=True, vp_state=False),
    Case("euler", EulerDiscreteScheduler, sample_euler, "trailing", zero_snr=True, vp_state=False),
    Case(
        "euler_a",
        EulerAncestralDiscreteScheduler,
        sample_euler_ancestral,
        "linspace",
        seed=5,
        vp_state=False,
    ),
    Case(
        "euler_a",
        EulerAncestralDiscreteScheduler,
        sample_euler_ancestral,
        "leading",
        1,
        seed=5,
        vp_state=False,
    ),
    Case(
        "euler_a",
        EulerAncestralDiscreteScheduler,
        sample_euler_ancestral,
        "trailing",
        seed=5,
        zero_snr=True,
        vp_state=False,
    ),
    Case("heun", HeunDiscreteScheduler, sample_heun, "linspace", vp_state=False),
    Case("heun", HeunDiscreteScheduler, sample_heun, "leading", 1, vp_state=False),
    Case("heun", HeunDiscreteScheduler, sample_heun, "linspace", karras=True, vp_state=False),
    Case("dpmpp_2m", DPMSolverMultistepScheduler, sample_dpmpp_2m, "trailing"),
    Case("dpmpp_2m", DPMSolverMultistepScheduler, sample_dpmpp_2m, "trailing", zero_snr=True),
    Case(
        "dpmpp_2m",
        DPMSolverMultistepScheduler,
        sample_dpmpp_2m,
        "linspace",
        karras=True,
        quantize=True,
    ),
    Case(
        "dpmpp_2m",
        DPMSolverMultistepScheduler,
        sample_dpmpp_2m,
        "linspace",
        timesteps_from_diffusers=True,
    ),
    Case(
        "dpmpp_2m",
        DPMSolverMultistepScheduler,
        sample_dpmpp_2m,
        "leading",
        1,
        steps=20,
        timesteps_from_diffusers=True,
    ),
]


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parity_with_diffusers(case: Case, prediction: str) -> None:
    if case.zero_snr and prediction == "eps":
        pytest.skip("zero terminal SNR needs v (or x0) prediction")
    sched_kw = dict(
        SD,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
        timestep_spacing=case.spacing,
        steps_offset=case.offset,
        **case.sched_kw,
    )
    if case.karras:
        sched_kw["use_karras_sigmas"] = True
    if case.zero_snr:
        sched_kw["rescale_betas_zero_snr"] = True
    scheduler = case.cls(**sched_kw)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = run_diffusers(scheduler, case.steps, noise, case.seed, **case.step_kw)

    schedule = NoiseSchedule("scaled_linear", zero_terminal_snr=case.zero_snr)
    if case.timesteps_from_diffusers:
        sigmas = sigmas_for_timesteps(schedule, scheduler.timesteps)
    else:
        sigmas = get_sigmas(schedule, case.steps, case.spacing, case.offset, case.karras)
    # same initial noise: diffusers' x_T (VP) or its σ-space x (Euler-family)
    scale = math.sqrt(1 + sigmas[0].item() ** 2) if case.vp_state else scheduler.init_noise_sigma
    x = noise * scale
    opts = dict(case.ours_kw, disable_progress=True)
    if case.seed is not None:
        opts["generator"] = torch.Generator().manual_seed(case.seed)
    denoiser = Denoiser(NET, schedule, prediction, quantize_timesteps=case.quantize)
    ours = case.fn(denoiser, x, sigmas, **opts)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.2e} (sample scale {ref.abs().max().item():.2f})"


def test_sampler_class_matches_sd_ddim_config() -> None:
    """Stable Diffusion's DDIM set-up: leading + offset 1, set_alpha_to_one=False."""
    scheduler = DDIMScheduler(
        **SD,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = run_diffusers(scheduler, 25, noise, None)
    schedule = NoiseSchedule("scaled_linear")
    sampler = Sampler("ddim", 25, set_alpha_to_one=False, disable_progress=True)
    ours = sampler(Denoiser(NET, schedule, "v"), noise, schedule)
    assert (ours - ref).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Registry, statelessness, callbacks, progress
# ---------------------------------------------------------------------------------------------


def test_unknown_sampler_is_one_line_error() -> None:
    with pytest.raises(ValueError) as info:
        get_sampler("plms")
    message = str(info.value)
    assert "\n" not in message and "'plms'" in message
    assert "ddim, ddpm, euler, euler_a, heun, dpmpp_2m" in message
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'"):
        Sampler("k_lms")


def test_stateless_resume_from_any_step() -> None:
    """No hidden step counter: running sigmas[k:] from the state at step k finishes identically."""
    schedule = NoiseSchedule()
    denoiser = Denoiser(NET, schedule, "v")
    sigmas = get_sigmas(schedule, 12, "trailing", 0)
    x = torch.randn(2, 4, 8, 8) * math.sqrt(1 + sigmas[0].item() ** 2)
    for fn in (sample_dpmpp_2m, sample_heun, sample_euler):
        states: list[dict[str, Any]] = []
        full = fn(denoiser, x, sigmas, disable_progress=True, callback=states.append)
        again = fn(denoiser, x, sigmas, disable_progress=True)
        assert torch.equal(full, again)
        if fn is not sample_dpmpp_2m:  # multistep methods restart at first order
            resumed = fn(denoiser, states[5]["x"], sigmas[5:], disable_progress=True)
            assert torch.equal(resumed, full)


def test_callback_and_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    schedule = NoiseSchedule()
    sigmas = get_sigmas(schedule, 6)
    seen: list[dict[str, Any]] = []
    x = torch.randn(1, 4, 4, 4)
    sample_euler(Denoiser(NET, schedule), x, sigmas, callback=seen.append, disable_progress=False)
    assert [d["i"] for d in seen] == list(range(6))
    assert set(seen[0]) == {"i", "x", "sigma", "sigma_next", "denoised"}
    assert "sampling" in capsys.readouterr().err
    sample_euler(Denoiser(NET, schedule), x, sigmas, disable_progress=True)
    assert capsys.readouterr().err == ""


def test_eta_zero_ddim_is_deterministic_and_generator_reproducible() -> None:
    schedule = NoiseSchedule()
    denoiser = Denoiser(NET, schedule)
    noise = torch.randn(2, 4, 8, 8)
    for name in ("ddpm", "euler_a"):
        sampler = Sampler(name, 8, disable_progress=True)
        a = sampler(denoiser, noise, schedule, generator=torch.Generator().manual_seed(7))
        b = sampler(denoiser, noise, schedule, generator=torch.Generator().manual_seed(7))
        c = sampler(denoiser, noise, schedule, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
    ddim = Sampler("ddim", 8, eta=0.0, disable_progress=True)
    euler = Sampler("euler", 8, disable_progress=True)
    assert torch.allclose(
        ddim(denoiser, noise, schedule), euler(denoiser, noise, schedule), atol=1e-5
    )
