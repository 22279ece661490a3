"""Prompt adherence: the demo prompt list, paraphrase parsing, scoring and report aggregation."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from ldm.data.shapes import ShapesConfig, generate, load_config, render_image
from ldm.data.shapes_vocab import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    VOCABULARY,
    ShapeAttributes,
    is_held_out,
    parse_attributes,
    parse_held_out,
    render_caption,
    sample_split_attributes,
)
from ldm.eval.adherence import (
    GROUPS,
    PARAPHRASES,
    AdherenceRow,
    DemoPrompt,
    ScoredSample,
    demo_prompts,
    demo_prompts_from_metadata,
    format_report,
    geometry_from_metadata,
    parse_prompt,
    render_paraphrase,
    score_pairs,
    summarise,
)
from ldm.eval.shapes import SCORED_ATTRIBUTES, shape_geometry

HELD_OUT = load_config("configs/data/shapes.yaml").held_out
BACKGROUND_NAMES = list(BACKGROUNDS)


def training_captions(target: dict[str, str]) -> set[str]:
    """Every caption the generator could write for ``target``."""
    return {
        render_caption(ShapeAttributes(**{**target, "background": bg}), t)
        for bg in BACKGROUND_NAMES
        for t in range(len(CAPTION_TEMPLATES))
    }


@pytest.fixture(scope="module")
def prompts() -> list[DemoPrompt]:
    return demo_prompts(HELD_OUT)


def test_prompt_list_covers_the_groups_and_is_deterministic(prompts: list[DemoPrompt]) -> None:
    assert {p.group for p in prompts} == set(GROUPS)
    assert demo_prompts(HELD_OUT) == prompts
    assert demo_prompts(HELD_OUT, seed=1) != prompts
    for p in prompts:
        assert set(SCORED_ATTRIBUTES) <= set(p.target)  # every attribute can be scored
        assert parse_prompt(p.prompt) == p.target
    seen = [p for p in prompts if p.group == "seen"]
    assert len(seen) == 8
    assert {p.target["color"] for p in seen} == set(VOCABULARY["color"])  # evenly covered
    assert {p.target["shape"] for p in seen} == set(VOCABULARY["shape"])
    assert {p.target["position"] for p in seen} == set(VOCABULARY["position"])


def test_held_out_prompts_never_match_a_training_combination(prompts: list[DemoPrompt]) -> None:
    specs = parse_held_out(HELD_OUT)
    held = [p for p in prompts if p.group == "held-out"]
    # Every entry is asked for (one combination only for "large green square in the center").
    assert len(held) == 2 * len(HELD_OUT) - 1
    for entry_spec in specs:
        assert any(all(p.target[k] == v for k, v in entry_spec.items()) for p in held)
    for p in held:
        for bg in BACKGROUND_NAMES:
            assert is_held_out(ShapeAttributes(**{**p.target, "background": bg}), specs)
    for p in prompts:
        if p.group != "held-out":
            for bg in BACKGROUND_NAMES:
                assert not is_held_out(ShapeAttributes(**p.target, background=bg), specs)
    # And against the generator's own training stream.
    rng = random.Random(0)
    draws = [sample_split_attributes(rng, "train", specs, BACKGROUND_NAMES) for _ in range(3000)]
    trained = {tuple(getattr(a, name) for name in SCORED_ATTRIBUTES) for a in draws}
    assert len(trained) > 100
    assert not {tuple(p.target[a] for a in SCORED_ATTRIBUTES) for p in held} & trained


def test_held_out_entry_naming_a_background() -> None:
    out = demo_prompts(["purple on cream"], num_seen=3, num_paraphrase=0)
    held = [p for p in out if p.group == "held-out"]
    assert held and all(p.target["background"] == "cream" for p in held)
    assert all("cream" in p.prompt for p in held)
    # Seen targets must be trainable on every background, so none is purple.
    assert all(p.target["color"] != "purple" for p in out if p.group == "seen")


def test_paraphrases_are_new_wordings_of_seen_targets(prompts: list[DemoPrompt]) -> None:
    seen_targets = [p.target for p in prompts if p.group == "seen"]
    paraphrases = [p for p in prompts if p.group == "paraphrase"]
    assert len(paraphrases) == 8
    for p in paraphrases:
        assert p.target in seen_targets
        assert p.prompt not in training_captions(p.target)
        assert parse_attributes(p.prompt) != p.target  # only the synonym table reads it
    assert len({p.prompt for p in paraphrases}) == len(paraphrases)


def test_synonyms_parse_and_do_not_collide() -> None:
    for word, value in PARAPHRASES.items():
        assert parse_attributes(word) == {}  # not a vocabulary word
        (name,) = [n for n, values in VOCABULARY.items() if value in values]
        assert parse_prompt(f"a {word} thing") == {name: value}
    assert parse_prompt("A Tiny CRIMSON disc in the upper-left corner") == {
        "color": "red", "shape": "circle", "size": "small", "position": "top left"
    }  # fmt: skip
    target = {"color": "blue", "shape": "triangle", "size": "large", "position": "center"}
    for variant in range(8):
        assert parse_prompt(render_paraphrase(target, variant)) == target


def test_prompts_from_generated_metadata(tmp_path) -> None:
    cfg = ShapesConfig(
        image_size=32,
        num_train=2,
        num_val=1,
        num_heldout=2,
        samples_per_shard=10,
        held_out=["green circle", "small orange"],
        backgrounds=["white", "cream"],
        workers=1,
    )
    metadata = generate(cfg, str(tmp_path))
    from_path = demo_prompts_from_metadata(tmp_path / "metadata.json", num_seen=4)
    assert from_path == demo_prompts_from_metadata(metadata, num_seen=4)
    assert from_path == demo_prompts(cfg.held_out, cfg.backgrounds, num_seen=4)
    held = [p.target for p in from_path if p.group == "held-out"]
    assert any(t["color"] == "green" and t["shape"] == "circle" for t in held)
    assert any(t["color"] == "orange" and t["size"] == "small" for t in held)


def test_scoring_rendered_prompts_is_perfect(prompts: list[DemoPrompt]) -> None:
    images = [np.asarray(render_image(ShapeAttributes(**p.target), 64)) for p in prompts]
    scored = score_pairs(zip(prompts, images, strict=True), guidance=2.0)
    assert [s.group for s in scored] == [p.group for p in prompts]
    rows = summarise(scored)
    assert [r.group for r in rows] == [*GROUPS, "all"]
    for row in rows:
        assert row.guidance == 2.0 and row.found == 1.0
        assert all(v == 1.0 for v in row.accuracy.values()), row
    # Text targets and a blank image: parsed from the prompt, all wrong, nothing found.
    blank = np.full((64, 64, 3), 255, np.uint8)
    (miss,) = score_pairs([("a small red circle at the top left", blank)])
    assert miss.group == "all" and not miss.found
    assert miss.correct == dict.fromkeys(SCORED_ATTRIBUTES, False)


def test_scoring_uses_the_dataset_radii(prompts: list[DemoPrompt]) -> None:
    radii = {"small": 0.16, "large": 0.19}
    geometry = geometry_from_metadata({"config": {"radii": radii}})
    assert geometry is shape_geometry(radii)
    assert geometry_from_metadata({"config": {}}) is shape_geometry()  # older metadata
    images = [
        np.asarray(render_image(ShapeAttributes(**p.target), 32, radii=radii)) for p in prompts
    ]
    pairs = list(zip(prompts, images, strict=True))
    (right,) = summarise(score_pairs(pairs, "all", geometry=geometry), total=False)
    assert all(v == 1.0 for v in right.accuracy.values()), right
    (wrong,) = summarise(score_pairs(pairs, "all"), total=False)  # default radii: small -> large
    assert wrong.accuracy["size"] < 0.9


def sample(group: str, guidance: float | None, target: str, predicted: str) -> ScoredSample:
    """A hand-made scored sample; attributes written as ``"color shape size position"``."""
    names = ("color", "shape", "size", "position")
    pred = {n: (None if v == "-" else v) for n, v in zip(names, predicted.split(), strict=True)}
    tgt = {n: v for n, v in zip(names, target.split(), strict=True) if v != "*"}
    return ScoredSample(group, guidance, tgt, pred)


def test_aggregation_math_by_hand() -> None:
    samples = [
        # guidance 1: seen x3, held-out x1
        sample("seen", 1.0, "red circle small center", "red circle small center"),  # all right
        sample("seen", 1.0, "red circle small center", "red square small center"),  # shape wrong
        sample("seen", 1.0, "blue square large top_left", "- - - -"),  # nothing found
        sample("held-out", 1.0, "red triangle * *", "red triangle large center"),  # 2 of 2
        # guidance 3: paraphrase x2
        sample("paraphrase", 3.0, "red circle small center", "green circle large center"),
        sample("paraphrase", 3.0, "red circle small center", "red circle small center"),
        # no guidance given
        sample("custom", None, "red circle small center", "red circle small top_left"),
    ]
    rows = summarise(samples)
    assert [(r.group, r.guidance, r.count) for r in rows] == [
        ("custom", None, 1),
        ("seen", 1.0, 3),
        ("held-out", 1.0, 1),
        ("all", 1.0, 4),
        ("paraphrase", 3.0, 2),
    ]
    custom, seen, held, total, para = rows
    assert custom.accuracy == {
        "color": 1.0, "shape": 1.0, "size": 1.0, "position": 0.0, "all": 0.0
    }  # fmt: skip
    assert seen.found == pytest.approx(2 / 3)
    assert seen.accuracy == pytest.approx(
        {"color": 2 / 3, "shape": 1 / 3, "size": 2 / 3, "position": 2 / 3, "all": 1 / 3}
    )
    assert held.accuracy["color"] == 1.0 and held.accuracy["all"] == 1.0
    assert math.isnan(held.accuracy["size"]) and math.isnan(held.accuracy["position"])
    # The total weighs every sample once; size/position only count the 3 seen samples.
    assert total.accuracy == pytest.approx(
        {"color": 3 / 4, "shape": 2 / 4, "size": 2 / 3, "position": 2 / 3, "all": 2 / 4}
    )
    assert para.accuracy == pytest.approx(
        {"color": 0.5, "shape": 1.0, "size": 0.5, "position": 1.0, "all": 0.5}
    )
    assert summarise(samples, total=False) == [r for r in rows if r.group != "all"]

    report = format_report(rows)
    lines = report.splitlines()
    assert lines[1].split() == ["group", "cfg", "n", "found", *SCORED_ATTRIBUTES, "all"]
    assert lines[4].split() == ["seen", "1", "3", "0.67", "0.67", "0.33", "0.67", "0.67", "0.33"]
    assert lines[5].split() == ["held-out", "1", "1", "1.00", "1.00", "1.00", "-", "-", "1.00"]
    assert lines[3].split()[:2] == ["custom", "-"]
    assert AdherenceRow.to_dict(para)["all"] == 0.5
