"""img2img with a flow-matching model: the init latents go on the straight path x_t = (1 − t)·z0 +
t·ε at the grid's t for ``strength`` and the tail of the grid runs, as diffusers' SD3 img2img
pipeline does with FlowMatchEulerDiscreteScheduler (``set_begin_index``, ``scale_noise``,
``step``), compared through that public API on the same U-Net, init latents and noise."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ldm.diffusion import Sampler
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model
from tests.test_pipeline_parity import PROMPTS, SIZE

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")


def flow_config(clip_dir: Path, shift: float) -> dict:
    config = copy.deepcopy(tiny_config(clip_dir))
    config["model"]["diffusion"] = {"objective": "flow", "flow_shift": shift}
    return config


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_dir(tmp_path_factory.mktemp("clip") / "clip")


@pytest.mark.parametrize(
    ("steps", "strength", "shift"), [(10, 0.6, 1.0), (7, 0.3, 3.0), (5, 1.0, 3.0)]
)
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_flow_img2img_matches_flow_match_scheduler(
    clip_dir: Path, sampler: str, steps: int, strength: float, shift: float
) -> None:
    model = tiny_model(flow_config(clip_dir, shift), seed=5)
    shape = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    cls = {"euler": "FlowMatchEulerDiscreteScheduler", "heun": "FlowMatchHeunDiscreteScheduler"}[
        sampler
    ]
    sch = getattr(diffusers, cls)(shift=shift)
    sch.set_timesteps(steps)
    # StableDiffusion3Img2ImgPipeline.get_timesteps, then scale_noise at the first of them
    t_start = steps - min(int(steps * strength), steps)
    timesteps = sch.timesteps[t_start * sch.order :]
    if hasattr(sch, "set_begin_index"):
        sch.set_begin_index(t_start * sch.order)
    if sampler == "euler":
        x = sch.scale_noise(init, timesteps[:1], noise)
    else:  # the Heun scheduler has no scale_noise: the same straight path at its sigma
        s = sch.sigmas[t_start * sch.order]
        x = (1 - s) * init + s * noise
    cond = model.prompt_conditioning(PROMPTS, torch.device("cpu"), torch.float32, (SIZE, SIZE))
    with torch.no_grad():
        for t in timesteps:
            v = model.unet(x, t.expand(len(PROMPTS)).float(), **cond)
            x = sch.step(v, t, x).prev_sample
        _, ours = model.generate(
            PROMPTS,
            Sampler(sampler, steps, disable_progress=True),
            guidance=1.0,
            latents=noise,
            init_latents=init,
            strength=strength,
        )
    err = float((ours - x).abs().max()) / float(x.abs().max())
    assert err <= 1e-4, err
    assert float((x - init).abs().max()) > 1e-2  # the sampler changed the init


def test_flow_img2img_stays_near_the_init_at_low_strength(clip_dir: Path) -> None:
    """At strength s the start is x_t = (1 − t)·z0 + t·ε with t = the grid's t at the first step
    run (≈ s at shift 1); the stochastic sampler runs img2img too, from its own seed."""
    model = tiny_model(flow_config(clip_dir, 1.0), seed=3)
    shape = (1, 4, SIZE // 2, SIZE // 2)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    starts = []

    def first(info: dict) -> None:
        if info["i"] == 0:
            starts.append(info)

    dist = {}
    for strength in (0.2, 0.9):
        starts.clear()
        _, z = model.generate(
            ["a b"],
            Sampler("euler_sde", 10, disable_progress=True),
            guidance=1.0,
            latents=noise,
            init_latents=init,
            strength=strength,
            generator=torch.Generator().manual_seed(4),
            callback=first,
        )
        sigma = float(starts[0]["sigma"])
        t = sigma / (1 + sigma)
        assert abs(t - strength) < 0.1, (t, strength)
        x_t = starts[0]["x"]  # the flow samplers report their state x_t
        torch.testing.assert_close(x_t, (1 - t) * init + t * noise, rtol=1e-5, atol=1e-5)
        dist[strength] = float((z - init).norm())
    assert dist[0.2] < dist[0.9], dist
