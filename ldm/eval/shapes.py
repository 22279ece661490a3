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
from ldm.eval.image_ops import (  # to_rgb01, srgb_to_lab: also this module's API
    coverage,
    dilate,
    largest_component,
    margin,
    moments,
    robust_std,
    srgb_to_lab,
    to_rgb01,
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


def _render_alpha(
    attrs: ShapeAttributes, image_size: int, radii: Mapping[str, float]
) -> np.ndarray:
    rgb = to_rgb01(np.asarray(render_image(attrs, image_size, radii=radii)))
    return coverage(rgb, np.ones(3), np.asarray(COLORS[attrs.color]) / 255.0)


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
        m = moments(_render_alpha(attrs, image_size, radii))
        centers[position] = (m["cx"] / image_size, m["cy"] / image_size)
    areas, features = {}, {}
    for shape in SHAPES:
        for size in SIZES:
            attrs = ShapeAttributes("red", shape, size, "center")
            m = moments(_render_alpha(attrs, image_size, radii))
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
    return names[int(np.argmin(distances))], margin(distances)


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
    component = largest_component(foreground)
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

    region = dilate(component, max(2, min(h, w) // 32))
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgb[y0:y1, x0:x1]  # (h', w', 3), the region's bounding box
    alpha = np.where(region[y0:y1, x0:x1], coverage(crop, background, color), 0.0)
    m = moments(alpha)
    area_fraction = m["area"] / (h * w)
    if not m["area"] > 0 or m["fill"] < 0.2:
        return ShapeAnalysis(reason="foreground is not a compact shape")
    if area_fraction > 2 * max(geometry.areas.values()):
        return ShapeAnalysis(reason="foreground too large for a shape")

    palette_lab, backgrounds_lab = _named_colors_lab(tuple(geometry.colors))
    color_name, color_margin = _nearest(palette_lab, srgb_to_lab(color))
    background_name, _ = _nearest(backgrounds_lab, srgb_to_lab(background))

    noise = robust_std(coverage(rgb[border], background, color))  # pixel noise of alpha
    se = noise * np.array([m["se3"], m["se4"]])
    # Noise adds a Rayleigh bias to a magnitude, E|c|^2 = |c_true|^2 + 2·se^2: remove it.
    invariants = np.sqrt(np.maximum(np.array([m["c3"], m["c4"]]) ** 2 - 2 * se**2, 0.0))
    scales = np.max(list(geometry.prototypes.values()), axis=0)
    spread = np.sqrt((_TOLERANCE * scales) ** 2 + se**2)
    shape, shape_margin = _nearest(geometry.prototypes, invariants, lambda p: p / spread)

    small, large = geometry.areas[(shape, "small")], geometry.areas[(shape, "large")]
    size = "large" if area_fraction > (small + large) / 2 else "small"
    size_margin = margin(np.abs(np.log(area_fraction / np.array([small, large]))))
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
