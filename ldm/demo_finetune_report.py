"""What ``make demo-finetune`` (:mod:`ldm.demo_finetune`) measures and how it reports it: the
prompts of the new concept and the demo's old ones, adherence and CIELAB ΔE*ab of sampled
images, the frozen autoencoder's round trip (the fine-tune's ceiling), parameter counts and the
report's table.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


def concept_prompts(color: str, count: int) -> list[Any]:
    """``count`` prompts for ``color`` covering the shapes, sizes and positions evenly (training
    caption phrasing 0), as :class:`ldm.eval.adherence.DemoPrompt` in group ``"new"``."""
    from ldm.data.shapes_vocab import POSITIONS, SHAPES, SIZES, ShapeAttributes, render_caption
    from ldm.eval.adherence import DemoPrompt

    combos = itertools.islice(
        zip(
            itertools.cycle(SHAPES),
            itertools.cycle(SIZES),
            itertools.cycle(POSITIONS),
            strict=False,
        ),
        count,
    )
    out = []
    for shape, size, position in combos:
        attrs = ShapeAttributes(color, shape, size, position)
        target = {"color": color, "shape": shape, "size": size, "position": position}
        out.append(DemoPrompt(render_caption(attrs), "new", target))
    return out


def old_prompts(metadata: Path) -> list[Any]:
    """The demo's own seen and held-out prompts (its ``metadata.json``), in group ``"old"``."""
    from ldm.eval.adherence import DemoPrompt, demo_prompts_from_metadata

    return [
        DemoPrompt(p.prompt, "old", p.target)
        for p in demo_prompts_from_metadata(metadata)
        if p.group in ("seen", "held-out")
    ]


def score(
    ckpt: Path, prompts: list[Any], geometry: Any, n: int, steps: int | None = None
) -> dict[str, dict[str, Any]]:
    """Sample ``n`` images per prompt from ``ckpt`` at its configured guidance (fixed noise, the
    same for every model) and return the adherence row of each group by group name."""
    from ldm import assemble, build
    from ldm.demo import fixed_noise_samples
    from ldm.eval.adherence import score_pairs, summarise

    model, cfg = assemble.load_for_sampling(ckpt)
    if steps is not None:
        cfg.sampling.steps = steps
    sampler = build.build_sampler(cfg.sampling, disable_progress=True)
    guidance = float(cfg.sampling.guidance)
    scored, errors = [], {}
    for p in prompts:
        images = fixed_noise_samples(model, sampler, p.prompt, n, cfg.data.image_size, guidance)
        scored += score_pairs([(p, img) for img in images], guidance=guidance, geometry=geometry)
        errors.setdefault(p.group, []).extend(color_errors(images, p.target["color"], geometry))
    rows = {row.group: row.to_dict() for row in summarise(scored, total=False)}
    for group, row in rows.items():
        row["delta_e"] = float(np.median(errors[group])) if errors[group] else math.nan
    return rows


def color_errors(images: Any, color: str, geometry: Any) -> list[float]:
    """CIELAB ΔE*ab (CIE 1976) between the drawn shape colour of each image (where the analyser
    finds a shape) and the palette RGB of ``color``: how close a colour comes, where the
    analyser's nearest-colour name only says which palette colour is closest."""
    from ldm.data.shapes_vocab import PALETTE
    from ldm.eval.shapes import analyse_shape, srgb_to_lab

    target = srgb_to_lab(np.asarray(PALETTE[color]) / 255.0)
    found = [analyse_shape(image, geometry) for image in images]
    return [
        float(np.linalg.norm(srgb_to_lab(np.asarray(a.features["rgb"])) - target))
        for a in found
        if a.found
    ]


def autoencoder_round_trip(ckpt: Path, shard: Path, color: str, geometry: Any) -> dict[str, Any]:
    """The ceiling of any U-Net fine-tune: the analyser's colour accuracy on the real ``color``
    images of ``shard`` after the frozen autoencoder's encode and decode (the U-Net can only
    learn latents that decode to what this shows)."""
    import io
    import tarfile

    from PIL import Image

    from ldm import assemble
    from ldm.eval.shapes import analyse_shape

    images = []
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name, member in members.items():
            if name.endswith(".json") and json.load(tar.extractfile(member))["color"] == color:
                png = tar.extractfile(members[name[: -len("json")] + "png"]).read()
                images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    model, _ = assemble.load_for_sampling(ckpt)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        decoded = model.decode_latents(model.encode_images(x, torch.Generator().manual_seed(0)))
    hits = [analyse_shape(image, geometry).color == color for image in decoded]
    return {
        "count": len(hits),
        "color": sum(hits) / len(hits),
        "delta_e": float(np.median(color_errors(decoded, color, geometry))),
    }


def tensor_count(path: Path, prefix: str = "", skip: str | None = None) -> int:
    """Elements of the tensors of a safetensors file whose key starts with ``prefix`` (and does
    not end with ``skip``)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(
            math.prod(f.get_slice(k).get_shape())
            for k in f.keys()
            if k.startswith(prefix) and not (skip and k.endswith(skip))
        )


def format_table(rows: list[dict[str, Any]], concept: str) -> str:
    """The report's table: one line per model (before, LoRA, full)."""
    header = (
        f"{'model':<10}{'trainable':>11}{'train s':>9}{'file':>10}"
        f"{concept + ' colour':>14}{'ΔE':>6}{concept + ' all':>11}{'old colour':>12}{'ΔE':>6}"
        f"{'old all':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        size = "-" if r["file_bytes"] is None else f"{r['file_bytes'] / 1024:.1f} KB"
        train = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        trainable = "-" if r["trainable_params"] is None else f"{r['trainable_params']:,}"
        lines.append(
            f"{r['model']:<10}{trainable:>11}{train:>9}{size:>10}"
            f"{r['new']['color']:>14.2f}{r['new']['delta_e']:>6.1f}"
            f"{r['new']['all']:>11.2f}{r['old']['color']:>12.2f}"
            f"{r['old']['delta_e']:>6.1f}{r['old']['all']:>9.2f}"
        )
    return "\n".join(lines)
