"""Scheduler fields through folders: read, written on export, and the caller's config winning.

Ours → diffusers folder → ours samples identically (``sample.py`` on our checkpoint and on its
export, and diffusers' pipeline on the export, same seeds); every field that changes a sample
is in the exported ``scheduler_config.json`` and comes back; ``-c`` files and overrides win over
what a folder says, and the run prints where each setting came from; fields we do not
reproduce are refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ldm import assemble
from ldm.checkpoint.diffusers_layout import export_diffusers_folder
from ldm.checkpoint.format import save_checkpoint
from ldm.config import load
from ldm.export import main
from tests.checkpoint.test_stable_diffusion import (
    tiny_clip_dir,
    tiny_config,
    tiny_model,
    write_yaml,
)

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:ClipTextEncoder. prompt of"
)
PROMPTS = ["the red", "a b c"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_dir(tmp_path_factory.mktemp("fields") / "clip")


def run_sample(ckpt: Path, tmp: Path, *args: str) -> torch.Tensor:
    import sample

    out = tmp / "z.safetensors"
    argv = [
        "--ckpt",
        str(ckpt),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--negative-prompt",
        "x y",
        "--guidance",
        "4",
        "--seed",
        "3",
        "--steps",
        "5",
        "--outdir",
        str(tmp / "out"),
        "--save-latents",
        str(out),
        *args,
    ]
    assert sample.main(argv) == 0
    return load_file(str(out))["latents"]


def pipeline_latents(folder: Path, steps: int, eta: float = 0.0) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompt=PROMPTS,
            negative_prompt=["x y"] * 2,
            height=16,
            width=16,
            num_inference_steps=steps,
            guidance_scale=4.0,
            eta=eta,
            generator=[torch.Generator().manual_seed(3) for _ in PROMPTS],
            output_type="latent",
        ).images


ROUND_TRIPS = [
    (
        "DDIMScheduler",
        {"sampler": "ddim", "timestep_spacing": "trailing", "set_alpha_to_one": False, "eta": 1.0},
        {"prediction": "v", "zero_terminal_snr": True},
    ),
    (
        "EulerDiscreteScheduler",
        {"sampler": "euler", "karras": True, "final_sigma": "sigma_min"},
        {"schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    ),
    (
        "DPMSolverMultistepScheduler",
        {"sampler": "dpmpp_2m", "timestep_spacing": "linspace"},
        {"prediction": "v"},
    ),
    (
        "EulerAncestralDiscreteScheduler",
        {"sampler": "euler_a", "timestep_spacing": "trailing"},
        {"schedule": "cosine"},
    ),
    ("DDPMScheduler", {"sampler": "ddpm", "clip_sample_range": 0.5}, {}),
]


@pytest.mark.parametrize(
    ("cls", "sampling", "diffusion"), ROUND_TRIPS, ids=[c for c, _, _ in ROUND_TRIPS]
)
def test_ours_to_diffusers_to_ours(
    clip: Path, tmp_path: Path, cls: str, sampling: dict[str, Any], diffusion: dict[str, Any]
) -> None:
    config = tiny_config(clip)
    config["model"]["diffusion"].update(diffusion)
    config["sampling"].update(sampling, steps=5)
    model = tiny_model(config, seed=5)
    ckpt = save_checkpoint(tmp_path / "ours.safetensors", {
        "unet": model.unet.state_dict(), "autoencoder": model.autoencoder.state_dict()},
        load(base=config), "ldm")  # fmt: skip
    folder = tmp_path / "exported"
    assert main(["--ckpt", str(ckpt), "--out", str(folder)]) == 0
    written = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == cls
    assert written["timestep_spacing"] == sampling.get("timestep_spacing", "leading")
    assert written["steps_offset"] == 1
    assert written["rescale_betas_zero_snr"] == diffusion.get("zero_terminal_snr", False)
    if cls == "DDIMScheduler":
        assert written["set_alpha_to_one"] is False and written["clip_sample"] is False
    if cls == "DDPMScheduler":
        assert written["clip_sample"] is False and written["clip_sample_range"] == 0.5

    eta = ["--eta", str(sampling.get("eta", 0.0))]  # η and steps are not scheduler fields
    ours = run_sample(ckpt, tmp_path, *eta)
    from ldm.config_sources import config_sources

    user = ["model.text_encoder.layer=-1", "sampling.steps=3"]
    line = config_sources(ckpt, load(base=config, overrides=user), overrides=user)
    assert "sampling.steps=3 (override)" in line
    assert line.endswith("the checkpoint's model fixes model.text_encoder.layer (yours ignored)")
    again = run_sample(folder, tmp_path, *eta)  # ours -> diffusers -> ours
    assert (ours - again).abs().max() <= 1e-5 * ours.abs().max()
    theirs = pipeline_latents(folder, 5, sampling.get("eta", 0.0))
    assert (again - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # a second export of the folder writes the same scheduler
    assert main(["--ckpt", str(folder), "--out", str(tmp_path / "twice")]) == 0
    assert json.loads((tmp_path / "twice/scheduler/scheduler_config.json").read_text()) == written


def test_caller_config_wins_over_the_folder(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config(clip)
    config["sampling"].update(timestep_spacing="trailing", sampler="euler")
    config["model"]["diffusion"]["prediction"] = "v"
    folder = export_diffusers_folder(
        tiny_model(config, seed=6), load(base=config), tmp_path / "pipe"
    )
    user = write_yaml(
        {
            "sampling": {"timestep_spacing": "linspace"},
            "model": {"text_encoder": {"layer": "penultimate"}, "unet": {"num_res_blocks": 3}},
        },
        tmp_path / "mine.yaml",
    )
    model, cfg = assemble.load_for_sampling(folder, [user], ["sampling.steps_offset=0"])
    s = cfg.sampling
    assert (s.timestep_spacing, s.steps_offset, s.sampler) == ("linspace", 0, "euler")
    assert (
        cfg.model.text_encoder.layer == "penultimate" and model.text_encoder.layer == "penultimate"
    )
    assert cfg.model.diffusion.prediction == "v" and cfg.model.unet.num_res_blocks == 1

    import sample

    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "-c",
                str(user),
                "--prompt",
                "the",
                "--steps",
                "2",
                "--outdir",
                str(tmp_path / "o"),
                "sampling.steps_offset=0",
            ]
        )
        == 0
    )
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("settings:"))
    for part in (
        "sampling.timestep_spacing=linspace (mine.yaml)",
        "sampling.steps_offset=0 (override)",
        "sampling.sampler=euler (folder)",
        "model.diffusion.prediction=v (folder)",
        "model.text_encoder.layer=penultimate (mine.yaml)",
        "the folder's weights fix model.unet.num_res_blocks (yours ignored)",
    ):
        assert part in line, (part, line)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        ("DDIMScheduler", "thresholding", True),
        ("DPMSolverMultistepScheduler", "solver_order", 3),
        ("EulerDiscreteScheduler", "interpolation_type", "log_linear"),
    ],
)
def test_unreproduced_scheduler_fields_are_refused(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cls: str, field: str, value: Any
) -> None:
    import sample

    config = tiny_config(clip)
    folder = export_diffusers_folder(tiny_model(config), load(base=config), tmp_path / "pipe")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": cls, field: value}))
    capsys.readouterr()
    assert (
        sample.main(["--ckpt", str(folder), "--prompt", "the", "--outdir", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("error: scheduler") and field in err and "not reproduced" in err


def test_karras_where_diffusers_has_none_is_one_line(
    clip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sample

    config = tiny_config(clip)
    folder = export_diffusers_folder(tiny_model(config), load(base=config), tmp_path / "pipe")
    argv = [
        "--ckpt",
        str(folder),
        "--prompt",
        "the",
        "--outdir",
        str(tmp_path / "o"),
        "--karras",
        "--steps",
        "2",
    ]
    assert sample.main(argv) == 2
    assert "has no Karras sigmas" in capsys.readouterr().err
    assert sample.main([*argv, "sampling.grid=exact"]) == 0  # our grid has them


def test_export_refuses_what_the_pipeline_would_reset(clip: Path, tmp_path: Path) -> None:
    """StableDiffusionPipeline resets steps_offset to 1 and clip_sample to false on load."""
    config = tiny_config(clip)
    model = tiny_model(config)
    for override in ("sampling.steps_offset=0", "sampling.clip_sample=true"):
        with pytest.raises(ValueError, match="resets steps_offset to 1 and clip_sample to false"):
            export_diffusers_folder(
                model, load(base=config, overrides=[override]), tmp_path / override
            )
