"""The synthetic shapes dataset: determinism, held-out splits, captions, rendering."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest

from ldm.data.counters import SkipCounter
from ldm.data.reader import ShardDataset
from ldm.data.shapes import ShapesConfig, generate, load_config, main, make_sample, render_image
from ldm.data.shapes_vocab import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeAttributes,
    attributes_of,
    is_held_out,
    parse_attributes,
    parse_held_out,
    render_caption,
)
from ldm.data.tarstream import iter_tar_samples

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "data" / "shapes.yaml"
HELD_OUT = ["red triangle", "blue square at top right", "small yellow"]


def small_config(**overrides) -> ShapesConfig:
    values = dict(
        image_size=32,
        num_train=60,
        num_val=10,
        num_heldout=12,
        samples_per_shard=25,
        held_out=HELD_OUT,
        workers=1,
    )
    values.update(overrides)
    return ShapesConfig(**values)


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.tar"))
    }


def samples(root: Path, split: str) -> list[dict]:
    counter = SkipCounter(num_slots=1)
    return [
        s for p in sorted((root / split).glob("*.tar")) for s in iter_tar_samples(str(p), counter)
    ]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    generate(small_config(), str(root))
    return root


def test_deterministic_for_a_seed_whatever_the_workers(generated: Path, tmp_path: Path) -> None:
    generate(small_config(workers=2, samples_per_shard=25), str(tmp_path / "again"))
    assert digest(tmp_path / "again") == digest(generated)
    generate(small_config(seed=1), str(tmp_path / "other"))
    assert digest(tmp_path / "other") != digest(generated)
    assert len(digest(generated)) == 3 + 1 + 1  # 60 train samples in shards of 25


def test_held_out_combinations_never_in_train(generated: Path) -> None:
    specs = parse_held_out(HELD_OUT)
    for split in ("train", "val"):
        metas = [json.loads(s["json"]) for s in samples(generated, split)]
        assert metas and not any(is_held_out(attributes_of(m), specs) for m in metas)
    held = [attributes_of(json.loads(s["json"])) for s in samples(generated, "heldout")]
    assert len(held) == 12 and all(is_held_out(a, specs) for a in held)
    metadata = json.loads((generated / "metadata.json").read_text())
    assert metadata["held_out"][1] == {
        "entry": "blue square at top right",
        "attributes": {"color": "blue", "shape": "square", "position": "top right"},
    }
    assert metadata["splits"]["train"]["samples"] == 60


def test_samples_are_consistent_and_readable(generated: Path) -> None:
    for sample in samples(generated, "train")[:20]:
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode()
        assert caption == meta["caption"]
        attrs = attributes_of(sample)
        mentioned = parse_attributes(caption)
        assert all(getattr(attrs, k) == v for k, v in mentioned.items())
        assert {"color", "shape", "size", "position"} <= set(mentioned)
    ds = ShardDataset(
        str(generated / "train" / "shapes-train-000000.tar"),
        batch_size=8,
        image_size=32,
    )
    batch = next(iter(ds))
    assert batch["image"].shape == (8, 3, 32, 32)


def test_every_phrasing_parses_back() -> None:
    combos = itertools.product(COLORS, SHAPES, SIZES, POSITIONS, BACKGROUNDS)
    for color, shape, size, position, background in combos:
        attrs = ShapeAttributes(color, shape, size, position, background)
        for template in range(len(CAPTION_TEMPLATES)):
            parsed = parse_attributes(render_caption(attrs, template))
            assert all(getattr(attrs, k) == v for k, v in parsed.items())
            assert {"color", "shape", "size", "position"} <= set(parsed)
    captions = {
        render_caption(ShapeAttributes("red", "circle", "small", "top left"), t)
        for t in range(len(CAPTION_TEMPLATES))
    }
    assert "a small red circle at the top left" in captions
    assert "top left: a red circle, small" in captions
    assert "a red small circle in the top-left corner on white" in captions
    assert parse_attributes("an upper-right GREEN triangle in the middle") == {
        "color": "green",
        "shape": "triangle",
        "position": "top right",
    }
    with pytest.raises(ValueError):
        parse_held_out(["nothing known here"])
    with pytest.raises(ValueError):
        ShapeAttributes("teal", "circle", "small", "center")  # pink is an opt-in extra colour


def test_rendered_colours_are_recoverable() -> None:
    for color, position, size in itertools.product(COLORS, POSITIONS, SIZES):
        attrs = ShapeAttributes(color, "triangle", size, position, "light gray")
        image = render_image(attrs, image_size=64)
        fx, fy = {
            "top left": (0.27, 0.27),
            "top right": (0.73, 0.27),
            "bottom left": (0.27, 0.73),
            "bottom right": (0.73, 0.73),
            "center": (0.5, 0.5),
        }[position]
        assert image.getpixel((int(fx * 64), int(fy * 64))) == COLORS[color]
        assert image.getpixel((0, 0)) == BACKGROUNDS["light gray"]


def test_cli_with_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(str(CONFIG))
    assert cfg.num_train == 50_000 and "red triangle" in cfg.held_out
    main(
        [
            "--config",
            str(CONFIG),
            "--out",
            str(tmp_path),
            "num_train=8",
            "num_val=0",
            "num_heldout=4",
            "image_size=16",
            "workers=1",
        ]
    )
    out = capsys.readouterr().out
    assert "wrote 12 samples" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout", "metadata.json", "train"]
    with pytest.raises(Exception, match="num_trian"):
        load_config(str(CONFIG), ["num_trian=3"])


def test_partial_captions_leave_one_attribute_out_and_keep_the_image() -> None:
    full, partial = ShapesConfig(image_size=16), ShapesConfig(image_size=16, partial_captions=1.0)
    omitted = set()
    for index in range(40):
        a, b = make_sample(full, "train", index), make_sample(partial, "train", index)
        assert a["png"] == b["png"] and "omitted" not in a["json"]
        meta = b["json"]
        omitted.add(meta["omitted"])
        named = parse_attributes(b["txt"])
        assert meta["omitted"] not in named
        assert all(
            named[k] == meta[k] for k in {"color", "shape", "size", "position"} - {meta["omitted"]}
        )
        held = make_sample(partial, "heldout", index)  # held-out prompts stay complete
        assert "omitted" not in held["json"]
    assert omitted == {"color", "shape", "size", "position"}
    with pytest.raises(ValueError, match=r"partial_captions is a fraction in \[0, 1\], got 1.5"):
        generate(ShapesConfig(partial_captions=1.5), "unused")


def test_radii_set_the_sizes_and_are_recorded(tmp_path: Path) -> None:
    cfg = load_config(str(CONFIG), ["radii.small=0.13", "image_size=32"])
    assert cfg.radii == {"small": 0.13, "large": 0.19}  # a partial override keeps the other size
    attrs = ShapeAttributes("blue", "circle", "small", "center", "white")

    def area(image) -> int:  # pixels that are not background
        return sum(p != BACKGROUNDS["white"] for p in image.getdata())

    default, larger = render_image(attrs, 64), render_image(attrs, 64, radii=cfg.radii)
    assert area(larger) / area(default) == pytest.approx(1.3**2, rel=0.05)
    metadata = generate(small_config(radii=cfg.radii), str(tmp_path))
    assert json.loads((tmp_path / "metadata.json").read_text())["config"]["radii"] == cfg.radii
    assert metadata["config"]["radii"] == cfg.radii
    for index in range(6):  # the same draw; small shapes get bigger, large ones stay
        a = make_sample(small_config(), "train", index)
        b = make_sample(small_config(radii=cfg.radii), "train", index)
        assert a["txt"] == b["txt"]
        assert (a["png"] == b["png"]) == (a["json"]["size"] == "large")


@pytest.mark.parametrize(
    ("radii", "message"),
    [
        ({"small": 0.13}, "must name exactly the sizes"),
        ({"small": 0.2, "large": 0.19}, "0 < small < large <= 0.2"),
        ({"small": 0.1, "large": 0.25}, "0 < small < large <= 0.2"),
    ],
)
def test_bad_radii_are_one_line_errors(radii: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        generate(small_config(radii=radii), str(tmp_path))
