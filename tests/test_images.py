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


def test_labelled_grid_upscales_and_groups() -> None:
    import numpy as np

    from ldm.images import labelled_grid

    tile = np.zeros((2, 8, 8, 3), np.uint8)
    rows = [
        ("seen", "a red circle", tile),
        ("seen", "a blue square", tile),
        ("held-out", "a red triangle", tile),
    ]
    grid = labelled_grid(rows, scale=4, padding=2, font_size=12)
    # Three rows of 32 px tiles and two group headers (font + padding each).
    assert grid.shape[0] == 2 * (12 + 4) + 3 * (32 + 2) + 2
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    black = (grid[..., :3] == 0).all(-1)
    assert black.sum() >= 6 * 32 * 32  # every tile pasted at 4x
    assert grid.shape[1] > 2 * (32 + 2) + 60  # room for the prompt text beside the tiles
