"""Prompt adherence on the shapes dataset: the demo's prompt list, scoring, and a text report.

The demo prompts come in three groups (:data:`GROUPS`):

- ``"seen"``: combinations the model was trained on, worded like a training caption;
- ``"held-out"``: combinations named by the generator config's ``held_out`` entries (never in
  training), worded like a training caption;
- ``"paraphrase"``: the seen combinations again, worded with synonyms and sentence shapes that no
  training caption uses (``"a tiny crimson disc in the upper left"``).

Every prompt fully specifies colour, shape, size and position (free attributes of a held-out
entry are filled in deterministically), so :func:`ldm.eval.shapes.analyse_shape` can score all
four. Typical use::

    prompts = demo_prompts_from_metadata("data/shapes/metadata.json")
    geometry = geometry_from_metadata("data/shapes/metadata.json")   # the dataset's shape sizes
    scored = score_pairs(zip(prompts, images), guidance=3.0, geometry=geometry)  # one per prompt
    print(format_report(summarise(scored)))
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ldm.data.shapes_vocab import (
    BACKGROUNDS,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeAttributes,
    is_held_out,
    matches,
    parse_attributes,
    parse_held_out,
    render_caption,
)
from ldm.eval.shapes import SCORED_ATTRIBUTES, ShapeGeometry, analyse_shape, shape_geometry

#: Prompt groups, in report order.
GROUPS: tuple[str, ...] = ("seen", "held-out", "paraphrase")
#: Words no training caption uses, for each vocabulary value they stand for.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "jade"),
    "blue": ("cobalt", "sapphire"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("tangerine", "amber"),
    "circle": ("disc", "disk"),
    "square": ("box", "block"),
    "triangle": ("pyramid", "wedge"),
    "small": ("tiny", "little"),
    "large": ("big", "huge"),
}
#: Synonym -> vocabulary value (the inverse of :data:`SYNONYMS`).
PARAPHRASES: dict[str, str] = {word: value for value, words in SYNONYMS.items() for word in words}
#: Position phrases no training caption uses (``parse_attributes`` reads upper/lower/centre).
_WHERE = {
    "top left": "in the upper left",
    "top right": "in the upper right",
    "bottom left": "in the lower left",
    "bottom right": "in the lower right",
    "center": "in the centre",
}
#: Paraphrase sentence shapes; each takes a dict of the words to use.
PARAPHRASE_TEMPLATES = (
    lambda w: f"a {w['size']} {w['color']} {w['shape']} {w['where']}",
    lambda w: f"one {w['size']} {w['shape']}, coloured {w['color']}, {w['where']}",
    lambda w: f"draw {_article(w['color'])} {w['shape']} that is {w['size']}, {w['where']}",
    lambda w: f"{w['where']} there is a {w['size']} {w['color']} {w['shape']}",
)
_SYNONYM_RE = re.compile(r"\b(" + "|".join(map(re.escape, PARAPHRASES)) + r")\b")
_COMBINATIONS = tuple(itertools.product(COLORS, SHAPES, SIZES, POSITIONS))


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def parse_prompt(text: str) -> dict[str, str]:
    """Attribute values a prompt names, understanding the :data:`PARAPHRASES` synonyms.

    Args:
        text: E.g. ``"a tiny crimson disc in the upper left"``.

    Returns:
        ``{attribute: value}`` as :func:`ldm.data.shapes_vocab.parse_attributes` gives it.
    """
    return parse_attributes(_SYNONYM_RE.sub(lambda m: PARAPHRASES[m.group(1)], text.lower()))


def render_paraphrase(attrs: Mapping[str, str], variant: int = 0) -> str:
    """A prompt for ``attrs`` (colour, shape, size, position) worded unlike any training caption.

    Args:
        attrs: The four scored attributes.
        variant: Picks the sentence shape and the synonyms (deterministic, cycles).
    """
    words = {
        name: SYNONYMS[attrs[name]][variant % len(SYNONYMS[attrs[name]])]
        for name in ("color", "shape", "size")
    }
    words["where"] = _WHERE[attrs["position"]]
    return PARAPHRASE_TEMPLATES[variant % len(PARAPHRASE_TEMPLATES)](words)


@dataclass(frozen=True)
class DemoPrompt:
    """One prompt of the demo's fixed list.

    Attributes:
        prompt: The text given to the model.
        group: One of :data:`GROUPS`.
        target: What the image should show: the four scored attributes, plus ``background``
            when the held-out entry names one.
    """

    prompt: str
    group: str
    target: dict[str, str]


def _never_trained(
    target: Mapping[str, str], specs: Sequence[Mapping[str, str]], bgs: Sequence[str]
) -> bool:
    """Whether ``target`` is held out whatever background (or the one it names) is drawn."""
    return all(
        is_held_out(ShapeAttributes(**{**target, "background": bg}), specs)
        for bg in ([target["background"]] if "background" in target else bgs)
    )


def _combination(values: Sequence[str]) -> dict[str, str]:
    return dict(zip(SCORED_ATTRIBUTES, values, strict=True))  # same order as _COMBINATIONS


def _pick_balanced(
    pool: Sequence[dict[str, str]], k: int, rng: random.Random
) -> list[dict[str, str]]:
    """``k`` items of ``pool``, each the (shuffled) first that uses the least-used values so far."""
    pool = rng.sample(list(pool), len(pool))
    used: dict[tuple[str, str], int] = {}
    chosen = []
    for _ in range(min(k, len(pool))):
        best = min(pool, key=lambda t: sum(used.get(item, 0) for item in t.items()))
        pool.remove(best)
        chosen.append(best)
        for item in best.items():
            used[item] = used.get(item, 0) + 1
    return chosen


def demo_prompts(
    held_out: Sequence[str],
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    num_seen: int = 8,
    per_held_out: int = 2,
    num_paraphrase: int = 8,
    seed: int = 0,
) -> list[DemoPrompt]:
    """The demo's fixed prompt list: seen, held-out and paraphrased prompts with their targets.

    Args:
        held_out: The generator config's held-out entries (``configs/data/shapes.yaml``).
        backgrounds: Backgrounds the generator draws (a combination counts as seen only if no
            background of it is held out, and as held-out only if every one is).
        num_seen: Seen combinations, chosen among the never-held-out ones to cover the values
            evenly (ties broken at random with ``seed``).
        per_held_out: Prompts per held-out entry; attributes the entry leaves free are filled in
            the same way (distinct, evenly covered).
        num_paraphrase: Paraphrased prompts; their targets cycle through the seen targets.
        seed: Seed of every random choice, so the list is the same on every run.

    Returns:
        Seen prompts, then held-out prompts (entry by entry), then paraphrases.

    Raises:
        ValueError: If a prompt would not parse back to its target, or there is nothing to pick.
    """
    specs = parse_held_out(held_out)
    rng = random.Random(seed)
    seen_pool = [
        _combination(c)
        for c in _COMBINATIONS
        if not any(is_held_out(ShapeAttributes(*c, background=bg), specs) for bg in backgrounds)
    ]
    if len(seen_pool) < num_seen:
        raise ValueError(f"only {len(seen_pool)} never-held-out combinations, asked {num_seen}")
    seen = _pick_balanced(seen_pool, num_seen, rng)
    prompts = [DemoPrompt(render_caption(ShapeAttributes(**t)), "seen", t) for t in seen]
    for entry, spec in zip(held_out, specs, strict=True):
        pool = [_combination(c) for c in _COMBINATIONS]
        pool = [
            {**t, **({"background": spec["background"]} if "background" in spec else {})}
            for t in pool
            if matches(ShapeAttributes(**t, background=spec.get("background", "white")), spec)
        ]
        pool = [t for t in pool if _never_trained(t, specs, backgrounds)]
        if not pool:
            raise ValueError(f"held-out entry {entry!r} matches no combination")
        for target in _pick_balanced(pool, per_held_out, rng):
            template = 3 if "background" in target else 0  # 3 names the background
            text = render_caption(ShapeAttributes(**target), template)
            prompts.append(DemoPrompt(text, "held-out", target))
    if num_paraphrase and not seen:
        raise ValueError("paraphrases reuse the seen targets: num_seen must be > 0")
    for i in range(num_paraphrase):
        target = seen[i % len(seen)]
        prompts.append(DemoPrompt(render_paraphrase(target, i), "paraphrase", target))
    for p in prompts:
        if parse_prompt(p.prompt) != p.target:
            raise ValueError(f"prompt {p.prompt!r} parses to {parse_prompt(p.prompt)}")
    return prompts


def _read_metadata(metadata: Mapping[str, Any] | str | Path) -> Mapping[str, Any]:
    if isinstance(metadata, Mapping):
        return metadata
    return json.loads(Path(metadata).read_text(encoding="utf-8"))


def demo_prompts_from_metadata(
    metadata: Mapping[str, Any] | str | Path, **kwargs: Any
) -> list[DemoPrompt]:
    """:func:`demo_prompts` for a generated dataset (its ``metadata.json``, path or dict).

    Args:
        metadata: What :func:`ldm.data.shapes.generate` wrote.
        **kwargs: Forwarded to :func:`demo_prompts` (``num_seen``, ``seed``, ...).
    """
    metadata = _read_metadata(metadata)
    config = metadata.get("config", {})
    held_out = config.get("held_out") or [e["entry"] for e in metadata.get("held_out", [])]
    kwargs.setdefault("backgrounds", config.get("backgrounds") or tuple(BACKGROUNDS))
    return demo_prompts(held_out, **kwargs)


def geometry_from_metadata(metadata: Mapping[str, Any] | str | Path) -> ShapeGeometry:
    """The analyser's geometry for a generated dataset: its ``config.radii`` (metadata written
    before that setting existed used the default radii), and the six colours plus the
    ``config.extra_colors`` it lists."""
    config = _read_metadata(metadata).get("config", {})
    geometry = shape_geometry(config.get("radii"))
    extra = tuple(c for c in config.get("extra_colors") or () if c not in geometry.colors)
    return replace(geometry, colors=geometry.colors + extra) if extra else geometry


@dataclass(frozen=True)
class ScoredSample:
    """One generated image checked against what its prompt asked for.

    Attributes:
        group: Report group (e.g. ``"seen"``).
        guidance: Classifier-free guidance scale it was sampled with (``None``: not given).
        target: Asked-for attribute values (only the scored attributes it names are scored).
        predicted: What the analyser saw (``None`` values when it found no shape).
        confidence: The analyser's confidence.
    """

    group: str
    guidance: float | None
    target: dict[str, str]
    predicted: dict[str, str | None]
    confidence: float = 1.0

    @property
    def correct(self) -> dict[str, bool]:
        """Per scored attribute the target names: whether the image shows it."""
        return {
            a: self.predicted.get(a) == self.target[a]
            for a in SCORED_ATTRIBUTES
            if a in self.target
        }

    @property
    def found(self) -> bool:
        """Whether the analyser found a shape."""
        return any(v is not None for v in self.predicted.values())


def target_of(target: DemoPrompt | Mapping[str, str] | str) -> dict[str, str]:
    """Asked-for attributes of a :class:`DemoPrompt`, an attribute dict or a prompt text."""
    if isinstance(target, DemoPrompt):
        return dict(target.target)
    if isinstance(target, str):
        return parse_prompt(target)
    return dict(target)


def score_pairs(
    pairs: Iterable[tuple[DemoPrompt | Mapping[str, str] | str, Any]],
    group: str | None = None,
    guidance: float | None = None,
    geometry: ShapeGeometry | None = None,
) -> list[ScoredSample]:
    """Analyse each image and compare it with what its prompt asked for.

    Args:
        pairs: ``(target, image)``: the target as a :class:`DemoPrompt`, attribute dict or prompt
            text; the image in any layout :func:`ldm.eval.shapes.to_rgb01` accepts.
        group: Report group; default: the DemoPrompt's group, else ``"all"``.
        guidance: Guidance scale the images were sampled with.
        geometry: The dataset's shape geometry (:func:`geometry_from_metadata`); default: the
            generator's default radii.
    """
    scored = []
    for target, image in pairs:
        analysis = analyse_shape(image, geometry)
        label = group or (target.group if isinstance(target, DemoPrompt) else "all")
        scored.append(
            ScoredSample(
                label, guidance, target_of(target), analysis.attributes(), analysis.confidence
            )
        )
    return scored


@dataclass(frozen=True)
class AdherenceRow:
    """Accuracies of one (group, guidance) cell.

    Attributes:
        group: Report group, or ``"all"`` for the total over groups.
        guidance: Guidance scale (``None``: not given).
        count: Samples.
        found: Fraction of samples where the analyser found a shape.
        accuracy: Per scored attribute, and ``"all"`` (every attribute the target names right):
            the fraction correct among samples whose target names it (NaN if none does).
    """

    group: str
    guidance: float | None
    count: int
    found: float
    accuracy: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (for JSON or a logger)."""
        return {"group": self.group, "guidance": self.guidance, "count": self.count,
                "found": self.found, **self.accuracy}  # fmt: skip


