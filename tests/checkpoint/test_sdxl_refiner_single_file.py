"""SDXL refiner single files (generative-models' layout: model.diffusion_model, first_stage_model,
conditioner.embedders.0.model = OpenCLIP ViT-bigG alone, a U-Net taking five numbers).

A tiny random refiner folder is built with diffusers and written as a single file by our
writer; diffusers' ``StableDiffusionXLImg2ImgPipeline.from_single_file`` reads that file into the
folder's weights (so the layout is the one diffusers documents). ``sample.py --ckpt file -c
refiner.yaml --init-image`` then gives the final latents of diffusers' img2img pipeline on the
folder (same PNG, seeds, prompts, negative prompt, guidance; helpers of
tests/test_img2img_cli_parity.py); a refiner file given a base config, and the reverse, get one
line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from ldm.checkpoint.sdxl_layout import load_sdxl_folder, sdxl_folder_config
from ldm.checkpoint.sdxl_single_file import save_sdxl_single_file
from tests.models.sdxl_tiny import build_tiny_refiner, build_tiny_sdxl
from tests.test_img2img_cli_parity import SEED, theirs
from tests.test_sampling_parity import SIZE, assert_close, ours

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TINY = Path(__file__).resolve().parents[1] / "configs" / "sdxl-tiny.yaml"


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The refiner folder, its single file, a config for the file, and an init PNG."""
    root = tmp_path_factory.mktemp("refiner_file")
    folder = build_tiny_refiner(root)
    path = save_sdxl_single_file(load_sdxl_folder(folder), root / "refiner.safetensors")
    cfg = OmegaConf.to_container(sdxl_folder_config(folder))  # the file's shapes, as a YAML
    cfg["model"]["text_encoder"]["name_or_path"] = str(folder)
    cfg["model"]["sdxl"]["zero_empty_prompt"] = False  # as configs/ldm/sdxl-refiner.yaml
    (root / "refiner.yaml").write_text(OmegaConf.to_yaml(cfg))
    pixels = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "init.png")
    return {"root": root, "folder": folder, "file": path, "yaml": root / "refiner.yaml",
            "init": root / "init.png"}  # fmt: skip


def test_refiner_file_layout_is_what_diffusers_reads(refiner: dict[str, Any]) -> None:
    with safe_open(str(refiner["file"]), framework="pt") as f:
        keys = list(f.keys())
        adm = f.get_tensor("model.diffusion_model.label_emb.0.0.weight").shape[1]
    assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.") for k in keys)
    assert "conditioner.embedders.0.model.text_projection" in keys
    assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    assert adm == 24 + 5 * 256  # pooled + five numbers (the aesthetic score last)
    reference = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner["folder"])
    single = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(refiner["file"]), config=str(refiner["folder"]), local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder_2"):
        want, got = getattr(reference, part).state_dict(), getattr(single, part).state_dict()
        assert set(got) == set(want), part
        assert all(torch.equal(got[k], want[k]) for k in want), part


@pytest.mark.parametrize(("steps", "strength"), [(8, 0.6)])
def test_sample_py_on_the_refiner_file_matches_the_img2img_pipeline(
    refiner: dict[str, Any], tmp_path: Path, steps: int, strength: float
) -> None:
    from tests.test_img2img_cli_parity import GUIDANCE, PROMPTS, N

    args = ["-c", str(refiner["yaml"]), "--sampler", "euler", "--init-image",
            str(refiner["init"]), "--strength", str(strength)]  # fmt: skip
    mine = ours(refiner["file"], tmp_path, steps, GUIDANCE, args, seed=SEED, prompts=PROMPTS, n=N)
    ref = theirs("StableDiffusionXLImg2ImgPipeline", refiner["folder"], refiner, steps, strength)
    assert_close(mine, ref, f"refiner single file, img2img euler {steps} steps {strength}")
    init = Image.open(refiner["init"])
    assert init.size == (SIZE, SIZE) and (mine[0] - mine[1]).abs().max() > 1e-3  # own seeds


def test_refiner_and_base_files_with_the_other_config_fail_in_one_line(
    refiner: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import sample

    base_folder = build_tiny_sdxl(tmp_path)
    base = save_sdxl_single_file(load_sdxl_folder(base_folder), tmp_path / "base.safetensors")
    cases = [
        (refiner["file"], ["-c", str(TINY), f"model.text_encoder.name_or_path={base_folder}"],
         "is an SDXL refiner file (adm_in_channels 1304) but the config is the SDXL base's "
         "(adm_in_channels 1560): use -c configs/ldm/sdxl-refiner.yaml"),
        # the refiner's own folder (no first encoder): the mix-up, not the missing encoder
        (refiner["file"], ["-c", str(TINY), f"model.text_encoder.name_or_path={refiner['folder']}"],
         "is an SDXL refiner file (adm_in_channels 1304) but the config is the SDXL base's "
         "(adm_in_channels 1560): use -c configs/ldm/sdxl-refiner.yaml"),
        (base, ["-c", str(refiner["yaml"])],
         "is an SDXL base file (adm_in_channels 1560) but the config is the SDXL refiner's "
         "(adm_in_channels 1304): use -c configs/ldm/sdxl.yaml"),
    ]  # fmt: skip
    for path, config, needle in cases:
        capsys.readouterr()
        argv = ["--ckpt", str(path), "--prompt", "x", "--outdir", str(tmp_path / "o"), *config]
        assert sample.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
