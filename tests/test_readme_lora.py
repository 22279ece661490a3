"""The README's LoRA recipe block runs verbatim on a tiny random SD1 diffusers folder, with the
default logger (wandb, offline): train a U-Net + text-encoder LoRA, export it in the three
layouts, sample the base with the kohya file, load the diffusers file in diffusers' pipeline.
Only the block's three settings (``BASE``, ``CONFIG``, ``SHARDS``) are replaced."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from ldm.checkpoint.diffusers_export import export_diffusers_folder
from ldm.config import load
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- lora-recipes:begin -->", "<!-- lora-recipes:end -->"


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the LoRA recipe section has exactly one bash block"
    return blocks[0]


def keys_and_format(path: Path) -> tuple[list[str], str | None]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys()), (f.metadata() or {}).get("format")


def test_readme_lora_recipe_runs(tmp_path: Path, shapes_data: dict) -> None:
    clip = tiny_clip_dir(tmp_path / "clip")
    config = tiny_config(clip)
    folder = export_diffusers_folder(
        tiny_model(config, seed=2), load(base=config), tmp_path / "sd15"
    )
    config["data"] = {"image_size": 32, "num_workers": 0, "shuffle_buffer": 0, "batch_size": 2}
    config["trainer"] = {"accelerator": "cpu", "max_steps": 2, "enable_progress_bar": False}
    config["logging"] = {"image_every_n_steps": 0}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    settings = {
        "BASE": str(folder),
        "CONFIG": str(tmp_path / "tiny.yaml"),
        "SHARDS": shapes_data["train"],
    }
    script = readme_block()
    for name, value in settings.items():
        script, count = re.subn(rf"^{name}=.*$", f"{name}='{value}'", script, flags=re.M)
        assert count == 1, name
    for cli in ("train.py", "sample.py"):
        (tmp_path / cli).symlink_to(ROOT / cli)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)  # the README's `python` is this interpreter
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "1",
    }
    for var in ("WANDB_API_KEY", "WANDB_MODE"):  # the default: wandb, offline without a key
        env.pop(var, None)
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]

    assert list((tmp_path / "runs" / "lora" / "wandb").glob("offline-run-*"))
    keys, fmt = keys_and_format(tmp_path / "lora-ldm.safetensors")
    assert fmt == "ldm-lora" and any(k.startswith("text_encoder.") for k in keys)
    keys, _ = keys_and_format(tmp_path / "lora-diffusers.safetensors")
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder"}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    keys, _ = keys_and_format(tmp_path / "lora-kohya.safetensors")
    assert {k.split("_")[1] for k in keys} == {"unet", "te"}
    assert re.search(
        r"LoRA .*lora-kohya.safetensors merged at scale 0.8 \(\d+ unet layers, "
        r"\d+ text_encoder layers\)",
        output,
    )
    assert (tmp_path / "samples-lora" / "grid.png").is_file()
    assert (tmp_path / "diffusers-lora.png").is_file()
