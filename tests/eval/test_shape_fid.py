"""Fréchet shape distance: the analyser's features, the standardised Fréchet distance in closed
form, that it ranks image sets the way their content differs, and the demo step's readers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.data.shapes import render_image
from ldm.data.shapes_vocab import COLORS, POSITIONS, SHAPES, SIZES, ShapeAttributes
from ldm.eval.shape_fid import (
    FEATURES,
    feature_matrix,
    frechet_shape_distance,
    fsd_floor,
    fsd_report,
    shape_features,
)


def renders(n: int, seed: int, **fixed: str) -> list:
    """``n`` shapes images with random attributes (some fixed) and jitter, as the dataset."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        attrs = {
            "color": rng.choice(list(COLORS)),
            "shape": rng.choice(list(SHAPES)),
            "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)),
            **fixed,
        }
        offset = tuple(rng.uniform(-0.03, 0.03, 2))
        out.append(render_image(ShapeAttributes(**attrs), 32, offset, supersample=2))
    return out


def test_features_of_a_known_image_and_of_a_blank_one() -> None:
    image = render_image(ShapeAttributes("red", "circle", "large", "center"), 32)
    f, found = shape_features(image)
    assert found and f.shape == (len(FEATURES),)
    named = dict(zip(FEATURES, f, strict=True))
    assert named["shape_r"] > 0.7 and named["shape_g"] < 0.3  # red
    assert min(named["background_r"], named["background_g"], named["background_b"]) > 0.9
    assert abs(named["centroid_x"] - 0.5) < 0.03 and abs(named["centroid_y"] - 0.5) < 0.03
    blank, found = shape_features(np.full((32, 32, 3), 200, np.uint8))
    assert not found
    np.testing.assert_allclose(blank, [200 / 255] * 6 + [0, 0.5, 0.5, 0, 0, 0, 1])


def test_standardised_frechet_distance_in_closed_form() -> None:
    """Same covariance, means one reference std apart in one feature: FSD = 1 exactly; the same
    set: 0; scaling every feature by 2 about the mean: FSD = d·(2 − 1)² = d."""
    ref = np.random.default_rng(0).normal(size=(500, 4)) * [1.0, 5.0, 0.1, 2.0]
    assert abs(frechet_shape_distance(ref, ref)) < 1e-9
    shifted = ref + [0.0, ref[:, 1].std(ddof=1), 0.0, 0.0]
    assert abs(frechet_shape_distance(shifted, ref) - 1.0) < 1e-9
    wide = ref.mean(0) + 2 * (ref - ref.mean(0))
    assert abs(frechet_shape_distance(wide, ref) - 4.0) < 1e-9
    with pytest.raises(ValueError, match="do not match"):
        frechet_shape_distance(ref[:, :3], ref)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_shape_distance(ref[:1], ref)


def test_fsd_ranks_sets_by_how_their_content_differs() -> None:
    """Fresh renders of the same distribution score near the floor; only red circles, or blank
    images, score far above it; the report counts found shapes."""
    real, found = feature_matrix(renders(96, 0))
    assert found == 96
    same = frechet_shape_distance(feature_matrix(renders(96, 1))[0], real)
    skewed = frechet_shape_distance(
        feature_matrix(renders(96, 2, color="red", shape="circle"))[0], real
    )
    blank_images = [np.full((32, 32, 3), 255, np.uint8)] * 48 + renders(48, 3)
    blank, n_found = feature_matrix(blank_images)
    floor = fsd_floor(real)
    assert same < 2 * floor + 1 and skewed > 5 * same and n_found == 48, (same, skewed, floor)
    report = fsd_report(blank, real, n_found)
    assert report["fsd"] > 5 * same and report["found_fraction"] == 0.5
    assert report["n_generated"] == 96 and report["n_reference"] == 96


def test_demo_reads_the_val_split_in_order(shapes_data: dict[str, str]) -> None:
    from ldm.demo_fid import format_fsd, val_images

    images, captions = val_images(shapes_data["val"], 10, 32)
    assert len(images) == len(captions) == 10 and images[0].shape == (3, 32, 32)
    again, _ = val_images(shapes_data["val"], 10, 32)
    assert all(torch.equal(a, b) for a, b in zip(images, again, strict=True))
    real, found = feature_matrix(images)
    assert found >= 9  # the analyser finds the dataset's own shapes
    line = format_fsd(
        {**fsd_report(real, real, found), "guidance": 2.5, "sampler": "ddim", "steps": 20}
    )
    assert "NOT Inception FID" in line and "0.000 for 10 samples" in line
