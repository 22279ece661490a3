"""The shapes analyser: accuracy on real dataset images (clean and degraded), layouts, garbage."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from ldm.data.shapes import ShapesConfig, make_sample, render_image
from ldm.data.shapes_vocab import ShapeAttributes, parse_held_out
from ldm.eval.image_ops import largest_component
from ldm.eval.shapes import (
    SCORED_ATTRIBUTES,
    ShapeAnalysis,
    ShapeGeometry,
    analyse_shape,
    shape_geometry,
    srgb_to_lab,
    to_rgb01,
)

#: Samples per resolution: the demo's 64 px in full, 32 px (tests, quick runs) fewer.
NUM_SAMPLES = {64: 600, 32: 300}


def dataset_images(
    image_size: int, count: int, radii: dict[str, float] | None = None
) -> list[tuple[np.ndarray, dict]]:
    """``count`` real samples (5/6 train, 1/6 held-out split) as uint8 arrays with attributes."""
    cfg = ShapesConfig(image_size=image_size)
    if radii is not None:
        cfg.radii = radii
    specs = parse_held_out(cfg.held_out)
    out = []
    for split, n in (("train", count - count // 6), ("heldout", count // 6)):
        for i in range(n):
            sample = make_sample(cfg, split, i, specs)
            image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
            out.append((image, sample["json"]))
    return out


@pytest.fixture(scope="module", params=[64, 32], ids=["64px", "32px"])
def real_images(request: pytest.FixtureRequest) -> list[tuple[np.ndarray, dict]]:
    return dataset_images(request.param, NUM_SAMPLES[request.param])


def degrade(image: np.ndarray, rng: np.random.Generator, sigma: float, blur: float) -> np.ndarray:
    """Gaussian blur (std ``blur`` px), then Gaussian noise (std ``sigma`` in [0, 1] units)."""
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur)))
    noisy = blurred / 255.0 + rng.normal(0.0, sigma, image.shape)
    return (np.clip(noisy, 0.0, 1.0) * 255).round().astype(np.uint8)


def accuracy(
    pairs: list[tuple[np.ndarray, dict]], geometry: ShapeGeometry | None = None
) -> dict[str, float]:
    hits = {name: 0 for name in SCORED_ATTRIBUTES}
    for image, meta in pairs:
        result = analyse_shape(image, geometry)
        for name in SCORED_ATTRIBUTES:
            hits[name] += getattr(result, name) == meta[name]
    return {name: n / len(pairs) for name, n in hits.items()}


def test_accuracy_on_real_dataset_images(real_images: list[tuple[np.ndarray, dict]]) -> None:
    acc = accuracy(real_images)
    assert min(acc.values()) >= 0.98, acc


@pytest.mark.parametrize("small", [0.13, 0.16])  # 0.13: the demo's 32 px dataset
def test_accuracy_with_configured_radii(small: float) -> None:
    """A dataset drawn with other radii is read with its own geometry."""
    radii = {"small": small, "large": 0.19}
    images = dataset_images(32, 180, radii)
    assert min(accuracy(images, shape_geometry(radii)).values()) >= 0.98
    if small > 0.15:  # past the default sizes' midpoint: the default geometry calls them large
        assert accuracy(images)["size"] < 0.9


def test_accuracy_on_noisy_blurred_images(real_images: list[tuple[np.ndarray, dict]]) -> None:
    rng = np.random.default_rng(0)
    blur = 0.7 if real_images[0][0].shape[0] >= 64 else 0.5  # px; 0.5 at 32 px is 1.0 at 64
    degraded = [(degrade(img, rng, sigma=0.05, blur=blur), meta) for img, meta in real_images]
    acc = accuracy(degraded)
    assert min(acc.values()) >= 0.95, acc


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_strong_blur_keeps_the_kind(shape: str) -> None:
    """The moment invariants ignore blur: a heavily blurred large shape keeps its kind."""
    image = render_image(ShapeAttributes("blue", shape, "large", "center"), 64)
    result = analyse_shape(np.asarray(image.filter(ImageFilter.GaussianBlur(2.0))))
    assert (result.shape, result.size, result.position) == (shape, "large", "center")


def test_layouts_agree() -> None:
    """uint8 HWC, [-1, 1] CHW and (1, 3, H, W) tensors, PIL and float64 arrays: same answer."""
    attrs = ShapeAttributes("green", "triangle", "small", "bottom right", "cream")
    pil = render_image(attrs, 64)
    array = np.asarray(pil)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
    results = [
        analyse_shape(x)
        for x in (array, tensor, tensor[None], pil, tensor.numpy().astype(np.float64))
    ]
    expected = {"color": "green", "shape": "triangle", "size": "small", "position": "bottom right"}
    for result in results:
        assert result.attributes() == expected
        assert result.background == "cream"
        for key in ("area_fraction", "c3", "c4", "centroid"):
            assert result.features[key] == pytest.approx(results[0].features[key], rel=1e-5)
    assert results[0].confidence > 0.5
    np.testing.assert_allclose(to_rgb01(tensor), array / 255.0, atol=1e-6)


GARBAGE = {
    "black": np.zeros((64, 64, 3), np.uint8),
    "white": np.full((64, 64, 3), 255, np.uint8),
    "uniform noise": np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8),
    "gaussian noise tensor": torch.randn(3, 64, 64),
    "nan tensor": torch.full((3, 32, 32), float("nan")),
    "empty": np.zeros((0, 0, 3), np.uint8),
    "tiny": np.zeros((3, 3, 3), np.uint8),
    "grey 2-d": np.full((64, 64), 128, np.uint8),
    "halves": np.repeat(np.array([0, 255], np.uint8), 32)[:, None, None].repeat(64, 1).repeat(3, 2),
    "stripes": np.tile(((np.arange(64) % 8 < 4) * 255)[None, :, None], (64, 1, 3)).astype(np.uint8),
    "gradient": np.tile(np.linspace(0, 255, 64)[None, :, None], (64, 1, 3)).astype(np.uint8),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_gives_no_shape(name: str) -> None:
    result = analyse_shape(GARBAGE[name])
    assert isinstance(result, ShapeAnalysis)
    assert not result.found and result.reason
    assert result.attributes() == dict.fromkeys(SCORED_ATTRIBUTES)
    assert result.confidence == 0.0


def test_random_inputs_never_crash() -> None:
    rng = np.random.default_rng(1)
    for i in range(120):
        size = int(rng.choice([16, 32, 64]))
        if i % 3 == 0:  # random rectangles on a random background
            image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
            for _ in range(int(rng.integers(0, 5))):
                x0, x1 = sorted(int(v) for v in rng.integers(-size // 2, 2 * size, 2))
                y0, y1 = sorted(int(v) for v in rng.integers(-size // 2, 2 * size, 2))
                color = tuple(int(v) for v in rng.integers(0, 256, 3))
                ImageDraw.Draw(image).rectangle((x0, y0, x1, y1), fill=color)
            x = np.asarray(image)
        elif i % 3 == 1:  # skewed uniform noise
            x = (rng.random((size, size, 3)) ** rng.uniform(0.1, 10) * 255).astype(np.uint8)
        else:  # Gaussian noise around a plain background, in [-1, 1] CHW layout
            x = (rng.normal(0, rng.uniform(0, 2), (3, size, size)) + 0.9).astype(np.float32)
        result = analyse_shape(x)
        assert 0.0 <= result.confidence <= 1.0
        values = list(result.attributes().values())
        assert all(v is not None for v in values) if result.found else values == [None] * 4


def test_not_an_image_raises() -> None:
    with pytest.raises(ValueError, match="expected an image"):
        analyse_shape(np.zeros((2, 3, 4, 5)))


def test_two_shapes_takes_the_larger_and_reports_the_stray() -> None:
    small = np.asarray(render_image(ShapeAttributes("red", "circle", "small", "top left"), 64))
    large = np.asarray(render_image(ShapeAttributes("blue", "square", "large", "bottom right"), 64))
    result = analyse_shape(np.minimum(small, large))
    assert result.attributes() == {
        "color": "blue", "shape": "square", "size": "large", "position": "bottom right"
    }  # fmt: skip
    assert 0.1 < result.features["stray_fraction"] < 0.5


def test_geometry_is_measured_from_the_renderer() -> None:
    geometry = shape_geometry()
    assert geometry.centers["center"] == pytest.approx((0.5, 0.5), abs=1e-6)
    left, top = geometry.centers["top left"]
    assert left == pytest.approx(top) and 0.2 < left < 0.35
    assert geometry.centers["bottom right"] == pytest.approx((1 - left, 1 - top), abs=1e-6)
    for shape in ("circle", "square", "triangle"):
        ratio = geometry.areas[(shape, "large")] / geometry.areas[(shape, "small")]
        assert ratio == pytest.approx((0.19 / 0.1) ** 2, rel=0.05)  # the dataset's radii
    # Each kind has the moment its symmetry allows: triangle c3, square c4, circle neither.
    c3 = {k: v[0] for k, v in geometry.prototypes.items()}
    c4 = {k: v[1] for k, v in geometry.prototypes.items()}
    assert c3["triangle"] > 20 * max(c3["circle"], c3["square"], 1e-9)
    assert c4["square"] > 20 * max(c4["circle"], c4["triangle"], 1e-9)
    assert c4["square"] == pytest.approx(1 / 60, rel=0.01)  # |∫(x+iy)^4| / area^3 of a square


def test_geometry_follows_the_radii() -> None:
    geometry = shape_geometry({"small": 0.13, "large": 0.19})
    for shape in ("circle", "square", "triangle"):
        ratio = geometry.areas[(shape, "large")] / geometry.areas[(shape, "small")]
        assert ratio == pytest.approx((0.19 / 0.13) ** 2, rel=0.05)
    assert shape_geometry({"small": 0.1, "large": 0.19}) is shape_geometry()  # cached
    with pytest.raises(ValueError, match="0 < small < large"):
        shape_geometry({"small": 0.19, "large": 0.1})


def test_lab_matches_skimage() -> None:
    color = pytest.importorskip("skimage.color")
    rgb = np.random.default_rng(0).random((50, 3))
    np.testing.assert_allclose(srgb_to_lab(rgb), color.rgb2lab(rgb[None])[0], atol=1e-2)
    np.testing.assert_allclose(srgb_to_lab(np.ones(3)), [100, 0, 0], atol=1e-2)


@pytest.mark.parametrize("connectivity", [8, 4])
def test_largest_component_matches_skimage(connectivity: int) -> None:
    measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.random()
        ours = largest_component(mask, connectivity)
        labels = measure.label(mask, connectivity=connectivity // 4)
        if labels.max() == 0:
            assert not ours.any()
            continue
        assert ours.sum() == np.bincount(labels.ravel())[1:].max()
        assert len(np.unique(labels[ours])) == 1
