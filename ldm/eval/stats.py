"""Reference statistics for FID/KID: Inception features of shard images, streamed, all ranks.

    python -m ldm.eval.stats --shards 'data/val-{000000..000009}.tar' \\
        --inception weights/pt_inception-2015-12-05-6726825d.pth --out ref.npz [--size 256]
    torchrun --nproc_per_node 8 -m ldm.eval.stats ...      # each rank reads its own shards

Writes ``mu``, ``sigma`` and ``n`` (pytorch-fid's layout, so its ``.npz`` files work as
``--ref`` too) and, with ``--features`` (the default up to ``--max-features`` images), the
feature matrix that KID needs. Images are centre-cropped and resized to ``--size`` as training
does, then fed to the FID Inception (which resizes to 299 the way the reference FID does).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm.eval.fid import FeatureStats
from ldm.eval.inception import FEATURE_DIM


def init_distributed() -> tuple[int, int]:
    """(rank, world) from torchrun's environment; initialises the process group when > 1."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``(n_r, D)`` rows (rank order); no-op on one process."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return x
    parts: list[torch.Tensor | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat([p for p in parts if p is not None])


def shard_statistics(
    shards: str,
    inception: torch.nn.Module,
    size: int,
    batch_size: int,
    device: torch.device,
    limit: int | None = None,
    keep: int = 0,
) -> tuple[FeatureStats, torch.Tensor | None]:
    """This rank's running statistics of its share of the shard images (constant memory),
    and its feature rows while there are at most ``keep`` of them. Prints progress lines."""
    from ldm.data.reader import ShardDataset

    data = ShardDataset(
        shards,
        batch_size=batch_size,
        image_size=size,
        shuffle_buffer=0,
        shard_shuffle=False,
        name="stats",
    )
    stats, rows = FeatureStats(FEATURE_DIM), []
    start, last = time.perf_counter(), 0.0
    with torch.no_grad():
        for batch in data:
            images = batch["image"]
            if limit is not None:
                images = images[: limit - stats.n]
            f = inception(images.to(device)).cpu()
            stats.update(f)
            if stats.n <= keep:
                rows.append(f)
            now = time.perf_counter() - start
            if now - last > 10:
                print(f"stats: {stats.n} images, {stats.n / now:.1f} img/s", flush=True)
                last = now
            if limit is not None and stats.n >= limit:
                break
    if stats.n == 0:
        raise ValueError(f"no images could be read from {shards}")
    return stats, torch.cat(rows) if rows and stats.n <= keep else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="shard pattern of the reference images")
    p.add_argument("--inception", required=True, help="local pt_inception-2015-12-05 weights")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--size", type=int, default=256, help="centre-crop resize before Inception")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--limit", type=int, default=None, help="at most this many images per rank")
    p.add_argument(
        "--max-features",
        type=int,
        default=50_000,
        help="keep the feature matrix (for KID) up to this many images (0: never)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from ldm.eval.inception import load_fid_inception

    try:
        rank, world = init_distributed()
        device = torch.device(args.device)
        inception = load_fid_inception(args.inception, device)
        stats, rows = shard_statistics(
            args.shards,
            inception,
            args.size,
            args.batch_size,
            device,
            args.limit,
            keep=args.max_features,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats.all_reduce()
    kept = gather_rows(rows if rows is not None else torch.zeros(0, FEATURE_DIM))
    if rank == 0:
        extra = {}
        if len(kept) == stats.n <= args.max_features:  # every rank kept all of its rows
            extra["features"] = kept.numpy().astype(np.float32)
        mu, sigma = stats.mean_cov()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=np.array(stats.n), **extra)
        what = " with features for KID" if extra else ""
        print(f"wrote {out}: {stats.n} images over {world} rank(s){what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
