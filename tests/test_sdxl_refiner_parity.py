"""The SDXL refiner (second encoder only, aesthetic-score conditioning) against diffusers'
StableDiffusionXLImg2ImgPipeline on a tiny random refiner folder: same init latents, same
noise, same final latents, at diffusers' default scores (6.0 / 2.5) and at others; sample.py's
--aesthetic-score flags change the image and are refused for a base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm import assemble
from ldm.diffusion import Sampler
from tests.models.sdxl_tiny import build_tiny_refiner

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_refiner(tmp_path_factory.mktemp("refiner"))


@pytest.mark.parametrize(("scores", "negative"), [(None, None), ((3.0, 7.5), "th")])
def test_refiner_img2img_matches_diffusers(
    folder: Path, scores: tuple[float, float] | None, negative: str | None
) -> None:
    model, _ = assemble.load_for_sampling(folder)
    assert model.is_refiner and not model.zero_empty_prompts
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(
        pipe.scheduler.config, clip_sample=False, set_alpha_to_one=True
    )
    pipe.set_progress_bar_config(disable=True)
    shape = (2, 4, 8, 12)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    extra = (
        {}
        if scores is None
        else {"aesthetic_score": scores[0], "negative_aesthetic_score": scores[1]}
    )
    with torch.no_grad():
        theirs = pipe(prompt=["the red", "re"], negative_prompt=negative and [negative] * 2,
                      image=init.clone(), strength=0.6, num_inference_steps=8,
                      guidance_scale=5.0, generator=torch.Generator().manual_seed(9),
                      output_type="latent", **extra).images  # fmt: skip
        for key, value in extra.items():
            setattr(model, key, value)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
        _, ours = model.generate(["the red", "re"], Sampler("ddim", 8, disable_progress=True),
                                 guidance=5.0, negative_prompts=negative or "", latents=noise,
                                 init_latents=init, strength=0.6)  # fmt: skip
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * scale, f"final latents differ by {err:.2e} (scale {scale:.2f})"
    assert (theirs - init).abs().max().item() > 1e-2  # the sampler changed the init


def test_sample_py_aesthetic_score_flags(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import numpy as np
    from PIL import Image

    import sample
    from tests.models.sdxl_tiny import build_tiny_sdxl

    pixels = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    common = ["--ckpt", str(folder), "--prompt", "the red", "--init-image",
              str(tmp_path / "init.png"), "--steps", "4", "--device", "cpu"]  # fmt: skip
    assert sample.main([*common, "--outdir", str(tmp_path / "a")]) == 0
    assert (
        sample.main(
            [
                *common,
                "--outdir",
                str(tmp_path / "b"),
                "--aesthetic-score",
                "1",
                "--negative-aesthetic-score",
                "9",
            ]
        )
        == 0
    )
    a, b = (np.asarray(Image.open(tmp_path / d / "0000-the-red-s0.png")).astype(int) for d in "ab")
    assert np.abs(a - b).max() > 0
    base = build_tiny_sdxl(tmp_path / "base")
    capsys.readouterr()
    assert sample.main(["--ckpt", str(base), "--prompt", "x", "--aesthetic-score", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err  # one line: no loading bar before it
    assert err.startswith("error: --aesthetic-score") and "need an SDXL refiner" in err
    assert sample.main([*common, "--target-size", "16", "16"]) == 2
    assert "conditions on --aesthetic-score" in capsys.readouterr().err
