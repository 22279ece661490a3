#!/usr/bin/env python
"""Sample images from a text-to-image latent diffusion checkpoint.

    python sample.py --ckpt runs/demo-ldm/checkpoints/last.safetensors \\
        --prompt "a small red circle at the top left" --n 4 --guidance 5 --steps 30

``--ckpt`` takes our checkpoints, original Stable Diffusion 1.x/2.x single files
(``.safetensors`` / ``.ckpt``; give their config with ``-c configs/ldm/sd1.yaml``) and
diffusers-layout folders. One PNG per sample (prompt, seed, sampler, steps and guidance in its
metadata) and a grid go to ``--outdir``. Runs without Lightning.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError
from ldm.diffusion import SAMPLERS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or diffusers folder")
    p.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                   help="config for checkpoints that carry none (original SD files)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--from-file", help="text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: config)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: config)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLERS)}")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta")
    p.add_argument("--seed", type=int, default=None, help="seed (default: config)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward batch")
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument("--aspect", default=None, metavar="W:H",
                   help="aspect ratio such as 3:2 (width:height): with --height or --width the "
                        "other side follows, else about the training area; sides snap to the "
                        "model's size step")
    p.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-conditioning: original image size (default: the image size)")
    p.add_argument("--crop", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                   help="SDXL micro-conditioning: crop top-left (default: 0 0)")
    p.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                   help="SDXL micro-conditioning: target size (default: the image size)")
    p.add_argument("--outdir", default="samples", help="output directory")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) U-Net weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="U-Net dtype (the autoencoder stays float32)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        from_file = [ln for ln in lines if ln and not ln.startswith("#")]
        if not from_file:
            raise ValueError(f"prompt file {path} has no prompts (one per line)")
        prompts += from_file
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --from-file FILE")
    return prompts


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "empty"


def image_size(args: argparse.Namespace, cfg: object, model: object) -> tuple[int, int]:
    """``(height, width)``: the flags, else the training size (square, or the first bucket
    area's square with ``--aspect``)."""
    data = cfg.data  # type: ignore[attr-defined]
    side = int(data.buckets.resolutions[0] if data.buckets.enabled else data.image_size)
    if args.aspect is None:
        height = args.height or side
        return height, args.width or height
    if args.height and args.width:
        raise ValueError("--aspect takes at most one of --height and --width")
    from ldm.data.buckets import parse_aspect, size_for_aspect

    levels = len(cfg.model.unet.channel_mult)  # type: ignore[attr-defined]
    step = model.downsample_factor * 2 ** (levels - 1)  # type: ignore[attr-defined]
    return size_for_aspect(parse_aspect(args.aspect), side * side, step, args.height, args.width)


def micro_conditioning_flags(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """The ``--original-size``/``--crop``/``--target-size`` values that were given.

    Raises:
        ValueError: A size that is not positive or a negative crop offset.
    """
    flags = {"original_size": args.original_size, "crop_top_left": args.crop,
             "target_size": args.target_size}
    given = {k: (int(v[0]), int(v[1])) for k, v in flags.items() if v is not None}
    for key, value in given.items():
        if min(value) < 0 or (key != "crop_top_left" and min(value) == 0):
            flag = "--crop" if key == "crop_top_left" else "--" + key.replace("_", "-")
            raise ValueError(f"{flag} {value[0]} {value[1]}: sizes must be positive and crop "
                             "offsets non-negative (pixels)")
    return given


def set_micro_conditioning(given: dict[str, tuple[int, int]], model: object) -> None:
    """Applies SDXL micro-conditioning values (:func:`micro_conditioning_flags`) to the model.

    Raises:
        ValueError: Values are given for a model without micro-conditioning.
    """
    if not given:
        return
    if not hasattr(model, "crop_top_left"):
        raise ValueError("--original-size, --crop and --target-size need an SDXL model "
                         "(this checkpoint has no size/crop micro-conditioning)")
    for key, value in given.items():
        setattr(model, key, value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.sampler is not None and args.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{args.sampler}'; choose one of "
                             f"{', '.join(SAMPLERS)}")
        prompts = read_prompts(args)
        micro = micro_conditioning_flags(args)
        from ldm import build

        model, cfg = build.load_for_sampling(args.ckpt, args.config, args.overrides,
                                             use_ema=not args.no_ema)
        s = cfg.sampling
        sampler = build.build_sampler(s, steps=args.steps, sampler=args.sampler,
                                      karras=args.karras, eta=args.eta, disable_progress=True)
        height, width = image_size(args, cfg, model)
        set_micro_conditioning(micro, model)
        model.latent_shape(1, height, width)  # validates the size before any work
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    guidance = s.guidance if args.guidance is None else args.guidance
    rescale = s.guidance_rescale if args.guidance_rescale is None else args.guidance_rescale
    negative = s.negative_prompt if args.negative_prompt is None else args.negative_prompt
    seed = s.seed if args.seed is None else args.seed
    dtype = getattr(torch, args.dtype)
    model.unet.to(args.device, dtype)
    model.autoencoder.to(args.device)
    model.text_encoder.to(args.device)

    jobs = [(p, seed + i) for p in prompts for i in range(args.n)]  # one seed per sample
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    from ldm.images import caption_grid, make_grid, save_png, to_uint8

    images: list[torch.Tensor] = []
    steps_total = len(range(0, len(jobs), args.batch_size)) * sampler.steps
    bar = tqdm(total=steps_total, desc="sampling", unit="step")
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        # Per-sample noise from per-sample seeds: a sample does not depend on its batch.
        noise = torch.cat([
            torch.randn(model.latent_shape(1, height, width),
                        generator=torch.Generator().manual_seed(sd)) for _, sd in chunk
        ])
        generator = torch.Generator(device=args.device).manual_seed(chunk[0][1])
        last = [-1]

        def tick(info: dict, last: list[int] = last) -> None:
            i = int(info.get("i", last[0] + 1))
            if i > last[0]:
                bar.update(i - last[0])
                last[0] = i

        out, _ = model.generate([p for p, _ in chunk], sampler, guidance=guidance,
                                negative_prompts=negative, guidance_rescale=rescale,
                                latents=noise, generator=generator, callback=tick)
        bar.update(max(0, sampler.steps - 1 - last[0]))
        for j, ((prompt, sd), arr) in enumerate(zip(chunk, to_uint8(out), strict=True)):
            meta = {"prompt": prompt, "negative_prompt": negative, "seed": sd,
                    "sampler": sampler.sampler, "steps": sampler.steps, "guidance": guidance,
                    "karras": sampler.karras, "checkpoint": str(args.ckpt)}
            name = f"{len(images):04d}-{slug(prompt)}-s{sd}.png"
            save_png(arr, outdir / name, {**{k: str(v) for k, v in meta.items()},
                                          "parameters": json.dumps(meta)})
            images.append(out[j : j + 1].cpu())
    bar.close()
    grid = torch.cat(images)
    nrow = args.n if args.n > 1 else min(len(grid), 4)
    grid_path = save_png(make_grid(grid, nrow=nrow), outdir / "grid.png",
                         {"captions": caption_grid([p for p, _ in jobs], nrow)})
    print(f"wrote {len(images)} images and {grid_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
