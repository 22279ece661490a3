"""Image operations of the shape analyser (`ldm.eval.shapes`), in numpy: images to RGB in
[0, 1], sRGB to CIELAB, the largest 4-connected component, dilation, soft coverage of a colour
against the background, the image moments behind the shape features, robust spreads."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_rgb01(image: Any) -> np.ndarray:
    """Convert an image to a float ``(H, W, 3)`` array in [0, 1].

    Args:
        image: A PIL image, or an array/tensor laid out ``(H, W, C)``, ``(C, H, W)``,
            ``(1, C, H, W)`` or ``(H, W)`` (C = 1, 3 or 4): uint8 in [0, 255], any other dtype
            in [-1, 1]. Alpha channels are dropped, grey is repeated to RGB.

    Returns:
        ``(H, W, 3)`` float64 array; ``(0, 0, 3)`` for an empty input.

    Raises:
        ValueError: For an array that is not an image layout.
    """
    if hasattr(image, "detach"):  # torch tensor, converted without importing torch here
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.size == 0:
        return np.zeros((0, 0, 3))
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an image (H, W, C) or (C, H, W), got shape {arr.shape}")
    if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if arr.dtype == np.uint8:
        rgb = arr.astype(np.float64) / 255.0
    else:
        rgb = (np.nan_to_num(arr.astype(np.float64)) + 1.0) / 2.0
    rgb = rgb[..., :3] if rgb.shape[-1] >= 3 else np.repeat(rgb[..., :1], 3, axis=-1)
    return np.clip(rgb, 0.0, 1.0)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIE 1976 L*a*b* (D65) of sRGB colours in [0, 1], ``(..., 3)`` -> ``(..., 3)``.

    sRGB linearisation and XYZ matrix per IEC 61966-2-1; L*a*b* as defined in CIE 15:2004.
    """
    rgb = np.asarray(rgb, dtype=np.float64)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
         [0.0193339, 0.1191920, 0.9503041]]
    )  # fmt: skip
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def largest_component(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The largest 8-connected (or, ``connectivity=4``, 4-connected) component of a boolean
    mask ``(H, W)``; of equal ones, the first in row-major order.

    Labels horizontal runs and joins runs of adjacent rows that touch (diagonals included at 8)
    with union-find: a few Python operations per run instead of per pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    reach = 1 if connectivity == 8 else 0  # runs [s, e) of adjacent rows join if they overlap
    edges = np.diff(np.pad(mask.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # (H, W + 1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; same row-major order as the starts
    parent = list(range(len(rows)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Runs of row y are first[y]:first[y + 1].
    first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for y in range(mask.shape[0] - 1):
        for i in range(first[y], first[y + 1]):
            for j in range(first[y + 1], first[y + 2]):
                if starts[j] < ends[i] + reach and starts[i] < ends[j] + reach:
                    parent[find(i)] = find(j)
    sizes: dict[int, int] = {}
    for i in range(len(rows)):
        root = find(i)
        sizes[root] = sizes.get(root, 0) + int(ends[i] - starts[i])
    out = np.zeros_like(mask, dtype=bool)
    if sizes:
        best = max(sizes, key=sizes.__getitem__)
        for i in range(len(rows)):
            if find(i) == best:
                out[rows[i], starts[i] : ends[i]] = True
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2·radius+1)² square."""
    out = mask.copy()
    for _ in range(radius):
        padded = np.pad(out, 1)
        out = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def coverage(rgb: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Per-pixel fraction of ``color`` in a blend with ``background`` (least squares, unclipped).

    ``pixel = alpha·c + (1 − alpha)·bg``  ->  ``alpha = <pixel − bg, c − bg> / |c − bg|²``.
    """
    direction = color - background
    return (rgb - background) @ direction / max(float(direction @ direction), 1e-12)  # (H, W)


def moments(alpha: np.ndarray) -> dict[str, float]:
    """Area, centroid, fill ratio and normalised complex moments of a coverage map ``(H, W)``."""
    h, w = alpha.shape
    area = float(alpha.sum())
    names = ("area", "cx", "cy", "fill", "c3", "c4", "se3", "se4")
    if not area > 0:  # nothing to measure (the caller rejects it)
        return dict.fromkeys(names, 0.0)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, each (H, W)
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    z = (xs - cx) + 1j * (ys - cy)  # (H, W)
    fill = area / max(float(alpha.sum(0).max()) * float(alpha.sum(1).max()), 1e-12)
    c3 = abs(complex((alpha * z**3).sum())) / area**2.5
    c4 = abs(complex((alpha * z**4).sum())) / area**3
    # Standard errors per unit of pixel noise in alpha, over the pixels that are summed.
    r2 = np.abs(z[alpha != 0]) ** 2
    se3 = float(np.sqrt((r2**3).sum() / 2)) / area**2.5
    se4 = float(np.sqrt((r2**4).sum() / 2)) / area**3
    return dict(zip(names, (area, cx, cy, fill, c3, c4, se3, se4), strict=True))


def robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (Gaussian consistent)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def margin(distances: np.ndarray) -> float:
    """Decision margin of a nearest-candidate choice: 1 − best / second best, in [0, 1]."""
    best, second = np.sort(distances)[:2]
    return float(1.0 - best / second) if second > 0 else 0.0
