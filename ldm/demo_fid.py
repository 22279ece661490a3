"""The demo's FID step: Fréchet shape distance of samples for the val captions vs the val images.

For the first ``n`` images of the shapes val split, one sample per caption (seed ``seed + i``)
is generated with the checkpoint's sampling settings, and both sets go through the shapes
analyser's features (`ldm.eval.shape_fid`): the FID recipe (captions of a reference set →
samples, compared with the reference images), in a feature space that needs no download and
means something on shapes. Not Inception FID; the floor is two halves of the val images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def val_images(shards: str, n: int, image_size: int) -> tuple[list[torch.Tensor], list[str]]:
    """The first ``n`` val images ((3, H, W) in [-1, 1]) and captions, in shard order."""
    from ldm.data.reader import ShardDataset

    data = ShardDataset(
        shards,
        batch_size=min(64, n),
        image_size=image_size,
        shuffle_buffer=0,
        shard_shuffle=False,
        name="fsd",
    )
    images: list[torch.Tensor] = []
    captions: list[str] = []
    for batch in data:
        images += list(batch["image"])
        captions += list(batch["caption"])
        if len(images) >= n:
            break
    if len(images) < 2:
        raise ValueError(f"need at least 2 val images for FSD, read {len(images)} from {shards}")
    return images[:n], captions[:n]


@torch.no_grad()
def demo_fsd(
    ckpt: Path,
    metadata: Path,
    val_shards: str,
    n: int = 256,
    batch_size: int = 32,
    seed: int = 2000,
) -> dict[str, Any]:
    """FSD of the checkpoint's samples for the first ``n`` val captions against those images.

    Returns:
        `ldm.eval.shape_fid.fsd_report`'s dict plus the guidance, sampler and steps used.
    """
    from ldm import assemble, build
    from ldm.eval.adherence import geometry_from_metadata
    from ldm.eval.shape_fid import feature_matrix, fsd_report

    model, cfg = assemble.load_for_sampling(ckpt)
    sampler = build.build_sampler(cfg.sampling, disable_progress=True)
    size = int(cfg.data.image_size)
    reference, captions = val_images(val_shards, n, size)
    geometry = geometry_from_metadata(metadata)
    generated: list[torch.Tensor] = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images, _ = model.generate(
            chunk,
            sampler,
            guidance=float(cfg.sampling.guidance),
            height=size,
            width=size,
            generator=gens,
        )
        generated += list(images.float().cpu())
    fake, found = feature_matrix(generated, geometry)
    real, _ = feature_matrix(reference, geometry)
    return {
        **fsd_report(fake, real, found),
        "guidance": float(cfg.sampling.guidance),
        "sampler": sampler.sampler,
        "steps": sampler.steps,
    }


def format_fsd(r: dict[str, Any]) -> str:
    """The report's lines for a `demo_fsd` result."""
    return (
        f"Frechet shape distance (FID's formula on the shapes analyser's 13 features, "
        f"standardised by the val images; NOT Inception FID, comparable only between models "
        f"on shapes): {r['fsd']:.3f} for {r['n_generated']} samples of the val captions "
        f"({r['sampler']}, {r['steps']} steps, guidance {r['guidance']:g}; a shape found in "
        f"{100 * r['found_fraction']:.0f}%) vs {r['n_reference']} val images; floor (two "
        f"halves of the val images): {r['floor']:.3f}"
    )


__all__ = ["demo_fsd", "format_fsd", "val_images"]
