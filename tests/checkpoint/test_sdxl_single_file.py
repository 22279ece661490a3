"""SDXL single files (generative-models layout): our writer's layout is what diffusers'
``StableDiffusionXLPipeline.from_single_file`` reads, and our reader loads it strict and
samples exactly as the diffusers folder it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.sdxl_layout import load_sdxl_folder, sdxl_folder_config
from ldm.checkpoint.sdxl_single_file import load_sdxl_single_file, save_sdxl_single_file
from ldm.diffusion import Sampler
from tests.models.sdxl_tiny import build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def test_single_file_round_trip_and_diffusers_reads_it(folder: Path, tmp_path: Path) -> None:
    model = load_sdxl_folder(folder)
    path = save_sdxl_single_file(model, tmp_path / "tiny_sdxl.safetensors")

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    single = diffusers.StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True)  # fmt: skip
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = getattr(reference, part).state_dict(), getattr(single, part).state_dict()
        assert set(got) == set(want), part
        assert all(torch.equal(got[k], want[k]) for k in want), part

    cfg = sdxl_folder_config(folder)
    loaded = load_sdxl_single_file(path, cfg, encoders=folder)
    assert loaded.autoencoder.scale_factor.item() == pytest.approx(0.13025)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = Sampler("euler", 3, disable_progress=True)
    with torch.no_grad():
        _, a = model.generate(["the red"], sampler, guidance=3.0, negative_prompts="th",
                              latents=noise.clone())  # fmt: skip
        _, b = loaded.generate(["the red"], sampler, guidance=3.0, negative_prompts="th",
                               latents=noise.clone())  # fmt: skip
    # Encoders built from their configs may pick another attention kernel than from_pretrained.
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_sd1_file_and_missing_encoder_folder_are_refused(folder: Path, tmp_path: Path) -> None:
    sd1 = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(sd1))  # fmt: skip
    cfg = sdxl_folder_config(folder)
    with pytest.raises(CheckpointError, match="is not an SDXL file"):
        load_sdxl_single_file(sd1, cfg, encoders=folder)
    path = save_sdxl_single_file(load_sdxl_folder(folder), tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="has no text_encoder/"):
        load_sdxl_single_file(path, cfg, encoders=tmp_path)


def test_ema_weights_are_used_when_present(folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ldm.checkpoint.stable_diffusion import ema_key

    path = save_sdxl_single_file(load_sdxl_folder(folder), tmp_path / "ema.safetensors")
    state = load_file(str(path))
    names = [k[len("model.diffusion_model."):] for k in state
             if k.startswith("model.diffusion_model.")]  # fmt: skip
    state.update({ema_key(n): state["model.diffusion_model." + n] + 1 for n in names})
    save_file(state, str(path))
    cfg = sdxl_folder_config(folder)
    ema = load_sdxl_single_file(path, cfg, encoders=folder).unet.state_dict()
    raw = load_sdxl_single_file(path, cfg, encoders=folder, use_ema=False).unet.state_dict()
    assert all(torch.equal(ema[n], raw[n] + 1) for n in names)
