"""Reconstruction metrics: PSNR and SSIM on images in [-1, 1], and a CLI that measures an
autoencoder on shards:

    python -m ldm.eval.reconstruction --ckpt runs/ae/checkpoints/last.safetensors \
        --shards 'data/val-{000000..000001}.tar' [--lpips vgg_lpips.safetensors] [--out dir]

It prints PSNR (dB) and SSIM (and LPIPS when its weights are given) over the images and writes
``<out>/reconstructions.png``: one row per image, the input left, its reconstruction (the
posterior mode, decoded) right. An ``ldm`` checkpoint works too (its autoencoder is measured).

SSIM follows Wang et al. 2004 (IEEE TIP 13(4)), eq. 13, with the usual 11×11 Gaussian window
(σ = 1.5), K1 = 0.01, K2 = 0.03, computed per channel on the valid region and averaged; this
matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=...)``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB.

    Args:
        x: ``(B, C, H, W)`` images.
        y: ``(B, C, H, W)`` reference images.
        data_range: Max minus min of the value range (2 for [-1, 1]).

    Returns:
        ``(B,)`` PSNR values.
    """
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum()).float()
    window = g[:, None] * g[None, :]  # (size, size)
    return window.expand(channels, 1, size, size).contiguous()


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13).

    Args:
        x: ``(B, C, H, W)`` images (H, W ≥ window_size).
        y: ``(B, C, H, W)`` reference images.
        data_range: Max minus min of the value range (2 for [-1, 1]).
        window_size: Gaussian window size.
        sigma: Gaussian window standard deviation.

    Returns:
        ``(B,)`` mean SSIM values.
    """
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian_window(window_size, sigma, c, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=c)  # valid region only

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).flatten(1).mean(1)


@torch.no_grad()
def evaluate(
    ckpt: str | Path,
    shards: list[str],
    image_size: int | None = None,
    max_images: int = 256,
    batch_size: int = 16,
    lpips_weights: str | None = None,
    grid_images: int = 8,
    out: str | Path | None = None,
) -> dict[str, float]:
    """Mean PSNR/SSIM (and LPIPS) of an autoencoder checkpoint's reconstructions of ``shards``.

    Args:
        ckpt: One of our autoencoder or ldm checkpoints.
        shards: Image shard patterns.
        image_size: Center-crop size (default: the checkpoint config's ``data.image_size``).
        max_images: Images measured at most.
        batch_size: Images per forward.
        lpips_weights: LPIPS/VGG16 weights file; None skips LPIPS.
        grid_images: Rows of the side-by-side grid.
        out: Directory for ``reconstructions.png`` (None: no grid).

    Returns:
        ``{"images", "psnr", "ssim"[, "lpips"]}``.
    """
    from torch.utils.data import DataLoader

    from ldm.build import load_autoencoder
    from ldm.checkpoint.format import read_metadata
    from ldm.data.reader import ShardDataset
    from ldm.images import make_grid, save_png

    if image_size is None:
        from omegaconf import OmegaConf

        config = OmegaConf.create(read_metadata(ckpt).get("config", "{}"))
        image_size = int(OmegaConf.select(config, "data.image_size", default=256))
    autoencoder = load_autoencoder(ckpt).eval()
    lpips = None
    if lpips_weights:
        from ldm.models.lpips import LPIPS

        lpips = LPIPS(lpips_weights)
    dataset = ShardDataset(
        list(shards),
        batch_size=batch_size,
        image_size=image_size,
        shuffle_buffer=0,
        shard_shuffle=False,
        name="reconstruction",
    )
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    n, shown = 0, []
    for batch in DataLoader(dataset, batch_size=None, num_workers=0):
        x = batch["image"][: max_images - n].float()
        rec = autoencoder.decode(autoencoder.encode(x).mode()).clamp(-1, 1)
        sums["psnr"] += float(psnr(rec, x).sum())
        if min(x.shape[-2:]) >= 11:
            sums["ssim"] += float(ssim(rec, x).sum())
        if lpips is not None:
            sums["lpips"] += float(lpips(rec, x).flatten().sum())
        if len(shown) < grid_images:
            shown.extend(torch.stack([x, rec], 1)[: grid_images - len(shown)])
        n += len(x)
        if n >= max_images:
            break
    if n == 0:
        raise ValueError(f"no images in {', '.join(shards)}")
    result = {"images": float(n), "psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n}
    if lpips is not None:
        result["lpips"] = sums["lpips"] / n
    if out is not None:
        pairs = torch.cat(shown)  # (2 * rows, C, H, W): input, reconstruction, input, ...
        save_png(make_grid(pairs, nrow=2), Path(out) / "reconstructions.png")
    return result


def main(argv: list[str] | None = None) -> int:
    from ldm.checkpoint.format import CheckpointError

    parser = argparse.ArgumentParser(description="Measure an autoencoder's reconstructions.")
    parser.add_argument("--ckpt", required=True, help="autoencoder (or ldm) checkpoint")
    parser.add_argument(
        "--shards",
        action="append",
        required=True,
        metavar="PATTERN",
        help="image shards (brace patterns; repeat for more)",
    )
    parser.add_argument("--image-size", type=int, help="default: the checkpoint's image size")
    parser.add_argument("--max-images", type=int, default=256, help="images measured at most")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lpips", metavar="WEIGHTS", help="LPIPS/VGG16 weights: adds LPIPS")
    parser.add_argument("--out", default="reconstruction", help="where the grid is written")
    args = parser.parse_args(argv)
    try:
        result = evaluate(
            args.ckpt,
            args.shards,
            args.image_size,
            args.max_images,
            args.batch_size,
            args.lpips,
            out=args.out,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    line = (
        f"{int(result['images'])} images: PSNR {result['psnr']:.2f} dB  SSIM {result['ssim']:.4f}"
    )
    if "lpips" in result:
        line += f"  LPIPS {result['lpips']:.4f}"
    print(line)
    print(f"grid (input | reconstruction): {Path(args.out) / 'reconstructions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
