"""Inpainting with a 4-channel U-Net (latent blending) against diffusers'
StableDiffusionInpaintPipeline on the same weights: same image, mask, strength and generator →
same final latents."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.config import load
from ldm.diffusion import Sampler
from ldm.models.image_to_image import latent_mask
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model
from tests.test_pipeline_parity import GUIDANCE, NEGATIVE, PROMPTS, SIZE, diffusers_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.6), (6, 1.0)])
def test_inpaint_matches_diffusers(tmp_path: Path, steps: int, strength: float) -> None:
    clip_dir = tiny_clip_dir(tmp_path / "clip")
    config = tiny_config(clip_dir)
    model = tiny_model(config, seed=6)
    pipe = diffusers_pipeline(model, load(base=config), clip_dir)
    pipe.unet.register_to_config(sample_size=SIZE // 2)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    batch = len(PROMPTS)
    pixels = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    image = 2.0 * pixels - 1.0  # diffusers' normalisation of [0, 1] tensors
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[..., 4:12, 2:10] = 1.0  # repaint a window, keep the rest
    with torch.no_grad():
        theirs = inpaint(
            prompt=PROMPTS, negative_prompt=[NEGATIVE] * batch, image=pixels, mask_image=mask,
            strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
            height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(9),
            output_type="latent",
        ).images  # fmt: skip
        g = torch.Generator().manual_seed(9)  # diffusers' order: image posterior, then noise
        z0 = model.encode_images(image, g)
        noise = torch.randn(z0.shape, generator=g)
        _, ours = model.generate(
            PROMPTS, Sampler("ddim", steps, set_alpha_to_one=False, disable_progress=True),
            guidance=GUIDANCE, negative_prompts=NEGATIVE, latents=noise, init_latents=z0,
            strength=strength, mask=latent_mask(mask, model.downsample_factor),
        )  # fmt: skip
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * scale, f"final latents differ by {err:.2e} (scale {scale:.2f})"
    keep = latent_mask(mask, 2) == 0
    assert torch.allclose(ours, z0) is False
    assert (ours - z0).abs()[keep.expand_as(ours)].max().item() <= 1e-5  # kept region = init


def test_nine_channel_inpainting_unet_matches_diffusers(tmp_path: Path) -> None:
    """An SD inpainting U-Net (in_channels = 4 + 1 + 4): every call sees the noisy latents, the
    mask and the masked image's latents; strength 1 (diffusers' default for these)."""
    clip_dir = tiny_clip_dir(tmp_path / "clip")
    config = tiny_config(clip_dir)
    config["model"]["unet"]["in_channels"] = 9
    model = tiny_model(config, seed=8)
    pipe = diffusers_pipeline(model, load(base=config), clip_dir)
    pipe.unet.register_to_config(sample_size=SIZE // 2)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    batch, steps = len(PROMPTS), 6
    pixels = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(batch, 1, SIZE, SIZE)
    mask[..., 2:10, 6:16] = 1.0
    with torch.no_grad():
        theirs = inpaint(
            prompt=PROMPTS, negative_prompt=[NEGATIVE] * batch, image=pixels, mask_image=mask,
            strength=1.0, num_inference_steps=steps, guidance_scale=GUIDANCE, height=SIZE,
            width=SIZE, generator=torch.Generator().manual_seed(3), output_type="latent",
        ).images  # fmt: skip
        g = torch.Generator().manual_seed(3)  # diffusers' order at strength 1: noise, then
        noise = torch.randn(batch, 4, SIZE // 2, SIZE // 2, generator=g)  # the masked image
        image = 2.0 * pixels - 1.0
        masked = model.encode_images(image * (mask < 0.5), g)
        _, ours = model.generate(
            PROMPTS, Sampler("ddim", steps, set_alpha_to_one=False, disable_progress=True),
            guidance=GUIDANCE, negative_prompts=NEGATIVE, latents=noise,
            init_latents=torch.zeros_like(noise), strength=1.0,
            mask=latent_mask(mask, model.downsample_factor), masked_latents=masked,
        )  # fmt: skip
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * scale, f"final latents differ by {err:.2e} (scale {scale:.2f})"


def test_sample_cli_with_an_inpainting_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    from PIL import Image

    import sample
    from ldm.checkpoint.diffusers_layout import export_diffusers_folder

    config = tiny_config(tiny_clip_dir(tmp_path / "clip"))
    config["model"]["unet"]["in_channels"] = 9
    folder = export_diffusers_folder(
        tiny_model(config, seed=1), load(base=config), tmp_path / "pipe"
    )
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), np.uint8)
    mask[:8] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "--prompt",
                "a b",
                "--steps",
                "3",
                "--init-image",
                str(tmp_path / "init.png"),
                "--mask",
                str(tmp_path / "mask.png"),
                "--strength",
                "1",
                "--outdir",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(next(out.glob("0000-*.png"))).size == (16, 16)
    capsys.readouterr()
    assert sample.main(["--ckpt", str(folder), "--prompt", "a b", "--outdir", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "SD inpainting U-Net (9 input channels)" in err[0]
