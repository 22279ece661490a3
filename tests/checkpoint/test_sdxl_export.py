"""Export to the diffusers SDXL layout: StableDiffusionXLPipeline.from_pretrained of the export
holds the source folder's weights, and it samples as the source does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.sdxl_export import export_sdxl_folder
from ldm.checkpoint.sdxl_layout import load_sdxl_folder, sdxl_folder_config
from tests.models.sdxl_tiny import build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")


def test_export_reloads_in_diffusers_with_the_same_weights(tmp_path: Path) -> None:
    source = build_tiny_sdxl(tmp_path / "src")
    model = load_sdxl_folder(source)
    out = export_sdxl_folder(model, sdxl_folder_config(source), tmp_path / "out")
    want = diffusers.StableDiffusionXLPipeline.from_pretrained(source)
    got = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
    assert got.vae.config.scaling_factor == pytest.approx(0.13025)
    assert got.unet.config.addition_embed_type == "text_time"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(want, part).state_dict(), getattr(got, part).state_dict()
        assert set(a) == set(b), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    ids = [
        t(["the red"], padding="max_length", max_length=16).input_ids
        for t in (got.tokenizer, got.tokenizer_2)
    ]
    assert ids == [
        t(["the red"], padding="max_length", max_length=16).input_ids
        for t in (want.tokenizer, want.tokenizer_2)
    ]
    with pytest.raises(FileExistsError, match="is not empty"):
        export_sdxl_folder(model, sdxl_folder_config(source), out)
