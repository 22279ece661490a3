"""Bucketed vs centre-cropped training on the same non-square images, at one fixed budget.

The data: one coloured disc on white, in landscape (16×24, the disc at the left, centre or
right) and portrait (24×16: top, centre or bottom) images, 3 colours, written as webdataset
shards. Two identical class-conditional pixel-space U-Nets (same initial weights, same steps,
batch and learning rate; the class is aspect × position × colour) train on them through
``ShardDataset``: one with aspect buckets (``data.buckets.sizes [[16, 24], [24, 16]]``, every
image kept whole), one with the square centre crop (``data.image_size 16``, what training
without buckets does). Each then samples every class with DDIM and classifier-free guidance,
and a small analyser scores the samples: the disc found, its colour, its position (which third
of the long side holds its centroid), whether it is whole (not cut by the image border) and
how far its centroid lies from where the training images put it. Also printed: what the crop
throws away of the training data itself.

The models predict v (Salimans & Ho 2022, Sec. 4), not ε: with ε on this linear schedule
(ᾱ_T ≈ 4e-5) x̂0 = (x_t − sqrt(1 − ᾱ_t)·ε̂)/sqrt(ᾱ_t) multiplies the network's ε error by up
to sqrt((1 − ᾱ_T)/ᾱ_T) ≈ 157, and after a few hundred steps (ε RMS error ≈ 0.09 at t = 999)
the first DDIM steps start from x̂0 off by ~15, so every sample is a saturated noise field:
colour and position at chance whatever the class (``--prediction eps`` shows it).

    python bench/buckets_vs_crop.py --threads 1   # 9-13 min on one of 2 shared cores (load 3-6)
    python bench/buckets_vs_crop.py --threads 1 --steps 300   # ~4 min: colour only 68-79%
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm.data.buckets import bucket_set
from ldm.data.reader import ShardDataset
from ldm.data.write_shards import ShardWriter
from ldm.diffusion.denoiser import Denoiser
from ldm.diffusion.grids import exact_grid
from ldm.diffusion.guidance import CFGDenoiser
from ldm.diffusion.losses import diffusion_loss
from ldm.diffusion.samplers import sample_ddim
from ldm.diffusion.schedules import NoiseSchedule
from ldm.eval.image_ops import largest_component
from ldm.models.unet import UNetModel

COLORS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220)}
ASPECTS = {
    "landscape": ((16, 24), ("left", "centre", "right")),
    "portrait": ((24, 16), ("top", "centre", "bottom")),
}  # (h, w), positions
CLASSES = [(a, p, c) for a, (_, ps) in ASPECTS.items() for p in ps for c in COLORS]
FRACTIONS = (0.22, 0.5, 0.78)  # disc centre along the long side, per position
RADIUS = 3.0  # px
JITTER = 0.5  # px: a far disc keeps ≥ 1.78 px to the border, and the 16x16 crop cuts each one


def render(aspect: str, position: str, color: str, rng: np.random.Generator) -> Image.Image:
    """One image: a disc of ``color`` at ``position`` along the long side (±`JITTER`)."""
    (h, w), positions = ASPECTS[aspect]
    f = FRACTIONS[positions.index(position)]
    along, across = (w, h) if aspect == "landscape" else (h, w)
    a, b = f * along + rng.uniform(-JITTER, JITTER), across / 2 + rng.uniform(-JITTER, JITTER)
    cx, cy = (a, b) if aspect == "landscape" else (b, a)
    ss = 4  # supersampling
    img = Image.new("RGB", (w * ss, h * ss), (255, 255, 255))
    r = RADIUS * ss
    ImageDraw.Draw(img).ellipse((cx * ss - r, cy * ss - r, cx * ss + r, cy * ss + r),
                                fill=COLORS[color])  # fmt: skip
    return img.reduce(ss)


def write_data(root: Path, n: int, seed: int) -> tuple[str, list[np.ndarray]]:
    """``n`` samples (classes in turn) as shards; also the images, for the crop's loss."""
    rng = np.random.default_rng(seed)
    images = []
    per_shard = -(-n // 4)  # 4 shards (fewer for n < 4)
    with ShardWriter(str(root / "train-%06d.tar"), max_samples=per_shard) as writer:
        for i in range(n):
            aspect, position, color = CLASSES[i % len(CLASSES)]
            img = render(aspect, position, color, rng)
            images.append(np.asarray(img))
            buffer = io.BytesIO()
            img.save(buffer, format="PNG")
            writer.write({"__key__": f"s{i:05d}", "png": buffer.getvalue(),
                          "txt": f"{aspect} {position} {color}"})  # fmt: skip
    last = -(-n // per_shard) - 1
    return str(root / f"train-{{000000..{last:06d}}}.tar"), images


def shape_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not background (far from white); ``rgb`` in [0, 1], (H, W, 3)."""
    return np.linalg.norm(1.0 - rgb, axis=-1) > 0.35


def analyse(rgb: np.ndarray, aspect: str, position: str, color: str) -> dict[str, float]:
    """Found / colour / position / whole (0 or 1) and offset (px) for one image in [0, 1].

    The disc is the largest 4-connected blob of non-background pixels (isolated specks of
    leftover sampling noise are not part of it): found when it has ≥ 3 pixels, its colour is
    the nearest of `COLORS` to its mean, its position the third of the long side that holds its
    centroid, and it is whole when it touches no image border. The offset is the distance along
    the long side from its centroid to where the training images put that position's disc
    (NaN unless found, and at the aspect's own size; a cut disc's centroid is the visible
    part's, so the offset understates how far out it is)."""
    mask = largest_component(shape_mask(rgb), connectivity=4)
    if mask.sum() < 3:
        return {"found": 0, "color": 0, "position": 0, "whole": 0, "offset": np.nan}
    mean = rgb[mask].mean(0) * 255
    nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - np.array(COLORS[c])))
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    along, size = (xs.mean(), w) if aspect == "landscape" else (ys.mean(), h)
    third = min(2, int(3 * (along + 0.5) / size))
    border = mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
    (sizes, positions) = ASPECTS[aspect]
    target = FRACTIONS[positions.index(position)] * size  # pixel i spans [i, i + 1)
    offset = abs(along + 0.5 - target) if (h, w) == sizes else np.nan
    return {"found": 1, "color": int(nearest == color), "position": int(positions[third] ==
            position), "whole": int(not border), "offset": offset}  # fmt: skip


def centre_crop(img: np.ndarray, side: int = 16) -> np.ndarray:
    """The ``side``×``side`` centre crop of an (H, W, ...) image (what ``data.image_size`` does)."""
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    return img[top : top + side, left : left + side]


def crop_loss(images: list[np.ndarray]) -> tuple[float, float]:
    """Share of disc pixels the 16×16 centre crop removes, and share of images it cuts."""
    lost, cut = [], []
    for img in images:
        mask = shape_mask(img / 255.0)
        kept = centre_crop(mask).sum()
        lost.append(1 - kept / mask.sum())
        cut.append(kept < mask.sum())
    return float(np.mean(lost)), float(np.mean(cut))


NULL = len(CLASSES)  # the "no class" label of classifier-free guidance


def make_unet() -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                     num_res_blocks=1, attention_resolutions=(), num_heads=4, context_dim=None,
                     num_classes=len(CLASSES) + 1)  # fmt: skip


