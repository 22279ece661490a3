"""Image grids and PNG metadata."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ldm.images import make_grid, save_grid, to_uint8


def test_to_uint8_range_and_grid_layout(tmp_path: Path) -> None:
    x = torch.stack([torch.full((3, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    arr = to_uint8(x)
    assert arr.dtype.name == "uint8" and arr[0].max() == 0 and arr[2].min() == 255
    grid = make_grid(x, nrow=2, padding=1)
    assert grid.shape == (2 * 4 + 3, 2 * 4 + 3, 3)
    path = save_grid(x, tmp_path / "g.png", nrow=2, text={"prompt": "a red circle"})
    assert Image.open(path).text["prompt"] == "a red circle"
