"""Our safetensors checkpoint format: round trip, metadata, atomic writes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)


def test_round_trip_with_config(tmp_path: Path) -> None:
    lin = torch.nn.Linear(3, 2)
    path = save_checkpoint(
        tmp_path / "c.safetensors",
        {"unet": lin.state_dict()},
        {"task": "ldm", "optim": {"lr": 0.1}},
        "ldm",
        extra={"step": 7},
    )
    ckpt = load_checkpoint(path, expect_kind="ldm")
    assert ckpt.config["optim"]["lr"] == 0.1
    assert ckpt.metadata["step"] == "7"
    torch.testing.assert_close(ckpt.module_state("unet")["weight"], lin.weight)


def test_shared_tensors_are_saved(tmp_path: Path) -> None:
    w = torch.randn(2, 2)
    save_checkpoint(tmp_path / "s.safetensors", {"a": {"x": w, "y": w[0]}}, {}, "autoencoder")
    assert load_checkpoint(tmp_path / "s.safetensors").tensors["a.y"].shape == (2,)


def test_wrong_kind_and_missing_and_foreign(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.safetensors", {"m": {"x": torch.zeros(1)}}, {}, "autoencoder")
    with pytest.raises(CheckpointError, match="'autoencoder' checkpoint"):
        load_checkpoint(tmp_path / "a.safetensors", expect_kind="ldm")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_metadata(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an ldm checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors")


def test_atomic_write_leaves_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "last.safetensors"
    target.write_text("old")

    def fail(tmp: str) -> None:
        Path(tmp).write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]
