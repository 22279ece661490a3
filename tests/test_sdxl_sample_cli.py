"""sample.py on a tiny random diffusers SDXL folder: the PNGs it writes equal the decoded
images of diffusers' StableDiffusionXLPipeline (same folder, same per-sample noise, Euler,
guidance with a negative prompt, micro-conditioning flags), and bad flags get one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from tests.models.sdxl_tiny import build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def test_sample_py_matches_the_sdxl_pipeline(folder: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = sample.main([
            "--ckpt", str(folder), "--prompt", "the red", "--negative-prompt", "th",
            "--sampler", "euler", "--steps", "4", "--guidance", "4", "--seed", "3",
            "--height", "16", "--width", "24", "--original-size", "64", "48",
            "--crop", "8", "0", "--target-size", "32", "24", "--outdir", str(tmp_path),
            "--device", "cpu",
        ])  # fmt: skip
        assert rc == 0
        ours = np.asarray(PIL.open(tmp_path / "0000-the-red-s3.png").convert("RGB"))
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        noise = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            theirs = pipe(
                prompt="the red", negative_prompt="th", height=16, width=24,
                num_inference_steps=4, guidance_scale=4.0, latents=noise,
                original_size=(64, 48), crops_coords_top_left=(8, 0), target_size=(32, 24),
                output_type="np",
            ).images[0]  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    theirs_u8 = (theirs * 255).round().astype(np.int16)
    assert ours.shape == (16, 24, 3)
    assert np.abs(ours.astype(np.int16) - theirs_u8).max() <= 1
    assert ours.std() > 1  # not a flat image
    plain = sample.main(["--ckpt", str(folder), "--prompt", "the red", "--negative-prompt", "th",
                         "--sampler", "euler", "--steps", "4", "--guidance", "4", "--seed", "3",
                         "--height", "16", "--width", "24", "--outdir", str(tmp_path / "plain"),
                         "--device", "cpu"])  # fmt: skip
    assert plain == 0
    default = np.asarray(PIL.open(tmp_path / "plain" / "0000-the-red-s3.png").convert("RGB"))
    assert np.abs(default.astype(np.int16) - ours).max() > 1  # the flags change the image


def test_micro_conditioning_flags_need_an_sdxl_model(capsys: pytest.CaptureFixture) -> None:
    class NotSDXL:
        pass

    args = sample.parse_args(["--ckpt", "x", "--crop", "0", "8"])
    with pytest.raises(ValueError, match="need an SDXL model"):
        sample.set_micro_conditioning(sample.micro_conditioning_flags(args), NotSDXL())


def test_sample_py_on_an_sdxl_single_file(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.checkpoint.sdxl_layout import load_sdxl_folder, sdxl_folder_config
    from ldm.checkpoint.sdxl_single_file import save_sdxl_single_file

    path = save_sdxl_single_file(load_sdxl_folder(folder), tmp_path / "tiny_sdxl.safetensors")
    config = tmp_path / "tiny_sdxl.yaml"
    OmegaConf.save(sdxl_folder_config(folder), config)
    common = ["--prompt", "the red", "--steps", "3", "--sampler", "euler", "--height", "16",
              "--device", "cpu"]  # fmt: skip
    assert sample.main(["--ckpt", str(folder), "--outdir", str(tmp_path / "a"), *common]) == 0
    assert (
        sample.main(
            [
                "--ckpt",
                str(path),
                "-c",
                str(config),
                "--outdir",
                str(tmp_path / "b"),
                *common,
                f"model.text_encoder.name_or_path={folder}",
            ]
        )
        == 0
    )
    a = np.asarray(PIL.open(tmp_path / "a" / "0000-the-red-s0.png")).astype(np.int16)
    b = np.asarray(PIL.open(tmp_path / "b" / "0000-the-red-s0.png")).astype(np.int16)
    assert np.abs(a - b).max() <= 1

    capsys.readouterr()
    assert sample.main(["--ckpt", str(path), "-c", str(config), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.text_encoder.name_or_path" in err
    assert len(err.splitlines()) == 1

    sd1 = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(sd1))  # fmt: skip
    assert (
        sample.main(
            [
                "--ckpt",
                str(sd1),
                "-c",
                str(config),
                *common,
                f"model.text_encoder.name_or_path={folder}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "is an SD 1.x/2.x file" in err
    assert len(err.splitlines()) == 1

    assert sample.main(["--ckpt", str(folder), *common, "--original-size", "0", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --original-size 0 64: sizes must be positive")
