"""diffusers-layout folders: ours → folder → ours is exact, diffusers loads our export, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ldm import assemble, build
from ldm.assemble import diffusers_folder_model
from ldm.checkpoint.diffusers_layout import (
    diffusers_folder_config,
    export_diffusers_folder,
    folder_config,
)
from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.unet_keys import unet_ldm_to_diffusers
from ldm.checkpoint.vae_keys import vae_ldm_to_diffusers
from ldm.config import load
from ldm.export import main
from tests.checkpoint.test_stable_diffusion import (
    MAX_LEN,
    PROMPTS,
    assert_same_state,
    perturb,
    save_sd_file,
    sd_layout,
    tiny_clip_dir,
    tiny_config,
    tiny_model,
    write_yaml,
)

pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("diffusers_sd1")
    config = tiny_config(tiny_clip_dir(root / "clip"))
    model = tiny_model(config, seed=10)
    folder = export_diffusers_folder(model, load(base=config), root / "pipe")
    return {"root": root, "config": config, "model": model, "folder": folder}


def test_round_trip_is_exact(sd1: dict[str, Any]) -> None:
    src, folder = sd1["model"], sd1["folder"]
    model = diffusers_folder_model(folder, load(base=sd1["config"]))
    assert_same_state(model.unet, src.unet)
    assert_same_state(model.autoencoder, src.autoencoder)  # scale_factor included
    assert_same_state(model.text_encoder, src.text_encoder)
    assert model.prediction == "eps" and not model.use_context_mask
    assert model.text_encoder.max_length == MAX_LEN
    assert torch.equal(model.text_encoder.encode(PROMPTS)[0], src.text_encoder.encode(PROMPTS)[0])

    sections = diffusers_folder_config(folder)
    cfg = load(base=sd1["config"])
    for key in ("unet", "autoencoder", "diffusion"):
        ours = {
            k: v for k, v in build.kwargs(cfg.model[key]).items() if k in sections["model"][key]
        }
        assert sections["model"][key] == ours, key
    assert sections["data"]["image_size"] == 16
    assert sections["sampling"]["timestep_spacing"] == "leading"
    # the folder decides what its weights fix; the caller's other keys stay
    merged = folder_config(
        folder,
        overrides=[
            "model.unet.num_res_blocks=3",
            "sampling.steps=7",
            "sampling.timestep_spacing=trailing",
        ],
    )
    assert merged.model.unet.num_res_blocks == 1 and merged.sampling.steps == 7
    assert merged.sampling.timestep_spacing == "trailing"  # the caller wins over the folder


def test_diffusers_pipeline_loads_our_export(sd1: dict[str, Any]) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    src = sd1["model"]
    pipe = StableDiffusionPipeline.from_pretrained(sd1["folder"])
    assert pipe.safety_checker is None and isinstance(pipe.scheduler, DDIMScheduler)
    unet = build.kwargs(load(base=sd1["config"]).model.unet)
    expected = unet_ldm_to_diffusers(
        src.unet.state_dict(),
        unet["channel_mult"],
        unet["num_res_blocks"],
        unet["attention_resolutions"],
    )
    assert_same_state(pipe.unet.state_dict(), expected)
    assert_same_state(pipe.vae.state_dict(), vae_ldm_to_diffusers(src.autoencoder.state_dict()))
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    assert pipe.tokenizer.model_max_length == MAX_LEN
    s = pipe.scheduler.config
    assert (
        s.beta_schedule,
        s.prediction_type,
        s.steps_offset,
        s.set_alpha_to_one,
        s.clip_sample,
    ) == ("scaled_linear", "epsilon", 1, True, False)  # the config's
    ids = pipe.tokenizer(
        PROMPTS, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
    assert torch.equal(theirs, src.text_encoder.encode(PROMPTS)[0])


def test_sd2_style_export_drops_the_last_text_layer(tmp_path: Path) -> None:
    """layer=penultimate exports as diffusers' SD2 does: N − 1 layers read at the last one."""
    config = tiny_config(tiny_clip_dir(tmp_path / "clip", 3, "gelu"), sd2=True, prediction="v")
    config["sampling"]["timestep_spacing"] = "trailing"
    src = tiny_model(config, seed=20)
    folder = export_diffusers_folder(src, load(base=config), tmp_path / "pipe")
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text_config["num_hidden_layers"] == 2
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["timestep_spacing"] == "trailing"

    cfg = folder_config(folder)
    assert cfg.model.text_encoder.layer == "last" and cfg.model.diffusion.prediction == "v"
    assert cfg.sampling.timestep_spacing == "trailing"
    model = diffusers_folder_model(folder)  # its own config: layer=last of N − 1 layers
    assert_same_state(model.unet, src.unet)
    assert_same_state(model.autoencoder, src.autoencoder)
    err = (model.text_encoder.encode(PROMPTS)[0] - src.text_encoder.encode(PROMPTS)[0]).abs()
    assert err.max().item() <= 1e-6


def test_cli_exports_an_sd_file(
    sd1: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = sd1["model"]
    ema = perturb(copy.deepcopy(src.unet), seed=33)
    ckpt = save_sd_file(sd_layout(src, "clip", ema_unet=ema), tmp_path / "model.ckpt")
    cfg_yaml = write_yaml(sd1["config"], tmp_path / "cfg.yaml")
    out = tmp_path / "exported"
    assert main(["--ckpt", str(ckpt), "-c", str(cfg_yaml), "--out", str(out)]) == 0
    model, _ = assemble.load_for_sampling(out)  # folders load through the sampling entry point
    assert_same_state(model.unet, ema)
    assert_same_state(model.autoencoder, src.autoencoder)

    assert main(["--ckpt", str(ckpt), "-c", str(cfg_yaml), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (
        main(
            ["--ckpt", str(ckpt), "-c", str(cfg_yaml), "--out", str(out), "--no-ema", "--overwrite"]
        )
        == 0
    )
    assert_same_state(diffusers_folder_model(out).unet, src.unet)
    # a diffusers folder exports again (its own config, not the caller's)
    again = tmp_path / "again"
    assert main(["--ckpt", str(out), "--out", str(again)]) == 0
    assert_same_state(diffusers_folder_model(again).unet, src.unet)


def test_errors(sd1: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model_index.json is missing"):
        diffusers_folder_model(tmp_path)
    masked = load(base=sd1["config"], overrides=["model.use_context_mask=true"])
    masked_model = copy.copy(sd1["model"])  # the model decides: it is what gets exported
    masked_model.use_context_mask = True
    with pytest.raises(ValueError, match="use_context_mask"):
        export_diffusers_folder(masked_model, masked, tmp_path / "x")
    broken = tmp_path / "broken"
    export_diffusers_folder(sd1["model"], load(base=sd1["config"]), broken)
    config = json.loads((broken / "unet" / "config.json").read_text())
    config["layers_per_block"] = 2
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        diffusers_folder_model(broken)