def _row(group: str, guidance: float | None, samples: Sequence[ScoredSample]) -> AdherenceRow:
    accuracy = {}
    for name in SCORED_ATTRIBUTES:
        hits = [s.correct[name] for s in samples if name in s.correct]
        accuracy[name] = sum(hits) / len(hits) if hits else math.nan
    complete = [all(s.correct.values()) for s in samples if s.correct]
    accuracy["all"] = sum(complete) / len(complete) if complete else math.nan
    found = sum(s.found for s in samples) / len(samples)
    return AdherenceRow(group, guidance, len(samples), found, accuracy)


def summarise(samples: Iterable[ScoredSample], total: bool = True) -> list[AdherenceRow]:
    """Per-attribute and all-attribute accuracy, grouped by guidance scale and group.

    Args:
        samples: Scored samples (from :func:`score_pairs`, possibly several calls).
        total: Add an ``"all"`` row per guidance scale when it has more than one group.

    Returns:
        Rows ordered by guidance (``None`` first), then group (:data:`GROUPS` order, then others
        alphabetically), with the total last.
    """
    samples = list(samples)
    scales = sorted({s.guidance for s in samples}, key=lambda g: (g is not None, g or 0.0))
    rank = {g: i for i, g in enumerate(GROUPS)}
    rows = []
    for scale in scales:
        cell = [s for s in samples if s.guidance == scale]
        groups = sorted({s.group for s in cell}, key=lambda g: (rank.get(g, len(rank)), g))
        rows += [_row(g, scale, [s for s in cell if s.group == g]) for g in groups]
        if total and len(groups) > 1:
            rows.append(_row("all", scale, cell))
    return rows


def format_report(rows: Sequence[AdherenceRow], title: str = "prompt adherence (shapes)") -> str:
    """A plain-text table of :func:`summarise` rows (accuracies as fractions, ``-`` for NaN)."""
    columns = (*SCORED_ATTRIBUTES, "all")
    header = f"{'group':<12}{'cfg':>6}{'n':>6}{'found':>7}" + "".join(f"{c:>9}" for c in columns)
    lines = [title, header, "-" * len(header)]
    for row in rows:
        cfg = "-" if row.guidance is None else f"{row.guidance:g}"
        values = "".join(
            f"{'-' if math.isnan(row.accuracy[c]) else format(row.accuracy[c], '.2f'):>9}"
            for c in columns
        )
        lines.append(f"{row.group:<12}{cfg:>6}{row.count:>6}{row.found:>7.2f}{values}")
    return "\n".join(lines)
