"""Resume checkpoints stream to the file: no second copy of the training state in memory
(Lightning's default serialises into an io.BytesIO first); loads map the file and, on the CPU,
copy the optimizer state out of it; train.py's trainer uses it."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest
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
    assert trainer.strategy.checkpoint_io.own_optimizer_state  # the demo trains on the CPU


def mapped(path: Path) -> bool:
    """Whether this process maps ``path`` (Linux: /proc/self/maps)."""
    return str(path) in Path("/proc/self/maps").read_text()


def resume_state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "state_dict": {"w": torch.randn(MB, generator=g)},
        "optimizer_states": [
            {
                "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(MB, generator=g)}},
                "param_groups": [{"lr": 1e-4, "params": [0]}],
            }
        ],
    }


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("own", [True, False])
def test_load_maps_the_file_and_copies_optimizer_state_out(tmp_path: Path, own: bool) -> None:
    """The weights are read from the mapped file (no private copy); on the CPU the moments are
    copied out, so nothing keeps the file mapped (on disk after a save replaced it) once the
    checkpoint dict is gone. Without the copy the moments keep it, which is what a GPU run's
    optimizer (moving them to the device) does not."""
    state = resume_state()
    path = tmp_path / "resume.ckpt"
    StreamingCheckpointIO().save_checkpoint(state, path)
    loaded = StreamingCheckpointIO(own_optimizer_state=own).load_checkpoint(path, weights_only=True)
    assert mapped(path)
    moments = loaded["optimizer_states"][0]["state"][0]
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    del loaded
    gc.collect()
    assert mapped(path) is not own
    assert torch.equal(moments["exp_avg"], state["optimizer_states"][0]["state"][0]["exp_avg"])
    assert moments["step"].item() == 3.0


def test_legacy_format_file_loads_unmapped(tmp_path: Path) -> None:
    state = resume_state()
    path = tmp_path / "legacy.ckpt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = StreamingCheckpointIO(own_optimizer_state=True).load_checkpoint(
        path, weights_only=True
    )
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        StreamingCheckpointIO().load_checkpoint(tmp_path / "nothing.ckpt")


def test_unmappable_file_is_read_instead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that cannot map (some network and FUSE mounts) falls back to reading."""
    state = resume_state()
    path = tmp_path / "resume.ckpt"
    StreamingCheckpointIO().save_checkpoint(state, path)
    real_load = torch.load

    def no_mmap(*args, mmap=None, **kwargs):
        if mmap:
            raise OSError("mmap: operation not supported")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    loaded = StreamingCheckpointIO(own_optimizer_state=True).load_checkpoint(
        path, weights_only=True
    )
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


class Pickled:
    """Not a tensor or a plain value: only full unpickling could rebuild it."""


def test_loads_never_unpickle_code(tmp_path: Path) -> None:
    path = tmp_path / "resume.ckpt"
    torch.save({"state_dict": {}, "object": Pickled()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        StreamingCheckpointIO().load_checkpoint(path, weights_only=False)
