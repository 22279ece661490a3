"""A deterministic analyser for the synthetic "shapes" images: colour, kind, size and position.

No network and no learned weights: plain numpy/PIL image analysis, so prompt-adherence numbers are
reproducible and do not depend on a second model. For an image (see :func:`to_rgb01` for the
accepted layouts) :func:`analyse_shape`:

1. estimates the background colour as the median of the border pixels;
2. segments the foreground by RGB distance from the background, thresholded halfway between the
   background and the shape's contrast (a high quantile of the distance), and keeps the largest
   8-connected component;
3. takes the shape colour as the median of the component's most saturated quarter and names it by
   the nearest palette colour in CIELAB (ΔE*ab, CIE 1976);
4. unmixes a soft coverage map ``alpha`` (pixel = alpha·shape + (1 − alpha)·background) in a
   small neighbourhood of the component, which gives sub-pixel area and centroid even for
   anti-aliased, blurred or noisy shapes;
5. names the kind by the nearest prototype in two normalised complex moments of ``alpha``
   (Abu-Mostafa & Psaltis 1984, "Recognitive aspects of moment invariants", IEEE TPAMI 6(6)):
   ``c3 = |Σ alpha·(z − z̄)³| / area^2.5`` and ``c4 = |Σ alpha·(z − z̄)⁴| / area³`` with
   ``z = x + iy``. They are invariant to scale, translation and rotation; ``c_p0`` vanishes for a
   shape with k-fold symmetry unless k divides p, so the triangle (3-fold) has only ``c3``, the
   square (4-fold) only ``c4``, the circle neither. They are also invariant to an isotropic blur
   (the convolution's central moments are sums over binomial terms whose PSF factors
   ``c_k0(psf)`` are 0 for k ≥ 1; Flusser & Suk 1998, "Degraded image analysis: an invariant
   approach", IEEE TPAMI 20(6)), which matters for blurry generated images. Pixel noise is
   handled by its propagated standard error (estimated from the border): the Rayleigh bias of
   the magnitude is removed and the distance to each prototype is measured in units of
   ``tolerance ⊕ standard error``. (The fill ratio ``area / (max column sum · max row sum)`` is
   reported too, but blur moves it too much to decide by.)
6. names the size by comparing the area with the midpoint of the expected small and large areas
   of that kind, and the position by the nearest of the five centres.

The geometry (centres, expected areas, feature prototypes) is *measured* by rendering with the
dataset's own :func:`ldm.data.shapes.render_image` (once per setting of the generator's ``radii``,
which a dataset's ``metadata.json`` records: :func:`ldm.eval.adherence.geometry_from_metadata`),
so it cannot drift from the generator.
Images with no clear foreground (blank, noise, a border that is not one colour) give a
:class:`ShapeAnalysis` whose attributes are all ``None``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ldm.data.shapes import DEFAULT_RADII, check_radii, render_image
from ldm.data.shapes_vocab import (
    BACKGROUNDS,
    COLORS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeAttributes,
)

#: The attributes the analyser recovers and adherence scores.
SCORED_ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")
#: Below this RGB contrast (Euclidean, [0, 1] units) there is no foreground.
MIN_CONTRAST = 0.15
#: Spread of the kind features around their prototypes, relative to the largest prototype value.
_TOLERANCE = 0.15


@dataclass(frozen=True)
class ShapeGeometry:
    """What the generator draws, measured from :func:`render_image`.

    Attributes:
        centers: Position name -> shape centre ``(x, y)`` as fractions of the side.
        areas: ``(shape, size)`` -> shape area as a fraction of the image area.
        prototypes: Shape kind -> normalised complex moments ``(c3, c4)``.
        colors: Colour names the analyser chooses from: the six default colours, plus the
            dataset's opt-in ``extra_colors`` (:func:`ldm.eval.adherence.geometry_from_metadata`).
    """

    centers: dict[str, tuple[float, float]]
    areas: dict[tuple[str, str], float]
    prototypes: dict[str, tuple[float, float]]
    colors: tuple[str, ...] = tuple(COLORS)


@dataclass(frozen=True)
class ShapeAnalysis:
    """What :func:`analyse_shape` recovered from one image.

    Attributes:
        color: Palette colour name, or ``None`` when no shape was found (likewise below).
        shape: ``"circle"``, ``"square"`` or ``"triangle"``.
        size: ``"small"`` or ``"large"``.
        position: One of the five position names.
        background: Nearest background name.
        confidence: In [0, 1]: the smallest per-attribute decision margin (0 = a tie between
            two answers, 1 = exactly a prototype); 0 when nothing was found.
        reason: Why nothing was found (empty when a shape was found).
        features: Measurements behind the decisions, for debugging and reports: area_fraction,
            centroid (x, y fractions), c3, c4 (debiased moments), fill, noise (pixel noise of
            alpha), rgb (shape colour in [0, 1]), contrast, stray_fraction (foreground pixels
            outside the chosen component, e.g. a second shape).
    """

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    background: str | None = None
    confidence: float = 0.0
    reason: str = ""
    features: dict[str, Any] = field(default_factory=dict)

    @property
    def found(self) -> bool:
        """Whether a shape was found."""
        return self.shape is not None

    def attributes(self) -> dict[str, str | None]:
        """The four scored attributes (``None`` where not found)."""
        return {name: getattr(self, name) for name in SCORED_ATTRIBUTES}


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


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask ``(H, W)``.

    Labels horizontal runs and joins runs of adjacent rows that touch (diagonals included) with
    union-find: a few Python operations per run instead of per pixel.
    """
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
                if starts[j] <= ends[i] and starts[i] <= ends[j]:  # overlap or diagonal touch
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


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2·radius+1)² square."""
    out = mask.copy()
    for _ in range(radius):
        padded = np.pad(out, 1)
        out = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def _coverage(rgb: np.ndarray, background: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Per-pixel fraction of ``color`` in a blend with ``background`` (least squares, unclipped).

    ``pixel = alpha·c + (1 − alpha)·bg``  ->  ``alpha = <pixel − bg, c − bg> / |c − bg|²``.
    """
    direction = color - background
    return (rgb - background) @ direction / max(float(direction @ direction), 1e-12)  # (H, W)


