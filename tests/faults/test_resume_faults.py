"""Kills at epoch boundaries, then ``--resume``: the resumed run equals the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint
from tests.faults.faultkit import needs_minilm, run_killed, tiny_ldm_args

pytestmark = needs_minilm


def _assert_same_unet(a: Path, b: Path) -> None:
    straight, resumed = load_checkpoint(a), load_checkpoint(b)
    assert resumed.metadata["step"] == straight.metadata["step"] == "12"
    for name, tensor in straight.tensors.items():
        if name.startswith(("unet.", "unet_ema.")):
            torch.testing.assert_close(resumed.tensors[name], tensor, atol=1e-6, rtol=0,
                                       msg=f"{name} differs after resume")


@pytest.mark.parametrize("limit", [["trainer.max_steps=12"],
                                   ["trainer.max_steps=-1", "trainer.max_epochs=2"]],
                         ids=["max_steps", "max_epochs"])
def test_kill_after_checkpoint_at_epoch_last_batch(six_batch_shard: str, tmp_path: Path,
                                                   limit: list[str]) -> None:
    """Step 6 is epoch 0's last batch and a checkpoint step; the kill comes at step 7's start."""
    import train

    args = tiny_ldm_args(six_batch_shard, tmp_path, *limit)
    assert train.main([*args, "run.name=straight"]) == 0
    proc = run_killed([*args, "run.name=killed"], kill_at=6)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert train.main(["--resume", str(tmp_path / "killed")]) == 0
    _assert_same_unet(tmp_path / "straight" / "checkpoints" / "last.safetensors",
                      tmp_path / "killed" / "checkpoints" / "last.safetensors")