def label(captions: list[str], p_uncond: float = 0.0,
          generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Class indices of the captions; each replaced by `NULL` with probability ``p_uncond``."""
    y = torch.tensor([CLASSES.index(tuple(c.split())) for c in captions])
    drop = torch.rand(len(y), generator=generator) < p_uncond
    return torch.where(drop, torch.full_like(y, NULL), y)


def train(dataset: ShardDataset, steps: int, schedule: NoiseSchedule, prediction: str = "v",
          p_uncond: float = 0.1) -> tuple[UNetModel, float]:  # fmt: skip
    """``steps`` AdamW steps on ``dataset`` (epoch after epoch); the model and seconds taken.

    Each label is dropped to `NULL` with probability ``p_uncond`` (classifier-free guidance,
    Ho & Salimans 2022, Sec. 3.2); the loss is the plain (uniformly weighted) MSE on the
    ``prediction`` target."""
    net = make_unet()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    step, epoch, start = 0, 0, time.perf_counter()
    while step < steps:
        dataset.set_position(epoch)
        for batch in dataset:
            y = label(batch["caption"], p_uncond, gen)
            out = diffusion_loss(net, batch["image"], schedule, {"y": y}, prediction=prediction,
                                 generator=gen)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            out.loss.mean().backward()
            opt.step()
            step += 1
            if step % 100 == 0:
                print(f"  step {step}/{steps}  loss {out.loss.mean().item():.4f}", flush=True)
            if step == steps:
                break
        epoch += 1
    return net.eval(), time.perf_counter() - start


@torch.no_grad()
def sample(net: UNetModel, schedule: NoiseSchedule, cls: int, hw: tuple[int, int], n: int,
           steps: int, prediction: str = "v", guidance: float = 1.0) -> np.ndarray:  # fmt: skip
    """``n`` DDIM samples of class ``cls`` at size ``hw``, with classifier-free guidance of
    scale ``guidance`` against `NULL` (1: none): (n, H, W, 3) in [0, 1]."""
    grid = exact_grid(schedule, steps)
    noise = torch.randn(n, 3, *hw, generator=torch.Generator().manual_seed(cls))
    cond, uncond = {"y": torch.full((n,), cls)}, {"y": torch.full((n,), NULL)}
    denoiser = CFGDenoiser(Denoiser(net, schedule, prediction), cond, uncond, scale=guidance)
    x = sample_ddim(denoiser, noise * grid.init_scale, grid.sigmas, disable_progress=True)
    x = (x / grid.final_scale).clamp(-1, 1)
    return ((x + 1) / 2).permute(0, 2, 3, 1).numpy()


def score(images_per_class: dict[int, np.ndarray]) -> dict[tuple[str, str], dict[str, float]]:
    """Mean of each analyser attribute per (aspect, position), over colours and samples."""
    acc: dict[tuple[str, str], list[dict[str, float]]] = {}
    for cls, images in images_per_class.items():
        aspect, position, color = CLASSES[cls]
        acc.setdefault((aspect, position), [])
        acc[aspect, position] += [analyse(img, aspect, position, color) for img in images]

    def mean(values: list[float]) -> float:
        kept = [v for v in values if not np.isnan(v)]
        return float(np.mean(kept)) if kept else np.nan

    return {key: {k: mean([r[k] for r in rows]) for k in rows[0]} for key, rows in acc.items()}


def table(rows: dict[str, dict[tuple[str, str], dict[str, float]]]) -> str:
    """One block per aspect: found and colour over the aspect; position, whole and offset (px,
    "-" where not measured) per position."""
    lines = []
    for aspect, ((h, w), positions) in ASPECTS.items():
        names = " ".join(f"{p:>6s}" for p in positions)
        lines += ["", f"{aspect} {h}x{w:<8} found colour | position {names} | whole {names} "
                      f"| offset px {names}"]  # fmt: skip
        for name, per in rows.items():
            cells = [per[aspect, p] for p in positions]
            found = np.mean([c["found"] for c in cells])
            colour = np.mean([c["color"] for c in cells])
            pos = " ".join(f"{c['position']:6.0%}" for c in cells)
            whole = " ".join(f"{c['whole']:6.0%}" for c in cells)
            off = " ".join("     -" if np.isnan(c["offset"]) else f"{c['offset']:6.1f}"
                           for c in cells)  # fmt: skip
            lines.append(f"{name:21s} {found:5.0%} {colour:6.0%} |          {pos} |       "
                         f"{whole} |           {off}")  # fmt: skip
    return "\n".join(lines)


def positive(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-samples", type=positive, default=1536)
    p.add_argument("--steps", type=positive, default=600, help="training steps of each model")
    p.add_argument("--batch", type=positive, default=32)
    p.add_argument("--samples", type=positive, default=8, help="samples per class")
    p.add_argument("--sample-steps", type=positive, default=15, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--prediction", choices=("v", "eps"), default="v",
                   help="network target (eps: what the first, inconclusive run used)")  # fmt: skip
    p.add_argument("--threads", type=positive, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        pattern, images = write_data(Path(tmp), args.train_samples, seed=0)
        common = dict(batch_size=args.batch, shuffle_buffer=256, seed=0, rank=0, world_size=1)
        bucketed = ShardDataset(
            pattern,
            buckets=bucket_set({"enabled": True, "sizes": [[16, 24], [24, 16]], "step": 8}),
            **common,
        )
        cropped = ShardDataset(pattern, image_size=16, **common)
        nets = {}
        for name, ds in (("bucketed", bucketed), ("centre crop", cropped)):
            print(f"training {name}", flush=True)
            nets[name] = train(ds, args.steps, schedule, args.prediction)
    lost, cut = crop_loss(images)
    print(f"{args.train_samples} training images (half 16x24, half 24x16), {args.steps} steps "
          f"of batch {args.batch} per model ({args.prediction}-prediction), {args.samples} "
          f"DDIM-{args.sample_steps} samples per class ({len(CLASSES)} classes) at guidance "
          f"{args.guidance:g}")  # fmt: skip
    print(f"the 16x16 centre crop cuts the disc in {cut:.0%} of the training images and removes "
          f"{lost:.0%} of all disc pixels")  # fmt: skip
    for name, (_, seconds) in nets.items():
        print(f"train {name}: {seconds:.0f} s")
    real = {i: np.stack([images[j] / 255.0 for j in range(i, len(images), len(CLASSES))][:8])
            for i in range(min(len(CLASSES), len(images)))}  # fmt: skip
    crops = {i: np.stack([centre_crop(img) for img in imgs]) for i, imgs in real.items()}
    rows = {"real images": score(real), "real 16x16 crops": score(crops)}
    start = time.perf_counter()
    for name, (net, _) in nets.items():
        sizes = {"bucketed": ["bucket"], "centre crop": ["16x16", "bucket"]}[name]
        for size in sizes:
            outs = {}
            for cls, (aspect, _, _) in enumerate(CLASSES):
                hw = ASPECTS[aspect][0] if size == "bucket" else (16, 16)
                outs[cls] = sample(net, schedule, cls, hw, args.samples, args.sample_steps,
                                   args.prediction, args.guidance)  # fmt: skip
            rows[f"{name} @ {size}"] = score(outs)
    print(f"sampling: {time.perf_counter() - start:.0f} s")
    print(table(rows))


if __name__ == "__main__":
    main()