def _moments(alpha: np.ndarray) -> dict[str, float]:
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


def _robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (Gaussian consistent)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _margin(distances: np.ndarray) -> float:
    """Decision margin of a nearest-candidate choice: 1 − best / second best, in [0, 1]."""
    best, second = np.sort(distances)[:2]
    return float(1.0 - best / second) if second > 0 else 0.0


def _render_alpha(
    attrs: ShapeAttributes, image_size: int, radii: Mapping[str, float]
) -> np.ndarray:
    rgb = to_rgb01(np.asarray(render_image(attrs, image_size, radii=radii)))
    return _coverage(rgb, np.ones(3), np.asarray(COLORS[attrs.color]) / 255.0)


def shape_geometry(
    radii: Mapping[str, float] | None = None, image_size: int = 128
) -> ShapeGeometry:
    """Measure centres, areas and kind prototypes by rendering with the dataset's generator.

    Args:
        radii: The generator's ``radii`` setting (default: ``DEFAULT_RADII``); a dataset's
            ``metadata.json`` records it under ``config``.
        image_size: Side of the calibration renders (large, so pixelation is negligible).

    Results are cached per ``(radii, image_size)``.
    """
    radii = DEFAULT_RADII if radii is None else radii
    check_radii(radii)
    return _measure_geometry(tuple(float(radii[size]) for size in SIZES), image_size)


@functools.lru_cache(maxsize=8)
def _measure_geometry(radii_values: tuple[float, ...], image_size: int) -> ShapeGeometry:
    radii = dict(zip(SIZES, radii_values, strict=True))
    centers = {}
    for position in POSITIONS:
        attrs = ShapeAttributes("red", "circle", "small", position)
        m = _moments(_render_alpha(attrs, image_size, radii))
        centers[position] = (m["cx"] / image_size, m["cy"] / image_size)
    areas, features = {}, {}
    for shape in SHAPES:
        for size in SIZES:
            attrs = ShapeAttributes("red", shape, size, "center")
            m = _moments(_render_alpha(attrs, image_size, radii))
            areas[(shape, size)] = m["area"] / image_size**2
            features.setdefault(shape, []).append((m["c3"], m["c4"]))
    prototypes = {k: tuple(np.mean(v, axis=0).tolist()) for k, v in features.items()}
    return ShapeGeometry(centers, areas, prototypes)  # type: ignore[arg-type]


def _nearest(table: dict[str, Any], value: np.ndarray, scale: Any = None) -> tuple[str, float]:
    """Name of the entry of ``table`` nearest to ``value`` (after ``scale``), and the margin."""
    names = list(table)
    points = np.array([table[n] for n in names], dtype=np.float64)
    if scale is not None:
        points, value = scale(points), scale(value)
    distances = np.linalg.norm(points - value, axis=-1)
    return names[int(np.argmin(distances))], _margin(distances)


