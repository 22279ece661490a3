"""Vocabulary, captions and held-out combinations of the synthetic "shapes" dataset.

Shared by the generator (:mod:`ldm.data.shapes`) and by evaluation (``ldm.eval``), which prompts
for held-out combinations and checks what was drawn.

Held-out grammar: a held-out entry is free text naming any subset of attribute values, parsed
with the same parser as captions (:func:`parse_attributes`), e.g. ``"red triangle"`` (every red
triangle, any size/position/background), ``"blue square at top right"``, ``"small yellow"``,
``"purple circle in the center"``. A sample is held out when it matches *all* attributes an entry
names. Positions accept ``top left`` / ``top-left`` / ``upper left``, ``center`` / ``middle``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Shape colours, well separated in RGB (and in hue).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 20),
}
#: Opt-in colours (``ShapesConfig.extra_colors``), never drawn by default: a concept a model
#: trained on the default data has never seen (``ldm.demo_finetune`` teaches it). Each is far
#: in CIELAB from COLORS and BACKGROUNDS (nearest: pink 47 ΔE*ab from purple; brown 54 from
#: orange, 55 from red).
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {"pink": (240, 100, 170), "brown": (130, 70, 30)}
#: Every colour a sample may show: COLORS, then EXTRA_COLORS.
PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, **EXTRA_COLORS}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
#: Light backgrounds, far from every shape colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (222, 222, 222),
    "cream": (250, 240, 210),
}
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position", "background")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class ShapeAttributes:
    """What one shapes sample shows."""

    color: str
    shape: str
    size: str
    position: str
    background: str = "white"

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            allowed = tuple(PALETTE) if name == "color" else VOCABULARY[name]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, str]:
        """Plain dict of the five attributes."""
        return {name: getattr(self, name) for name in ATTRIBUTES}


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def _corner(position: str) -> str:
    return (
        "in the middle" if position == "center" else f"in the {position.replace(' ', '-')} corner"
    )


#: Caption phrasings; each takes the attributes and returns text.
CAPTION_TEMPLATES = (
    lambda a: f"a {a.size} {a.color} {a.shape} {_where(a.position)}",
    lambda a: f"{a.position}: a {a.color} {a.shape}, {a.size}",
    lambda a: f"a {a.color} {a.size} {a.shape} {_corner(a.position)} on {a.background}",
    lambda a: f"a {a.size} {a.color} {a.shape} {_where(a.position)} on a {a.background} background",
    lambda a: f"{a.size} {a.color} {a.shape}, {a.position}",
)


#: Caption phrasings that leave one attribute out (keyed by the attribute they omit).
PARTIAL_TEMPLATES = {
    "color": lambda a: f"a {a.size} {a.shape} {_where(a.position)}",
    "shape": lambda a: f"a {a.size} {a.color} shape {_where(a.position)}",
    "size": lambda a: f"a {a.color} {a.shape} {_where(a.position)}",
    "position": lambda a: f"a {a.size} {a.color} {a.shape}",
}


def render_partial_caption(attrs: ShapeAttributes, omit: str) -> str:
    """A caption that names every attribute of ``attrs`` but ``omit`` (and the background)."""
    return PARTIAL_TEMPLATES[omit](attrs)


def render_caption(attrs: ShapeAttributes, template: int = 0) -> str:
    """Caption text for ``attrs`` in phrasing ``template`` (index into CAPTION_TEMPLATES)."""
    return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)](attrs)


_POSITION_WORDS = [
    ("upper", "top"),
    ("lower", "bottom"),
    ("middle", "center"),
    ("centre", "center"),
]


def parse_attributes(text: str) -> dict[str, str]:
    """The attribute values named in a caption, prompt, or held-out entry.

    Args:
        text: E.g. ``"top left: a red circle, small"`` or ``"blue square at top right"``.

    Returns:
        ``{attribute: value}`` for every attribute mentioned (a subset of ATTRIBUTES).
    """
    norm = " " + re.sub(r"[^a-z]+", " ", text.lower().replace("-", " ")) + " "
    for old, new in _POSITION_WORDS:
        norm = norm.replace(f" {old} ", f" {new} ")
    found: dict[str, str] = {}
    for name in ("background", "color", "shape", "size", "position"):
        values = PALETTE if name == "color" else VOCABULARY[name]
        for value in sorted(values, key=len, reverse=True):
            if f" {value} " in norm:
                found[name] = value
                norm = norm.replace(f" {value} ", " ")
                break
    return found


def parse_held_out(entries: Sequence[str]) -> list[dict[str, str]]:
    """Parse held-out entries; each must name at least one attribute."""
    specs = []
    for entry in entries:
        spec = parse_attributes(entry)
        if not spec:
            raise ValueError(f"held-out entry {entry!r} names no known attribute")
        specs.append(spec)
    return specs


def matches(attrs: ShapeAttributes, spec: Mapping[str, str]) -> bool:
    """Whether ``attrs`` has every attribute value ``spec`` names."""
    return all(getattr(attrs, name) == value for name, value in spec.items())


def is_held_out(attrs: ShapeAttributes, specs: Sequence[Mapping[str, str]]) -> bool:
    """Whether ``attrs`` matches any held-out spec."""
    return any(matches(attrs, spec) for spec in specs)


def random_attributes(
    rng: random.Random,
    backgrounds: Sequence[str] = ("white",),
    fixed: Mapping[str, str] | None = None,
) -> ShapeAttributes:
    """Uniform attributes, with ``fixed`` values forced (e.g. a held-out spec)."""
    fixed = fixed or {}
    values = {
        "color": rng.choice(tuple(COLORS)),
        "shape": rng.choice(SHAPES),
        "size": rng.choice(SIZES),
        "position": rng.choice(POSITIONS),
        "background": rng.choice(tuple(backgrounds)),
    }
    values.update(fixed)
    return ShapeAttributes(**values)


def sample_split_attributes(
    rng: random.Random,
    split: str,
    held_out: Sequence[Mapping[str, str]],
    backgrounds: Sequence[str] = ("white",),
) -> ShapeAttributes:
    """Attributes for one sample of ``split``.

    ``"train"`` / ``"val"``: uniform over combinations that match no held-out spec (rejection
    sampling). ``"heldout"``: a uniformly chosen spec with the other attributes uniform.
    """
    if split == "heldout":
        if not held_out:
            raise ValueError("no held-out combinations configured")
        return random_attributes(rng, backgrounds, fixed=rng.choice(list(held_out)))
    for _ in range(10_000):
        attrs = random_attributes(rng, backgrounds)
        if not is_held_out(attrs, held_out):
            return attrs
    raise ValueError("held-out specs cover (almost) every combination")


def attributes_of(sample: Mapping[str, Any] | bytes | bytearray | str) -> ShapeAttributes:
    """Attributes of a shapes sample: its ``json`` member (bytes/str/dict) or a raw sample dict."""
    if isinstance(sample, bytes | bytearray | str):
        sample = json.loads(sample)
    elif "json" in sample and not set(ATTRIBUTES) <= set(sample):
        return attributes_of(sample["json"])
    return ShapeAttributes(**{name: sample[name] for name in ATTRIBUTES})
