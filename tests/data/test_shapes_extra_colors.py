"""Opt-in extra colours of the shapes generator (the concept `ldm.demo_finetune` teaches): the
default data stays byte-identical, the new colour renders and the analyser names it when the
dataset's metadata lists it."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data import shapes
from ldm.data.shapes import ShapesConfig, load_config, make_sample
from ldm.data.shapes_vocab import EXTRA_COLORS, ShapeAttributes, parse_attributes
from ldm.eval.adherence import geometry_from_metadata
from ldm.eval.shapes import analyse_shape

ROOT = Path(__file__).resolve().parents[2]
#: sha256 over the first 16 samples of each split (png, caption, json), computed with the
#: generator before extra colours existed: the default and the demo's data must not change.
UNCHANGED = {
    "default": "c9b5f87f3c5dcff53e6daa732da3a60c3c68a2282767242c6553c8bb12b21d2f",
    "demo": "8d056604ef208ba7b829a8043f6435c0b213ef5c930e483d570f76d65e07c4ef",
}


def _digest(cfg: ShapesConfig) -> str:
    h = hashlib.sha256()
    for split in ("train", "val", "heldout"):
        for i in range(16):
            s = make_sample(cfg, split, i)
            h.update(s["png"])
            h.update(s["txt"].encode())
            h.update(json.dumps(s["json"], sort_keys=True).encode())
    return h.hexdigest()


def test_default_and_demo_samples_are_byte_identical() -> None:
    assert _digest(ShapesConfig()) == UNCHANGED["default"]
    assert _digest(load_config(str(ROOT / "configs" / "demo" / "shapes.yaml"))) == UNCHANGED["demo"]


@pytest.mark.parametrize("color", sorted(EXTRA_COLORS))
def test_extra_color_mixes_in_and_is_recognised(tmp_path: Path, color: str) -> None:
    meta = shapes.main(
        [
            "--config",
            str(ROOT / "configs" / "demo" / "shapes.yaml"),
            "--out",
            str(tmp_path),
            "num_train=120",
            "num_val=0",
            "num_heldout=0",
            f"extra_colors=[{color}]",
            "extra_color_fraction=0.5",
            "workers=1",
        ]
    )
    assert meta["vocabulary"]["color"][-1] == color
    geometry = geometry_from_metadata(tmp_path / "metadata.json")
    assert geometry.colors[-1] == color
    cfg = load_config(str(ROOT / "configs" / "demo" / "shapes.yaml"), [f"extra_colors=[{color}]"])
    samples = [make_sample(cfg, "train", i) for i in range(120)]
    new = [s for s in samples if s["json"]["color"] == color]
    assert 40 <= len(new) <= 80  # about half
    assert all(color in s["txt"] for s in new)
    assert parse_attributes(new[0]["txt"])["color"] == color
    for s in new[:20]:
        image = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
        found = analyse_shape(image, geometry)
        assert found.color == color and found.found, (s["txt"], found)
    # Without the metadata's extra colour the analyser has no word for it.
    assert analyse_shape(image, geometry_from_metadata({"config": {}})).color != color


@pytest.mark.parametrize("color", sorted(EXTRA_COLORS))
def test_extra_color_renders_its_rgb(color: str) -> None:
    image = shapes.render_image(ShapeAttributes(color, "square", "large", "center"), 32)
    assert np.asarray(image)[16, 16].tolist() == list(EXTRA_COLORS[color])


def test_unknown_extra_color_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown extra_colors"):
        shapes.generate(ShapesConfig(extra_colors=["teal"], num_train=1), str(tmp_path))
