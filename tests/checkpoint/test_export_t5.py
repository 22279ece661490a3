"""A run conditioned on a T5 encoder exports, and diffusers' StableDiffusionPipeline loaded from
the export conditions and samples as our checkpoint does (the encoder sees its padding mask:
the export says ``use_attention_mask: true``, which diffusers' ``encode_prompt`` reads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint.format import save_checkpoint
from ldm.export import main as export_main
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model
from tests.models.test_text_encoders import _tiny_t5

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:.*prompt of"
)

PROMPTS = ["the red", "a b c d"]


@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_t5_run_exports_and_samples_in_diffusers(tmp_path: Path, layer: str) -> None:
    import sample

    config: dict[str, Any] = tiny_config(tiny_clip_dir(tmp_path / "clip"))
    config["model"]["text_encoder"] = {
        "kind": "t5",
        "name_or_path": str(_tiny_t5(tmp_path / "t5")),
        "max_length": 12,
        "layer": layer,
    }
    model = tiny_model(config, seed=3)
    ckpt = save_checkpoint(
        tmp_path / "run.safetensors",
        {"unet": model.unet.state_dict(), "autoencoder": model.autoencoder.state_dict()},
        config,
        "ldm",
    )
    out = tmp_path / "export"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    te_config = json.loads((out / "text_encoder" / "config.json").read_text())
    assert te_config["use_attention_mask"] is True
    assert te_config["num_layers"] == (2 if layer == "last" else 1)  # the blocks layer runs

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "T5EncoderModel"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    ours, _ = model.text_encoder.encode(PROMPTS)
    assert theirs.shape == ours.shape == (2, 12, 32)
    assert (theirs - ours).abs().max().item() <= 1e-5

    # the whole path: sample.py on our checkpoint, the pipeline on the export, same latents
    latents_file = tmp_path / "latents.safetensors"
    argv = [a for p in PROMPTS for a in ("--prompt", p)] + [
        "--ckpt", str(ckpt), "--negative-prompt", "z", "--guidance", "4", "--steps", "4",
        "--seed", "7", "--height", "16", "--outdir", str(tmp_path / "out"),
        "--save-latents", str(latents_file)]  # fmt: skip
    assert sample.main(argv) == 0
    mine = load_file(str(latents_file))["latents"]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        ref = pipe(
            prompt=PROMPTS,
            negative_prompt=["z"] * 2,
            height=16,
            width=16,
            num_inference_steps=4,
            guidance_scale=4.0,
            latents=noise,
            output_type="latent",
        ).images
    err = (mine - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err
