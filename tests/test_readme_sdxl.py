"""The README's "Fine-tune SDXL" block runs, with the default logger (wandb, offline), on a tiny
random SDXL folder and tiny shards (the config, folder, sizes and step counts swapped for tiny
ones), and its memory table follows from parameter counts taken on the meta device."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.models.sdxl_tiny import build_tiny_sdxl

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- sdxl-finetune:begin -->", "<!-- sdxl-finetune:end -->"
pytest.importorskip("diffusers")


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)]


def test_readme_sdxl_fine_tune_recipe_runs(shapes_data: dict[str, str], tmp_path: Path) -> None:
    blocks = re.findall(r"```bash\n(.*?)```", _section(), flags=re.S)
    assert len(blocks) == 1
    folder = build_tiny_sdxl(tmp_path / "base")
    work = tmp_path / "sdxl"
    (work / "shards").mkdir(parents=True)
    train_shards = sorted(Path(shapes_data["train"].split("{")[0]).parent.glob("*.tar"))
    for i, shard in enumerate(train_shards[:2]):
        shutil.copy(shard, work / "shards" / f"train-{i:06d}.tar")
    swaps = {"configs/ldm/sdxl.yaml": str(ROOT / "tests" / "configs" / "sdxl-tiny.yaml"),
             "./stable-diffusion-xl-base-1.0": str(folder), "sdxl/": f"{work}/",
             "resolutions=[1024]": "resolutions=[32]", "step=64": "step=8",
             "max_steps=2000": "max_steps=2", "ckpt_every_n_steps=500": "ckpt_every_n_steps=1",
             "--height 1024 --width 1024": "--height 32 --width 32"}  # fmt: skip
    script = blocks[0]
    for old, new in swaps.items():
        assert old in script, old
        script = script.replace(old, new)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)  # the README's `python` is this interpreter
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "HOME": str(tmp_path / "home")}  # fmt: skip
    for var in ("WANDB_API_KEY", "WANDB_MODE"):  # the default: wandb, offline without a key
        env.pop(var, None)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    assert (work / "runs" / "ft" / "wandb").is_dir()
    assert (work / "samples" / "0000-a-photo-of-a-cat-s0.png").is_file()
    assert re.search(r"train: \d+ samples cached", output), output[-2000:]
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(work / "ft-diffusers")
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_readme_sdxl_memory_table_follows_the_parameter_counts() -> None:
    from ldm.config import load
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.lora import add_lora
    from ldm.models.unet import UNetModel
    from tests.models.sdxl_tiny import sdxl_text_towers

    cfg = load([ROOT / "configs" / "ldm" / "sdxl.yaml"])

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        unet = UNetModel(**OmegaConf.to_container(cfg.model.unet))
        vae = AutoencoderKL(**OmegaConf.to_container(cfg.model.autoencoder))
        vit_l, vit_g = sdxl_text_towers()
        u, frozen = count(unet), count(vae) + count(vit_l) + count(vit_g)
        add_lora(unet, 16, targets=list(cfg.model.lora.targets))
        a = count(unet) - u
    assert (u, count(vae), count(vit_l), count(vit_g)) == (
        2_567_463_684,
        83_653_863,
        123_060_480,
        694_659_840,
    )
    totals = [2 * u + 4 * frozen, 4 * u + 4 * frozen, 20 * u + 4 * frozen, 16 * u + 4 * frozen,
              4 * u + 16 * a + 4 * frozen, 8 * u + 20 * a + 4 * frozen]  # fmt: skip
    table = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| ") and line.rstrip().endswith(" GB |")
    ]
    rows = [
        ln
        for ln in table
        if any(k in ln for k in ("sampling, ", "fine-tune", "LoRA rank", "the same LoRA"))
    ]
    assert [row.rsplit("|", 2)[1].strip() for row in rows] == [f"{t / 1e9:.1f} GB" for t in totals]
    assert f"{a:,} adapter parameters" in (ROOT / "README.md").read_text()
