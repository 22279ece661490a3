"""The synthetic captioned "shapes" dataset: one coloured shape on a light background.

Deterministic: sample ``i`` of split ``s`` depends only on ``(seed, s, i)``, so the output is
byte-identical for a seed whatever the shard size or number of processes. Splits:

- ``train`` / ``val``: combinations matching no held-out entry (different seed streams);
- ``heldout``: only combinations matching a held-out entry, for evaluating compositional
  generalisation (grammar: :mod:`ldm.data.shapes_vocab`).

Layout written by :func:`generate`::

    out/train/shapes-train-000000.tar ...   members: <key>.png, <key>.txt, <key>.json
    out/val/..., out/heldout/...            json: the five attributes, caption, template
    out/metadata.json                       vocabulary, parsed held-out specs, shard patterns

CLI: ``python -m ldm.data.shapes --config configs/data/shapes.yaml --out data/shapes
[key=value ...]`` (OmegaConf dotlist overrides of :class:`ShapesConfig`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image, ImageDraw

from ldm.data.shapes_vocab import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    EXTRA_COLORS,
    PALETTE,
    PARTIAL_TEMPLATES,
    SIZES,
    VOCABULARY,
    ShapeAttributes,
    parse_held_out,
    render_caption,
    render_partial_caption,
    sample_split_attributes,
)
from ldm.data.shard_writer import write_shard
from ldm.data.shards import make_rng

SPLITS: tuple[str, ...] = ("train", "val", "heldout")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
#: Shape centres as fractions of the image side.
_CENTERS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
#: Default half-extent of a shape per size, as a fraction of the image side.
DEFAULT_RADII: dict[str, float] = {"small": 0.1, "large": 0.19}
#: Largest radius that keeps a jittered triangle (circumradius 1.15 r) at a corner inside.
MAX_RADIUS = 0.2


@dataclass
class ShapesConfig:
    """Settings of the shapes generator (``configs/data/shapes.yaml`` mirrors these fields).

    Attributes:
        image_size: Side length in pixels.
        num_train: Train samples.
        num_val: Validation samples (same distribution as train).
        num_heldout: Held-out-combination samples.
        samples_per_shard: Samples per tar shard.
        seed: Base seed.
        held_out: Held-out entries (grammar in :mod:`ldm.data.shapes_vocab`).
        backgrounds: Background names to draw from (subset of BACKGROUNDS).
        jitter: Max random offset of the shape centre, as a fraction of the side.
        supersample: Draw at this factor and downsample (anti-aliasing).
        workers: Processes generating shards in parallel.
        partial_captions: Fraction of train/val captions that leave one attribute (colour,
            shape, size or position, chosen uniformly) unnamed, as real captions often do. The
            image does not change; ``json`` records ``omitted``.
        radii: Half-extent of a ``small`` and a ``large`` shape as a fraction of the side
            (``0 < small < large <= MAX_RADIUS``). At low resolution, raise ``small`` so a small
            circle stays distinguishable from a small square after an autoencoder.
        extra_colors: Opt-in colours from ``EXTRA_COLORS`` (e.g. ``[pink]``) that a model
            trained on the default data has never seen; empty (the default) leaves every sample
            as it was, byte for byte.
        extra_color_fraction: With ``extra_colors``: the fraction of train/val samples recoloured
            with one of them (chosen uniformly); the rest keep the six default colours.
    """

    image_size: int = 64
    num_train: int = 50_000
    num_val: int = 1_000
    num_heldout: int = 1_000
    samples_per_shard: int = 5_000
    seed: int = 0
    held_out: list[str] = field(
        default_factory=lambda: ["red triangle", "blue square at top right"]
    )
    backgrounds: list[str] = field(default_factory=lambda: ["white", "light gray", "cream"])
    jitter: float = 0.03
    supersample: int = 4
    workers: int = 2
    partial_captions: float = 0.0
    radii: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RADII))
    extra_colors: list[str] = field(default_factory=list)
    extra_color_fraction: float = 0.5


def check_radii(radii: Mapping[str, float]) -> None:
    """Raise a one-line ``ValueError`` unless ``radii`` names every size with increasing,
    in-range fractions of the side."""
    if set(radii) != set(SIZES):
        raise ValueError(f"radii must name exactly the sizes {list(SIZES)}, got {sorted(radii)}")
    values = [radii[size] for size in SIZES]
    if not 0 < values[0] < values[1] <= MAX_RADIUS:
        raise ValueError(
            f"radii must satisfy 0 < small < large <= {MAX_RADIUS} (fractions of the side), got "
            f"{dict(zip(SIZES, values, strict=True))}"
        )


def render_image(
    attrs: ShapeAttributes,
    image_size: int = 64,
    offset: tuple[float, float] = (0.0, 0.0),
    supersample: int = 4,
    radii: Mapping[str, float] | None = None,
) -> Image.Image:
    """Draw ``attrs`` as an RGB image.

    Args:
        attrs: What to draw.
        image_size: Output side length.
        offset: Centre offset ``(dx, dy)`` as fractions of the side (jitter).
        supersample: Draw at ``image_size * supersample`` and box-downsample (anti-aliasing).
        radii: Size name -> half-extent as a fraction of the side (default: ``DEFAULT_RADII``).
    """
    side = image_size * supersample
    img = Image.new("RGB", (side, side), BACKGROUNDS[attrs.background])
    draw = ImageDraw.Draw(img)
    fx, fy = _CENTERS[attrs.position]
    cx, cy = (fx + offset[0]) * side, (fy + offset[1]) * side
    r = (DEFAULT_RADII if radii is None else radii)[attrs.size] * side
    color = PALETTE[attrs.color]
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif attrs.shape == "square":
        s = r * 0.9  # equal area-ish with the circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=color)
    else:  # upward equilateral triangle inscribed in the circle of radius r*1.15
        rr = r * 1.15
        points = [
            (cx + rr * math.cos(a), cy - rr * math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
        ]
        draw.polygon(points, fill=color)
    return img.reduce(supersample) if supersample > 1 else img


def make_sample(
    cfg: ShapesConfig,
    split: str,
    index: int,
    specs: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Sample ``index`` of ``split`` as a shard sample (png bytes, caption, attribute json).

    Args:
        cfg: Generator settings.
        split: ``"train"``, ``"val"`` or ``"heldout"``.
        index: Sample index within the split.
        specs: ``parse_held_out(cfg.held_out)``, precomputed by callers in a loop.
    """
    rng = make_rng(cfg.seed, _SPLIT_IDS[split], index)
    specs = parse_held_out(cfg.held_out) if specs is None else specs
    attrs = sample_split_attributes(rng, split, specs, cfg.backgrounds)
    if split != "heldout" and cfg.extra_colors and rng.random() < cfg.extra_color_fraction:
        attrs = replace(attrs, color=rng.choice(cfg.extra_colors))
    offset = (rng.uniform(-cfg.jitter, cfg.jitter), rng.uniform(-cfg.jitter, cfg.jitter))
    template = rng.randrange(len(CAPTION_TEMPLATES))
    caption = render_caption(attrs, template)
    meta: dict[str, Any] = {}
    if split != "heldout" and cfg.partial_captions > 0 and rng.random() < cfg.partial_captions:
        meta["omitted"] = rng.choice(tuple(PARTIAL_TEMPLATES))
        caption = render_partial_caption(attrs, meta["omitted"])
    image = render_image(attrs, cfg.image_size, offset, cfg.supersample, cfg.radii)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    meta = {**attrs.to_dict(), "caption": caption, "template": template, "split": split, **meta}
    return {
        "__key__": f"{split}{index:08d}",
        "png": buffer.getvalue(),
        "txt": caption,
        "json": meta,
    }


