"""Tensors to pictures: [-1, 1] tensors to uint8 arrays, grids, and PNGs with metadata.

Plain numpy + PIL (no torchvision), shared by the training callbacks and ``sample.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map a batch in [-1, 1] to uint8 HWC arrays.

    Args:
        images: ``(B, C, H, W)`` float tensor in [-1, 1] (C is 1 or 3).

    Returns:
        ``(B, H, W, C)`` uint8 array.
    """
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch into one uint8 image, row-major, ``nrow`` images per row.

    Args:
        images: ``(B, C, H, W)`` tensor in [-1, 1].
        nrow: Images per row (default: ceil(sqrt(B))).
        padding: White pixels between tiles.

    Returns:
        ``(H', W', C)`` uint8 array.
    """
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = np.full(
        (ncol * h + (ncol + 1) * padding, nrow * w + (nrow + 1) * padding, c), 255, np.uint8
    )
    for i in range(b):
        r, q = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[y : y + h, x : x + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path, text: Mapping[str, str] | None = None) -> Path:
    """Write a uint8 HWC array as PNG, with optional text chunks (prompt, seed, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, str(value))
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image.save(path, pnginfo=info)
    return path


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    text: Mapping[str, str] | None = None,
) -> Path:
    """Save a batch in [-1, 1] as one PNG grid."""
    return save_png(make_grid(images, nrow=nrow), path, text)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as a ``(1, 3, H, W)`` tensor in [-1, 1], optionally resized."""
    image = Image.open(path).convert("RGB")
    if size is not None:
        image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)


def caption_grid(captions: Sequence[str], nrow: int) -> str:
    """A readable caption list for a grid: one ``row,col: caption`` line per image."""
    return "\n".join(f"{i // nrow},{i % nrow}: {c}" for i, c in enumerate(captions))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # a scalable font with FreeType (Pillow ≥ 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def labelled_grid(
    rows: Sequence[tuple[str, str, np.ndarray]],
    scale: int = 3,
    padding: int = 4,
    font_size: int = 16,
) -> np.ndarray:
    """A legible grid: one row of images per prompt, its text beside it, rows grouped.

    Images are upscaled by ``scale`` (nearest neighbour, so pixels stay visible); a header line
    starts each group (``seen``, ``held-out``, ...) where the group changes.

    Args:
        rows: ``(group, label, images)`` per row; ``images`` is ``(N, H, W, C)`` uint8 (C=3).
        scale: Integer upscaling of every image.
        padding: White pixels between tiles.
        font_size: Text size in pixels.

    Returns:
        ``(H', W', 3)`` uint8 array.
    """
    if not rows:
        raise ValueError("labelled_grid needs at least one row")
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(measure.textlength(label, font=font)) for _, label, _ in rows) + 2 * padding
    tiles = [
        [
            Image.fromarray(a).resize((a.shape[1] * scale, a.shape[0] * scale), Image.NEAREST)
            for a in images
        ]
        for _, _, images in rows
    ]
    tile_h = max(t.height for row in tiles for t in row)
    tile_w = max(t.width for row in tiles for t in row)
    ncol = max(len(row) for row in tiles)
    header_h = font_size + 2 * padding
    groups = [g for i, (g, _, _) in enumerate(rows) if i == 0 or rows[i - 1][0] != g]
    width = text_w + ncol * (tile_w + padding) + padding
    height = len(groups) * header_h + len(rows) * (tile_h + padding) + padding
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for i, ((group, label, _), row) in enumerate(zip(rows, tiles, strict=True)):
        if i == 0 or rows[i - 1][0] != group:
            draw.text((padding, y + padding), group, fill=(0, 0, 0), font=font)
            y += header_h
        draw.text(
            (padding, y + padding + max(0, (tile_h - font_size) // 2)),
            label,
            fill=(40, 40, 40),
            font=font,
        )
        for j, tile in enumerate(row):
            canvas.paste(tile, (text_w + j * (tile_w + padding), y + padding))
        y += tile_h + padding
    return np.asarray(canvas)