@functools.lru_cache(maxsize=4)
def _named_colors_lab(
    colors: tuple[str, ...] = tuple(COLORS),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """CIELAB of the palette colours ``colors`` and of the backgrounds."""
    named = {**{n: PALETTE[n] for n in colors}, **BACKGROUNDS}
    lab = {name: srgb_to_lab(np.asarray(c) / 255.0) for name, c in named.items()}
    return {n: lab[n] for n in colors}, {n: lab[n] for n in BACKGROUNDS}


def _segment(rgb: np.ndarray, geometry: ShapeGeometry) -> tuple[Any, ...] | str:
    """Find the shape: ``(background, border, foreground, component, color, contrast)``.

    Returns the background colour, the border mask, the thresholded foreground, its largest
    component, the shape colour and the contrast; or a string saying why there is no shape.
    """
    h, w = rgb.shape[:2]
    width = max(1, min(h, w) // 32)
    border = np.ones((h, w), dtype=bool)
    border[width:-width, width:-width] = False
    background = np.median(rgb[border], axis=0)
    dist = np.linalg.norm(rgb - background, axis=-1)  # (H, W)
    # Half the smallest shape's area: this quantile lies inside any shape's core.
    contrast = float(np.quantile(dist, 1.0 - 0.5 * min(geometry.areas.values())))
    if contrast < MIN_CONTRAST:
        return "no foreground (image is flat)"
    if float(np.median(dist[border])) > 0.25 * contrast:
        return "border is not a plain background"
    threshold = max(0.5 * contrast, float(np.quantile(dist[border], 0.95)))
    foreground = dist > threshold
    component = _largest_component(foreground)
    if component.sum() < max(3.0, 0.25 * min(geometry.areas.values()) * h * w):
        return "foreground too small"
    inside = dist[component]
    color = np.median(rgb[component][inside >= np.quantile(inside, 0.75)], axis=0)
    return background, border, foreground, component, color, contrast


def analyse_shape(image: Any, geometry: ShapeGeometry | None = None) -> ShapeAnalysis:
    """Recover colour, kind, size and position of the shape in one image.

    Args:
        image: Any layout :func:`to_rgb01` accepts (uint8 HWC, [-1, 1] CHW tensor, PIL image).
        geometry: What the generator draws (:func:`shape_geometry` of the dataset's ``radii``);
            default: the default radii.

    Returns:
        A :class:`ShapeAnalysis`; its attributes are ``None`` (and ``reason`` says why) when the
        image shows no single clear shape on a plain background.
    """
    rgb = to_rgb01(image)
    h, w = rgb.shape[:2]
    if min(h, w) < 8:
        return ShapeAnalysis(reason="image smaller than 8x8")
    geometry = geometry or shape_geometry()
    segmented = _segment(rgb, geometry)
    if isinstance(segmented, str):
        return ShapeAnalysis(reason=segmented)
    background, border, foreground, component, color, contrast = segmented

    region = _dilate(component, max(2, min(h, w) // 32))
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgb[y0:y1, x0:x1]  # (h', w', 3), the region's bounding box
    alpha = np.where(region[y0:y1, x0:x1], _coverage(crop, background, color), 0.0)
    m = _moments(alpha)
    area_fraction = m["area"] / (h * w)
    if not m["area"] > 0 or m["fill"] < 0.2:
        return ShapeAnalysis(reason="foreground is not a compact shape")
    if area_fraction > 2 * max(geometry.areas.values()):
        return ShapeAnalysis(reason="foreground too large for a shape")

    palette_lab, backgrounds_lab = _named_colors_lab(tuple(geometry.colors))
    color_name, color_margin = _nearest(palette_lab, srgb_to_lab(color))
    background_name, _ = _nearest(backgrounds_lab, srgb_to_lab(background))

    noise = _robust_std(_coverage(rgb[border], background, color))  # pixel noise of alpha
    se = noise * np.array([m["se3"], m["se4"]])
    # Noise adds a Rayleigh bias to a magnitude, E|c|^2 = |c_true|^2 + 2·se^2: remove it.
    invariants = np.sqrt(np.maximum(np.array([m["c3"], m["c4"]]) ** 2 - 2 * se**2, 0.0))
    scales = np.max(list(geometry.prototypes.values()), axis=0)
    spread = np.sqrt((_TOLERANCE * scales) ** 2 + se**2)
    shape, shape_margin = _nearest(geometry.prototypes, invariants, lambda p: p / spread)

    small, large = geometry.areas[(shape, "small")], geometry.areas[(shape, "large")]
    size = "large" if area_fraction > (small + large) / 2 else "small"
    size_margin = _margin(np.abs(np.log(area_fraction / np.array([small, large]))))
    centroid = np.array([(x0 + m["cx"]) / w, (y0 + m["cy"]) / h])
    position, position_margin = _nearest(geometry.centers, centroid)
    features = {
        "area_fraction": area_fraction,
        "centroid": (float(centroid[0]), float(centroid[1])),
        "c3": float(invariants[0]),
        "c4": float(invariants[1]),
        "fill": m["fill"],
        "noise": noise,
        "rgb": tuple(float(v) for v in color),
        "contrast": contrast,
        "stray_fraction": float(1.0 - component.sum() / foreground.sum()),
    }
    return ShapeAnalysis(
        color=color_name,
        shape=shape,
        size=size,
        position=position,
        background=background_name,
        confidence=min(color_margin, shape_margin, size_margin, position_margin),
        features=features,
    )
