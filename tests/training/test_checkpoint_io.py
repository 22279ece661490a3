"""Resume checkpoints stream to the file: no second copy of the training state in memory
(Lightning's default serialises into an io.BytesIO first), and train.py's trainer uses it."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.config import load
from ldm.trainer import build_trainer
from ldm.training.checkpoint_io import StreamingCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


def peak_python_bytes(io: TorchCheckpointIO, state: dict, path: Path) -> int:
    tracemalloc.start()  # traces Python allocations: an io.BytesIO, not torch's own memory
    try:
        io.save_checkpoint(state, path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_save_holds_no_copy_and_loads_back(tmp_path: Path) -> None:
    state = {"state_dict": {"w": torch.randn(4 * MB, generator=torch.Generator().manual_seed(0))}}
    assert peak_python_bytes(TorchCheckpointIO(), state, tmp_path / "lightning.ckpt") >= 16 * MB
    path = tmp_path / "sub" / "ours.ckpt"  # a 16 MB tensor, its directory made on the way
    assert peak_python_bytes(StreamingCheckpointIO(), state, path) < 2 * MB
    loaded = StreamingCheckpointIO().load_checkpoint(path, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


def test_train_py_trainer_saves_through_it(tmp_path: Path) -> None:
    cfg = load([ROOT / "configs" / "demo" / "ldm.yaml"], ["logging.logger=csv"])
    trainer = build_trainer(cfg, tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, StreamingCheckpointIO)
