"""Cache autoencoder latents and text embeddings for a run's shards (``ldm.data.precompute``).

    python -m ldm.cache -c my-ldm.yaml --train-shards 'data/train-{000000..000009}.tar' \
        [--val-shards 'data/val-000000.tar'] --out data/cached [--dtype float16]

Takes the config one trains with (its autoencoder, text encoder, image size and caption key).
The image shards come from ``--train-shards``/``--val-shards``, or, for a config that still
reads images (``data.cached: false``), from its ``data.train_shards``/``data.val_shards``. It
encodes them with the frozen autoencoder of ``model.autoencoder_ckpt`` (posterior mean and std,
in float32) and the configured text encoder (SDXL: both encoders' states and the pooled
embedding), writes cached shards to ``<out>/train`` and
``<out>/val`` with the same names and sample keys, plus the empty-prompt embedding, and prints
the ``data.train_shards=...`` patterns to train on them with ``data.cached=true``. Under
``torchrun`` every rank caches its share of shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError, load


def cache_shards(
    cfg: object,
    out: str | Path,
    dtype: str = "float16",
    batch_size: int = 64,
    device: str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, object]:
    """Cache the config's train (and val) shards into ``out``; returns per-split summaries."""
    from ldm import build
    from ldm.data.buckets import bucket_set
    from ldm.data.precompute import precompute

    if not cfg.model.autoencoder_ckpt:  # type: ignore[attr-defined]
        raise ConfigError("caching needs model.autoencoder_ckpt (a trained autoencoder)")
    build.resolve(cfg)  # refuses data.buckets the models cannot take, before any work
    autoencoder = build.load_autoencoder(cfg.model.autoencoder_ckpt).to(device).eval()
    text_encoder = build.build_text_encoder(cfg.model.text_encoder).to(device)

    @torch.no_grad()
    def encode_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = autoencoder.encode(images.to(device).float())  # the VAE stays in float32
        return posterior.mean.cpu(), posterior.std.cpu()

    def encode_texts(captions: list[str]) -> tuple[torch.Tensor, ...]:
        if cfg.model.text_encoder.kind == "sdxl":  # type: ignore[attr-defined]
            # SDXL: both encoders' states side by side, no padding mask (all attended), pooled
            context, pooled = text_encoder.encode(captions)
            mask = torch.ones(context.shape[:2], dtype=torch.bool)
            return context.cpu(), mask, pooled.cpu()
        context, mask = text_encoder.encode(captions)
        return context.cpu(), mask.cpu()

    data = cfg.data  # type: ignore[attr-defined]
    summaries = {}
    for split, shards in (("train", data.train_shards), ("val", data.val_shards)):
        if not shards:
            continue
        summaries[split] = precompute(
            list(shards),
            os.path.join(str(out), split),
            encode_images,
            encode_texts,
            image_size=data.image_size,
            batch_size=batch_size,
            caption_key=data.caption_key,
            dtype=dtype,
            min_size=data.min_size,
            max_aspect=data.max_aspect,
            num_workers=num_workers,
            progress=progress,
            buckets=bucket_set(build.kwargs(data.buckets)),  # latents at each bucket's size
        )
    return summaries


def cached_patterns(shards: list[str], out: str | Path, split: str) -> list[str]:
    """Where the cached copies of ``shards`` (brace patterns kept) are: ``<out>/<split>/<name>``."""
    return [
        os.path.join(str(out), split, os.path.basename(str(spec).split("?", 1)[0]))
        for spec in shards
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        required=True,
        help="the config you train the LDM with (repeat to merge several)",
    )
    parser.add_argument(
        "--train-shards",
        action="append",
        default=[],
        metavar="PATTERN",
        help="image shards to cache (default: the config's data.train_shards when it reads images)",
    )
    parser.add_argument(
        "--val-shards",
        action="append",
        default=[],
        metavar="PATTERN",
        help="validation image shards to cache",
    )
    parser.add_argument("--out", required=True, help="output directory (train/ and val/)")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="storage dtype of the cached tensors",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="DataLoader workers decoding shards"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, [*args.overrides, *_shard_overrides(args)])
        if cfg.data.cached and not args.train_shards:
            raise ConfigError(
                "this config trains on cached shards (data.cached=true); pass the image shards "
                "to cache with --train-shards 'data/train-{000000..000009}.tar'"
            )
        train_shards, val_shards = list(cfg.data.train_shards), list(cfg.data.val_shards)
        summaries = cache_shards(
            cfg, args.out, args.dtype, args.batch_size, args.device, args.num_workers
        )
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, s in summaries.items():
        skipped = ", ".join(f"{k}: {v}" for k, v in s.skipped.items()) or "none"
        print(
            f"{split}: {s.samples} samples cached in {len(s.shards)} new shards "
            f"({len(s.existing)} already there; {s.captions_encoded} distinct captions encoded); "
            f"skipped: {skipped}"
        )
    train = cached_patterns(train_shards, args.out, "train")
    val = cached_patterns(val_shards, args.out, "val")
    line = f"data.cached=true data.train_shards={_shell(train)}"
    print("train on them with: " + line + (f" data.val_shards={_shell(val)}" if val else ""))
    return 0


def _shell(patterns: list[str]) -> str:
    """A shard list as one shell word that ``train.py`` reads back as that list."""
    return f"'{patterns[0]}'" if len(patterns) == 1 else f'"{_listed(patterns)}"'


def _shard_overrides(args: argparse.Namespace) -> list[str]:
    """The image shards given on the command line as config overrides (read images: cached off)."""
    overrides = []
    if args.train_shards:
        overrides += [f"data.train_shards={_listed(args.train_shards)}", "data.cached=false"]
        overrides.append(f"data.val_shards={_listed(args.val_shards)}")
    return overrides


def _listed(patterns: list[str]) -> str:
    return "[" + ",".join(f"'{p}'" for p in patterns) + "]"


if __name__ == "__main__":
    from ldm.boundary import error_boundary

    sys.exit(error_boundary(main)())
