"""The full sampling pipeline against diffusers' StableDiffusionPipeline on the same weights.

Same tiny random U-Net, autoencoder and CLIP text model (and tokenizer) in both; DDIM set up as
Stable Diffusion (scaled_linear, steps_offset 1, set_alpha_to_one=False, no clipping), 10 steps,
guidance 5 with a negative prompt, the same initial noise. diffusers' DDIM has
``init_noise_sigma = 1``, so its ``latents=`` are DDPM-space noise, which is what
``LatentDiffusion.generate(latents=...)`` takes. ``set_alpha_to_one=False`` ends at ᾱ_0, i.e.
σ_min, hence ``Sampler(..., set_alpha_to_one=False)`` here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ldm.checkpoint.unet_keys import unet_kwargs_to_diffusers_config, unet_ldm_to_diffusers
from ldm.checkpoint.vae_keys import vae_config_ldm_to_diffusers, vae_ldm_to_diffusers
from ldm.config import load, to_container
from ldm.diffusion import Sampler
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")

PROMPTS = ["the red", "a b c"]
NEGATIVE = "x y z"
STEPS, GUIDANCE, SIZE = 10, 5.0, 16


def diffusers_pipeline(model: Any, cfg: Any, clip_dir: Path) -> Any:
    """diffusers' StableDiffusionPipeline holding ``model``'s weights (built in memory)."""
    unet_kw = to_container(cfg.model.unet)
    unet = diffusers.UNet2DConditionModel(**unet_kwargs_to_diffusers_config(unet_kw))
    unet.load_state_dict(
        unet_ldm_to_diffusers(
            model.unet.state_dict(),
            unet_kw["channel_mult"],
            unet_kw["num_res_blocks"],
            unet_kw["attention_resolutions"],
        ),
        strict=True,
    )
    ae_kw = to_container(cfg.model.autoencoder)
    vae = diffusers.AutoencoderKL(**vae_config_ldm_to_diffusers(**ae_kw))
    vae.load_state_dict(vae_ldm_to_diffusers(model.autoencoder.state_dict()), strict=True)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False,
        prediction_type={"eps": "epsilon", "v": "v_prediction"}[cfg.model.diffusion.prediction],
    )  # fmt: skip
    return diffusers.StableDiffusionPipeline(
        vae=vae.eval(), unet=unet.eval(), scheduler=scheduler,
        text_encoder=transformers.CLIPTextModel.from_pretrained(clip_dir).eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_dir),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_generate_matches_stable_diffusion_pipeline(tmp_path: Path, prediction: str) -> None:
    clip_dir = tiny_clip_dir(tmp_path / "clip")
    config = tiny_config(clip_dir, sd2=prediction == "v", prediction=prediction)
    config["model"]["text_encoder"]["layer"] = "last"  # diffusers' pipeline (clip_skip=None)
    cfg = load(base=config)
    model = tiny_model(config, seed=42)
    pipe = diffusers_pipeline(model, cfg, clip_dir)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(
        len(PROMPTS), 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(7)
    )

    with torch.no_grad():
        theirs = pipe(
            prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), height=SIZE, width=SIZE,
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise.clone(),
            output_type="latent",
        ).images  # fmt: skip
        images, ours = model.generate(
            PROMPTS, Sampler("ddim", STEPS, set_alpha_to_one=False, disable_progress=True),
            guidance=GUIDANCE, negative_prompts=NEGATIVE, latents=noise.clone(),
        )  # fmt: skip
        decoded = pipe.vae.decode(theirs / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)

    scale = theirs.abs().max().item()
    assert scale > 0.5  # the U-Net did something
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4, f"final latents differ by {err:.2e} (scale {scale:.2f})"
    image_err = (images - decoded).abs().max().item()
    assert image_err <= 1e-4, f"decoded images differ by {image_err:.2e}"
