"""img2img (SDEdit) against diffusers' StableDiffusionImg2ImgPipeline on the same weights: same
strength → same timesteps → same final latents (init latents given directly, DDIM as SD)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.config import load
from ldm.diffusion import Sampler
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model
from tests.test_pipeline_parity import GUIDANCE, NEGATIVE, PROMPTS, SIZE, diffusers_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")


@pytest.mark.parametrize(("steps", "strength"), [(10, 0.6), (7, 0.3), (5, 1.0)])
def test_img2img_matches_diffusers(tmp_path: Path, steps: int, strength: float) -> None:
    clip_dir = tiny_clip_dir(tmp_path / "clip")
    config = tiny_config(clip_dir)
    model = tiny_model(config, seed=5)
    pipe = diffusers_pipeline(model, load(base=config), clip_dir)
    pipe.unet.register_to_config(sample_size=SIZE // 2)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    shape = (len(PROMPTS), 4, SIZE // 2, SIZE // 2)
    init = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = img2img(
            prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), image=init.clone(),
            strength=strength, num_inference_steps=steps, guidance_scale=GUIDANCE,
            generator=torch.Generator().manual_seed(9), output_type="latent",
        ).images  # fmt: skip
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
        _, ours = model.generate(
            PROMPTS, Sampler("ddim", steps, set_alpha_to_one=False, disable_progress=True),
            guidance=GUIDANCE, negative_prompts=NEGATIVE, latents=noise, init_latents=init,
            strength=strength,
        )  # fmt: skip
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4 * scale, f"final latents differ by {err:.2e} (scale {scale:.2f})"
    assert (theirs - init).abs().max().item() > 1e-2  # the sampler changed the init


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, 0.05])
def test_bad_strength_is_refused(tmp_path: Path, strength: float) -> None:
    config = tiny_config(tiny_clip_dir(tmp_path / "clip"))
    model = tiny_model(config)
    init = torch.zeros(1, 4, SIZE // 2, SIZE // 2)
    with pytest.raises(ValueError, match="strength"):
        model.generate(
            ["x"], Sampler("ddim", 10, disable_progress=True), init_latents=init, strength=strength
        )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    from ldm.checkpoint.diffusers_layout import export_diffusers_folder

    config = tiny_config(tiny_clip_dir(tmp_path / "clip"))
    return export_diffusers_folder(tiny_model(config, seed=2), load(base=config), tmp_path / "pipe")


def test_sample_cli_img2img(folder: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    import sample

    pixels = np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "init.png")
    out = tmp_path / "out"
    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "--prompt",
                "a b",
                "--n",
                "2",
                "--steps",
                "5",
                "--init-image",
                str(tmp_path / "init.png"),
                "--strength",
                "0.6",
                "--outdir",
                str(out),
            ]
        )
        == 0
    )
    first = Image.open(next(out.glob("0000-*.png")))
    assert first.size == (20, 24)
    assert first.text["strength"] == "0.6" and first.text["init_image"].endswith("init.png")

    mask = np.zeros((24, 20), np.uint8)
    mask[4:12, 6:14] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "inpainted"
    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "--prompt",
                "a b",
                "--steps",
                "4",
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
    assert Image.open(next(out.glob("0000-*.png"))).size == (20, 24)


@pytest.mark.parametrize(("make", "extra", "message"), [
    (None, ["--strength", "1.5"], "strength must be in (0, 1]"),
    (None, ["--strength", "0"], "strength must be in (0, 1]"),
    ("missing", [], "--init-image not found"),
    ("mask-size", [], "give a mask of the image's size"),
    ("mask-only", [], "--mask needs --init-image"),
    ("text", [], "is not a readable image"),
    ("odd", [], "multiples of 2"),
])  # fmt: skip
def test_sample_cli_img2img_bad_input(
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    make: str | None,
    extra: list[str],
    message: str,
) -> None:
    import numpy as np
    from PIL import Image

    import sample

    init = tmp_path / "init.png"
    if make != "missing":
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(init)
    if make == "text":
        init.write_text("not an image")
    if make == "odd":
        Image.fromarray(np.zeros((15, 16, 3), np.uint8)).save(init)
    flags = ["--init-image", str(init)]
    if make and make.startswith("mask"):
        mask = tmp_path / "mask.png"
        Image.fromarray(np.zeros((8 if make == "mask-size" else 16,) * 2, np.uint8)).save(mask)
        flags = ["--mask", str(mask)] + ([] if make == "mask-only" else flags)
    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "--prompt",
                "x",
                *flags,
                *extra,
                "--outdir",
                str(tmp_path / "out"),
            ]
        )
        == 2
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