def _split_sizes(cfg: ShapesConfig) -> dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val, "heldout": cfg.num_heldout}


def _shard_jobs(cfg: ShapesConfig, out_dir: str) -> Iterator[tuple[str, int, int, str]]:
    for split, total in _split_sizes(cfg).items():
        for shard, start in enumerate(range(0, total, cfg.samples_per_shard)):
            count = min(cfg.samples_per_shard, total - start)
            path = os.path.join(out_dir, split, f"shapes-{split}-{shard:06d}.tar")
            yield split, start, count, path


def _write_job(args: tuple[ShapesConfig, str, int, int, str]) -> int:
    cfg, split, start, count, path = args
    specs = parse_held_out(cfg.held_out)
    samples = (make_sample(cfg, split, i, specs) for i in range(start, start + count))
    return write_shard(path, samples, mtime=0)


def shard_pattern(out_dir: str, split: str, num_shards: int) -> str:
    """Brace pattern of a split's shards (what the DataModule's ``train_shards`` takes)."""
    last = max(num_shards - 1, 0)
    return os.path.join(out_dir, split, f"shapes-{split}-{{000000..{last:06d}}}.tar")


def generate(cfg: ShapesConfig, out_dir: str) -> dict[str, Any]:
    """Write all splits as shards plus ``metadata.json``; returns the metadata.

    Shards are generated in parallel over ``cfg.workers`` processes (one shard per job).
    """
    specs = parse_held_out(cfg.held_out)
    unknown = set(cfg.backgrounds) - set(BACKGROUNDS)
    if unknown:
        raise ValueError(f"unknown backgrounds {sorted(unknown)}; choose from {list(BACKGROUNDS)}")
    if not 0.0 <= cfg.partial_captions <= 1.0:
        raise ValueError(f"partial_captions is a fraction in [0, 1], got {cfg.partial_captions}")
    check_radii(cfg.radii)
    unknown = set(cfg.extra_colors) - set(EXTRA_COLORS)
    if unknown:
        raise ValueError(
            f"unknown extra_colors {sorted(unknown)}; choose from {list(EXTRA_COLORS)}"
        )
    if not 0.0 <= cfg.extra_color_fraction <= 1.0:
        raise ValueError(
            f"extra_color_fraction is a fraction in [0, 1], got {cfg.extra_color_fraction}"
        )
    jobs = [(cfg, *job) for job in _shard_jobs(cfg, out_dir)]
    start = time.perf_counter()
    if cfg.workers > 1 and len(jobs) > 1:
        with mp.get_context("fork").Pool(min(cfg.workers, len(jobs))) as pool:
            counts = pool.map(_write_job, jobs, chunksize=1)
    else:
        counts = [_write_job(job) for job in jobs]
    seconds = time.perf_counter() - start
    shards = {s: sum(1 for job in jobs if job[1] == s) for s in SPLITS}
    metadata = {
        "config": asdict(cfg),
        "vocabulary": {k: list(v) for k, v in VOCABULARY.items()}
        | {"color": [*COLORS, *cfg.extra_colors]},
        "held_out": [
            {"entry": e, "attributes": s} for e, s in zip(cfg.held_out, specs, strict=True)
        ],
        "splits": {
            s: {"samples": n, "shards": shard_pattern(out_dir, s, shards[s])}
            for s, n in _split_sizes(cfg).items()
            if n
        },
        "samples_written": sum(counts),
        "seconds": round(seconds, 2),
    }
    with open(os.path.join(out_dir, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return metadata


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ShapesConfig:
    """Load a :class:`ShapesConfig` from YAML plus dotlist overrides (unknown keys fail)."""
    merged = OmegaConf.structured(ShapesConfig)
    if path:
        merged = OmegaConf.merge(merged, OmegaConf.load(path))
    if overrides:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Generate the captioned shapes dataset.")
    parser.add_argument("--config", default=None, help="YAML (e.g. configs/data/shapes.yaml)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_train=1000")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    metadata = generate(cfg, args.out)
    total = metadata["samples_written"]
    print(
        f"wrote {total} samples in {metadata['seconds']} s "
        f"({total / max(metadata['seconds'], 1e-9):.0f} samples/s, {cfg.workers} workers)"
    )
    for split, info in metadata["splits"].items():
        print(f"  {split}: {info['samples']} samples -> {info['shards']}")
    return metadata


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OmegaConfBaseException) as error:  # bad settings: one line, exit 2
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
