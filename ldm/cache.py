"""Cache autoencoder latents and text embeddings for a run's shards (``ldm.data.precompute``).

    python -m ldm.cache -c configs/demo/ldm.yaml --out data/cached [--dtype float16]

Reads ``data.train_shards`` (and ``data.val_shards``) of the config, encodes them with the frozen
autoencoder of ``model.autoencoder_ckpt`` (posterior mean and std, in float32) and the
configured text encoder, and writes cached shards to ``<out>/train`` and ``<out>/val`` with the
same sample keys, plus the empty-prompt embedding. Train on them with ``data.cached=true`` and
``data.train_shards=<out>/train/...``. Under ``torchrun`` every rank caches its share of shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError, load


def cache_shards(cfg: object, out: str | Path, dtype: str = "float16", batch_size: int = 64,
                 device: str = "cpu", num_workers: int = 0, progress: bool = True
                 ) -> dict[str, object]:
    """Cache the config's train (and val) shards into ``out``; returns per-split summaries."""
    from ldm import build
    from ldm.data.precompute import precompute

    if not cfg.model.autoencoder_ckpt:  # type: ignore[attr-defined]
        raise ConfigError("caching needs model.autoencoder_ckpt (a trained autoencoder)")
    autoencoder = build.load_autoencoder(cfg.model.autoencoder_ckpt).to(device).eval()
    text_encoder = build.build_text_encoder(cfg.model.text_encoder).to(device)

    @torch.no_grad()
    def encode_images(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = autoencoder.encode(images.to(device).float())  # the VAE stays in float32
        return posterior.mean.cpu(), posterior.std.cpu()

    def encode_texts(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        context, mask = text_encoder.encode(captions)
        return context.cpu(), mask.cpu()

    data = cfg.data  # type: ignore[attr-defined]
    summaries = {}
    for split, shards in (("train", data.train_shards), ("val", data.val_shards)):
        if not shards:
            continue
        summaries[split] = precompute(
            list(shards), os.path.join(str(out), split), encode_images, encode_texts,
            image_size=data.image_size, batch_size=batch_size, caption_key=data.caption_key,
            dtype=dtype, min_size=data.min_size, max_aspect=data.max_aspect,
            num_workers=num_workers, progress=progress,
        )
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", action="append", default=[], required=True)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        summaries = cache_shards(cfg, args.out, args.dtype, args.batch_size, args.device,
                                 args.num_workers)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, s in summaries.items():
        skipped = ", ".join(f"{k}: {v}" for k, v in s.skipped.items()) or "none"
        print(f"{split}: {s.samples} samples cached in {len(s.shards)} new shards "
              f"({len(s.existing)} already there; {s.captions_encoded} distinct captions encoded); "
              f"skipped: {skipped}")
    return 0


if __name__ == "__main__":
    from ldm.boundary import error_boundary

    sys.exit(error_boundary(main)())
