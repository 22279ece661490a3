"""Fréchet shape distance (FSD): FID's formula in the shapes analyser's feature space.

FID (Heusel et al. 2017, eq. 6) compares Gaussians fitted to features of generated and reference
images; its Inception features need a weights file that cannot be downloaded here. On the
synthetic shapes data a feature space that needs no weights and means something exists: the
measurements of the deterministic analyser (`ldm.eval.shapes.analyse_shape`) — shape colour,
background colour, area, centroid, the two moment invariants that tell the kinds apart, fill
and stray foreground. FSD is the Fréchet distance (`ldm.eval.fid.frechet_distance`) between
those 13-dimensional features of generated and reference images, each feature standardised by
the reference set's mean and standard deviation, so 1.0 is a shift of one reference standard
deviation in one feature. An image in which no shape is found gets the features of an empty
picture (shape colour = background, zero area, centred, zero moments, no fill, all stray), so
failures count against the score rather than being dropped.

It is not Inception FID: the numbers are not comparable with published FIDs, only between
models on shapes data. Real images of the same data, drawn apart, give the floor (`fsd_floor`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ldm.eval.fid import frechet_distance
from ldm.eval.shapes import ShapeGeometry, analyse_shape, to_rgb01

FEATURES: tuple[str, ...] = (
    "shape_r",
    "shape_g",
    "shape_b",
    "background_r",
    "background_g",
    "background_b",
    "area",
    "centroid_x",
    "centroid_y",
    "c3",
    "c4",
    "fill",
    "stray",
)


def _border_median(rgb: np.ndarray) -> np.ndarray:
    """Median colour of the outermost pixel ring (the analyser's background estimate)."""
    ring = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(ring, axis=0)


def shape_features(image: Any, geometry: ShapeGeometry | None = None) -> tuple[np.ndarray, bool]:
    """The (13,) `FEATURES` of one image and whether the analyser found a shape in it.

    Args:
        image: any layout `ldm.eval.shapes.to_rgb01` accepts.
        geometry: the dataset's geometry (`ldm.eval.adherence.geometry_from_metadata`).
    """
    rgb = to_rgb01(image)
    background = _border_median(rgb)
    a = analyse_shape(image, geometry)
    if not a.found:
        return np.array([*background, *background, 0, 0.5, 0.5, 0, 0, 0, 1], np.float64), False
    f = a.features
    return np.array(
        [
            *f["rgb"],
            *background,
            f["area_fraction"],
            *f["centroid"],
            f["c3"],
            f["c4"],
            f["fill"],
            f["stray_fraction"],
        ],
        np.float64,
    ), True


def feature_matrix(
    images: Iterable[Any], geometry: ShapeGeometry | None = None
) -> tuple[np.ndarray, int]:
    """(N, 13) features of ``images`` and how many had a shape."""
    rows, found = [], 0
    for image in images:
        row, ok = shape_features(image, geometry)
        rows.append(row)
        found += ok
    if not rows:
        raise ValueError("no images to compute features of")
    return np.stack(rows), found


def frechet_shape_distance(generated: np.ndarray, reference: np.ndarray) -> float:
    """FSD between two feature matrices, standardised by the reference's mean and std.

    Raises:
        ValueError: fewer than two rows in either set, or mismatched widths.
    """
    if generated.ndim != 2 or reference.ndim != 2 or generated.shape[1] != reference.shape[1]:
        raise ValueError(f"feature matrices do not match: {generated.shape} vs {reference.shape}")
    if min(len(generated), len(reference)) < 2:
        raise ValueError("FSD needs at least 2 images in each set")
    mean, std = reference.mean(0), reference.std(0, ddof=1)  # ddof as np.cov: unit variances
    std = np.where(std > 1e-12, std, 1.0)  # a constant reference feature stays in its units
    g, r = (generated - mean) / std, (reference - mean) / std
    return frechet_distance(g.mean(0), np.cov(g, rowvar=False), r.mean(0), np.cov(r, rowvar=False))


def fsd_floor(reference: np.ndarray, seed: int = 0) -> float:
    """FSD between two random halves of the reference: what real images of the same data score
    at half the sample size (finite-sample bias and noise, the best a model can expect)."""
    order = np.random.default_rng(seed).permutation(len(reference))
    half = len(reference) // 2
    return frechet_shape_distance(reference[order[:half]], reference[order[half : 2 * half]])


def fsd_report(
    generated: Sequence[np.ndarray] | np.ndarray, reference: np.ndarray, found: int
) -> dict[str, Any]:
    """FSD, its floor and the found fraction as a JSON-able dict."""
    generated = np.asarray(generated)
    return {
        "fsd": frechet_shape_distance(generated, reference),
        "floor": fsd_floor(reference),
        "n_generated": len(generated),
        "n_reference": len(reference),
        "found_fraction": found / len(generated),
    }


__all__ = [
    "FEATURES",
    "feature_matrix",
    "frechet_shape_distance",
    "fsd_floor",
    "fsd_report",
    "shape_features",
]
