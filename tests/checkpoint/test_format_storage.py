"""save_checkpoint stores CPU weights without copying them, and views, transposes, tied weights
and empty tensors as independent tensors that load back exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.checkpoint.format import load_checkpoint, save_checkpoint, storable_tensors


def test_owning_cpu_tensors_are_not_copied() -> None:
    weight, bias = torch.randn(64, 32), torch.randn(64)
    out = storable_tensors({"w": weight, "b": bias})
    assert out["w"].data_ptr() == weight.data_ptr() and out["b"].data_ptr() == bias.data_ptr()


def test_views_shared_and_empty_tensors_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = torch.randn(8, 6)
    tied = torch.randn(5, 3)
    state = {
        "base": base,
        "row": base[2],  # a view into base's storage
        "t": base.t(),  # non-contiguous
        "tied_a": tied,
        "tied_b": tied,  # the same tensor twice (tied weights)
        "empty_a": torch.empty(0),
        "empty_b": torch.empty(0, 4),
    }
    stored = storable_tensors(state)
    ptrs = [v.untyped_storage().data_ptr() for v in stored.values() if v.numel()]
    assert len(ptrs) == len(set(ptrs))  # every stored tensor owns its memory alone
    path = save_checkpoint(tmp_path / "m.safetensors", {"unet": state}, {"task": "ldm"}, "ldm")
    loaded = load_checkpoint(path).tensors
    for key, value in state.items():
        assert torch.equal(loaded[f"unet.{key}"], value), key
    base.add_(1.0)  # the saved file holds the values at save time, not a live view
    assert not torch.equal(load_checkpoint(path).tensors["unet.row"], base[2])
