"""Kills at epoch boundaries and inside every stage of a checkpoint write, then ``--resume``: the
resumed run equals the uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint
from tests.faults.faultkit import (
    needs_minilm,
    run_killed,
    run_killed_in_save,
    tiny_ae_args,
    tiny_ldm_args,
)


def _assert_same_unet(a: Path, b: Path) -> None:
    straight, resumed = load_checkpoint(a), load_checkpoint(b)
    assert resumed.metadata["step"] == straight.metadata["step"] == "12"
    for name, tensor in straight.tensors.items():
        if name.startswith(("unet.", "unet_ema.")):
            torch.testing.assert_close(
                resumed.tensors[name], tensor, atol=1e-6, rtol=0, msg=f"{name} differs after resume"
            )


@needs_minilm
@pytest.mark.parametrize(
    "limit",
    [["trainer.max_steps=12"], ["trainer.max_steps=-1", "trainer.max_epochs=2"]],
    ids=["max_steps", "max_epochs"],
)
def test_kill_after_checkpoint_at_epoch_last_batch(
    six_batch_shard: str, tmp_path: Path, limit: list[str]
) -> None:
    """Step 6 is epoch 0's last batch and a checkpoint step; the kill comes at step 7's start."""
    import train

    args = tiny_ldm_args(six_batch_shard, tmp_path, *limit)
    assert train.main([*args, "run.name=straight"]) == 0
    proc = run_killed([*args, "run.name=killed"], kill_at=6)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert train.main(["--resume", str(tmp_path / "killed")]) == 0
    _assert_same_unet(
        tmp_path / "straight" / "checkpoints" / "last.safetensors",
        tmp_path / "killed" / "checkpoints" / "last.safetensors",
    )


STAGE_ARGS = (
    "trainer.max_steps=6",
    "trainer.ckpt_every_n_steps=2",
    "trainer.keep_last_k=1",
    "data.shuffle_buffer=8",
)


@pytest.fixture(scope="module")
def straight_autoencoder(six_batch_shard: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import train

    root = tmp_path_factory.mktemp("straight-ae")
    assert train.main(tiny_ae_args(six_batch_shard, root, "run.name=s", *STAGE_ARGS)) == 0
    return root / "s" / "checkpoints" / "last.safetensors"


# The step-4 save's stages: before resume.ckpt's rename, before step-4's rename, before
# last.safetensors' rename, and before pruning step-2 (the step-2 save made renames 1 to 3).
STAGES = {
    "resume_ckpt": ("replace", 4),
    "step_file": ("replace", 5),
    "last_link": ("replace", 6),
    "prune": ("unlink", 1),
}


@pytest.mark.parametrize("call,count", STAGES.values(), ids=STAGES.keys())
def test_kill_at_every_checkpoint_stage_then_exact_resume(
    call: str, count: int, six_batch_shard: str, straight_autoencoder: Path, tmp_path: Path
) -> None:
    import train

    proc = run_killed_in_save(
        tiny_ae_args(six_batch_shard, tmp_path, "run.name=k", *STAGE_ARGS), call, count
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    ckpts = tmp_path / "k" / "checkpoints"
    assert load_checkpoint(ckpts / "last.safetensors").metadata["step"] in ("2", "4")
    assert train.main(["--resume", str(tmp_path / "k")]) == 0
    straight, resumed = (
        load_checkpoint(straight_autoencoder),
        load_checkpoint(ckpts / "last.safetensors"),
    )
    assert resumed.metadata["step"] == "6"
    for name, tensor in straight.tensors.items():
        torch.testing.assert_close(resumed.tensors[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert not list(ckpts.glob(".*.tmp"))
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000006.safetensors"]
