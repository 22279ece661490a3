"""SDXL sampling against diffusers' StableDiffusionXLPipeline.from_pretrained of the same tiny
random SDXL folder (saved with save_pretrained): same weights, same initial noise, guidance
with negative prompts, size/crop micro-conditioning at diffusers' defaults and set explicitly.
Final latents agree to 1e-4 relative (float32, CPU) for DDIM and Euler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.sdxl_layout import load_sdxl_folder
from ldm.diffusion import Sampler
from tests.models.sdxl_tiny import build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")

PROMPTS, NEGATIVES = ["the red", "a b c"], ["x y z", "th"]
STEPS, GUIDANCE, HEIGHT, WIDTH = 8, 5.0, 16, 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
@pytest.mark.parametrize("sizes", [None, ((64, 40), (8, 4), (32, 48))])
def test_final_latents_match_stable_diffusion_xl_pipeline(
    folder: Path, sampler: str, sizes: tuple | None
) -> None:
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if sampler == "ddim":
        pipe.scheduler = diffusers.DDIMScheduler.from_config(
            pipe.scheduler.config, set_alpha_to_one=False, clip_sample=False)  # fmt: skip
        ours_sampler = Sampler("ddim", STEPS, set_alpha_to_one=False, disable_progress=True)
    else:
        ours_sampler = Sampler("euler", STEPS, disable_progress=True)
    model = load_sdxl_folder(folder)
    assert model.autoencoder.scale_factor.item() == pytest.approx(0.13025)
    extra = {}
    if sizes is not None:
        model.original_size, model.crop_top_left, model.target_size = sizes
        extra = dict(original_size=sizes[0], crops_coords_top_left=sizes[1],
                     target_size=sizes[2])  # fmt: skip
    noise = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        theirs = pipe(
            prompt=PROMPTS, negative_prompt=NEGATIVES, height=HEIGHT, width=WIDTH,
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise.clone(),
            output_type="latent", **extra,
        ).images  # fmt: skip
        _, ours = model.generate(PROMPTS, ours_sampler, guidance=GUIDANCE,
                                 negative_prompts=NEGATIVES, latents=noise.clone())  # fmt: skip
    assert theirs.abs().max() > 0.5
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel <= 1e-4, f"final latents differ by {rel:.2e} relative"


def test_default_negative_is_zeros_as_diffusers(folder: Path) -> None:
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.force_zeros_for_empty_prompt
    model = load_sdxl_folder(folder)
    noise = torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(9))
    sampler = Sampler("euler", STEPS, disable_progress=True)
    with torch.no_grad():
        theirs = pipe(
            prompt=PROMPTS,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=noise.clone(),
            output_type="latent",
        ).images
        _, ours = model.generate(PROMPTS, sampler, guidance=GUIDANCE, latents=noise.clone())
        model.zero_empty_prompts = False
        _, encoded = model.generate(PROMPTS, sampler, guidance=GUIDANCE, latents=noise.clone())
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel <= 1e-4, f"final latents differ by {rel:.2e} relative"
    assert ((encoded - theirs).norm() / theirs.norm()).item() > 1e-3  # "" encoded differs
