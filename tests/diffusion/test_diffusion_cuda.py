"""CUDA: the diffusion core runs on the GPU and agrees with the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ldm.diffusion import (
    SAMPLERS,
    CFGDenoiser,
    Denoiser,
    DiffusionLoss,
    NoiseSchedule,
    Sampler,
)

pytestmark = pytest.mark.gpu


def net(x_t: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
    s = t.view(-1, 1, 1, 1) / 1000
    out = x_t * torch.sin(0.3 + 1.2 * s) + 0.1 * x_t.flip(1)
    if context is not None:
        out = out + context.mean(dim=1).view(x_t.shape[0], -1, 1, 1)
    return out


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_on_cuda_match_cpu(name: str) -> None:
    noise = torch.randn(2, 4, 8, 8)
    cond = {"context": torch.randn(2, 3, 4)}
    uncond = {"context": torch.zeros(2, 3, 4)}
    outs = []
    for device in ("cpu", "cuda"):
        schedule = NoiseSchedule(zero_terminal_snr=True).to(device)
        on = {k: v.to(device) for k, v in cond.items()}
        off = {k: v.to(device) for k, v in uncond.items()}
        denoiser = CFGDenoiser(Denoiser(net, schedule, "v"), on, off, scale=3.0, rescale=0.5)
        sampler = Sampler(name, 10, eta=0.5, karras=True, disable_progress=True)
        # a CPU generator drives CUDA sampling: same noise on both devices
        gen = torch.Generator().manual_seed(0)
        outs.append(sampler(denoiser, noise.to(device), schedule, generator=gen).cpu())
    assert torch.allclose(outs[0], outs[1], atol=1e-4)


def test_loss_on_cuda_matches_cpu() -> None:
    x0 = torch.randn(8, 4, 8, 8)
    loss = DiffusionLoss("v", "min_snr", offset_noise=0.1, timestep_sampling="stratified")
    outs = []
    for device in ("cpu", "cuda"):
        schedule = NoiseSchedule().to(device)
        gen = torch.Generator().manual_seed(0)
        outs.append(loss(net, x0.to(device), schedule, generator=gen))
    assert torch.equal(outs[0].t, outs[1].t.cpu())
    assert torch.allclose(outs[0].loss, outs[1].loss.cpu(), rtol=1e-4)
