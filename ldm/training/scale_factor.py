"""Measure the latent scale factor from data and store it in an autoencoder checkpoint.

Rombach et al. 2022 (App. G, "we rescale the latents by a component-wise 1/σ̂") scale the
latents fed to the diffusion model to unit variance: ``scale_factor = 1 / std(z)`` with
``z ~ q(z|x)``. SD pasted the resulting 0.18215 into scripts; here it is measured over N batches
and saved as the autoencoder's ``scale_factor`` buffer.

    python -m ldm.training.scale_factor --ckpt runs/ae/checkpoints/last.safetensors \\
        -c configs/demo/autoencoder.yaml --batches 20
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ldm.checkpoint.format import CheckpointError, load_checkpoint, save_checkpoint


@torch.no_grad()
def measure_scale_factor(
    autoencoder: torch.nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """``1 / std(z)`` over all elements of posterior samples of up to ``num_batches`` batches.

    Args:
        autoencoder: An ``AutoencoderKL``.
        batches: Dicts with an ``image`` tensor in [-1, 1], or image tensors.
        num_batches: How many batches to use at most.
        generator: RNG for posterior sampling.
        device: Where to run the encoder.
        progress: Show a progress bar.

    Returns:
        The scale factor (a float).
    """
    autoencoder = autoencoder.eval().to(device)
    count, total, total_sq = (
        0,
        torch.zeros((), dtype=torch.float64),
        torch.zeros((), dtype=torch.float64),
    )
    bar = tqdm(total=num_batches, desc="measuring scale_factor", disable=not progress)
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        x = batch["image"] if isinstance(batch, dict) else batch
        z = autoencoder.encode(x.to(device)).sample(generator=generator).double().cpu()
        count += z.numel()
        total += z.sum()
        total_sq += z.pow(2).sum()
        bar.update(1)
    bar.close()
    if count < 2:
        raise ValueError("no data to measure the scale factor from")
    var = (total_sq - total**2 / count) / (count - 1)
    return float(1.0 / var.sqrt())


def set_scale_factor(path: str | Path, value: float, out: str | Path | None = None) -> Path:
    """Rewrite an autoencoder/ldm checkpoint with a new ``scale_factor`` (atomically)."""
    ckpt = load_checkpoint(path)
    key = "autoencoder.scale_factor"
    if key not in ckpt.tensors:
        raise CheckpointError(f"{path} holds no autoencoder scale_factor buffer")
    ckpt.tensors[key] = torch.tensor(value, dtype=ckpt.tensors[key].dtype)
    config = dict(ckpt.config)
    config.setdefault("model", {}).setdefault("autoencoder", {})["scale_factor"] = value
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in ckpt.tensors.items():
        module, _, param = name.partition(".")
        modules.setdefault(module, {})[param] = tensor
    extra = {
        k: v for k, v in ckpt.metadata.items() if k not in ("format", "version", "kind", "config")
    }
    return save_checkpoint(out or path, modules, config, ckpt.kind, extra=extra)


def main(argv: list[str] | None = None) -> int:
    from ldm import build
    from ldm.config import ConfigError, load

    parser = argparse.ArgumentParser(description="Measure and store the latent scale factor.")
    parser.add_argument("--ckpt", required=True, help="autoencoder checkpoint (.safetensors)")
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        help="config whose `data` section gives the images",
    )
    parser.add_argument("--batches", type=int, default=20, help="batches to measure over")
    parser.add_argument("--out", default=None, help="output checkpoint (default: in place)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        autoencoder = build.load_autoencoder(args.ckpt)
        datamodule = build.build_datamodule(cfg)
        datamodule.setup("fit")
        generator = torch.Generator().manual_seed(cfg.run.seed)
        value = measure_scale_factor(
            autoencoder, datamodule.train_dataloader(), args.batches, generator=generator
        )
        out = set_scale_factor(args.ckpt, value, args.out)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"scale_factor = {value:.6f} written to {out}")
    return 0


if __name__ == "__main__":
    from ldm.boundary import error_boundary

    sys.exit(error_boundary(main)())
