#!/usr/bin/env python
"""Sample images from a text-to-image latent diffusion checkpoint.

    python sample.py --ckpt runs/demo-ldm/checkpoints/last.safetensors \\
        --prompt "a small red circle at the top left" --n 4 --guidance 5 --steps 30

``--ckpt`` takes our checkpoints, original Stable Diffusion 1.x/2.x single files
(``.safetensors`` / ``.ckpt``; give their config with ``-c configs/ldm/sd1.yaml``) and
diffusers-layout folders. One PNG per sample (prompt, seed, sampler, steps and guidance in its
metadata) and a grid go to ``--outdir``. ``--init-image x.png --strength 0.6`` samples img2img
(SDEdit); add ``--mask m.png`` to inpaint (white repaints); each sample then draws its init
image's posterior, its noise and its masked image's posterior from its own generator, in
diffusers' pipelines' order. Runs without Lightning.

Each sample has its own seed (``--seed`` + its index) and its own noise stream: its initial
latent noise, then its sampler's noise, come from ``torch.Generator().manual_seed(seed)``, as
diffusers' pipelines draw them from ``generator=[torch.Generator().manual_seed(s) for s in
seeds]``; a sample depends only on its seed, whatever ``--batch-size``. ``--save-latents F``
writes the final latents (before decoding) to a safetensors file. The run prints one line
saying which settings came from the checkpoint or folder, from ``-c`` files and from overrides
(overrides win over ``-c`` files, which win over the checkpoint's or folder's own values).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from ldm.boundary import error_boundary
from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError
from ldm.console import Counter
from ldm.diffusion import SAMPLER_NAMES
from ldm.sample_args import check_args, parse_args, read_prompts


def read_init_image(path: str, flag: str = "--init-image") -> torch.Tensor:
    """``--init-image`` (or ``--mask``) as (1, 3, H, W) in [-1, 1] (one-line errors for a
    missing or non-image file)."""
    from PIL import UnidentifiedImageError

    from ldm.images import load_image

    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} not found: {path}")
    try:
        return load_image(path)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(
            f"{flag} {path} is not a readable image ({type(e).__name__}); pass a PNG or JPEG"
        ) from None


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


def micro_conditioning_flags(args: argparse.Namespace) -> dict[str, tuple[int, int] | float]:
    """The ``--original-size``/``--crop``/``--target-size`` (and the refiner's
    ``--aesthetic-score``/``--negative-aesthetic-score``) values that were given.

    Raises:
        ValueError: A size that is not positive, a negative crop offset, a non-finite score.
    """
    import math

    scores = {
        "aesthetic_score": args.aesthetic_score,
        "negative_aesthetic_score": args.negative_aesthetic_score,
    }
    for key, score in scores.items():
        if score is not None and not math.isfinite(score):
            raise ValueError(f"--{key.replace('_', '-')} must be a finite number, got {score}")
    flags = {
        "original_size": args.original_size,
        "crop_top_left": args.crop,
        "target_size": args.target_size,
    }
    given = {k: (int(v[0]), int(v[1])) for k, v in flags.items() if v is not None}
    for key, value in given.items():
        if min(value) < 0 or (key != "crop_top_left" and min(value) == 0):
            flag = "--crop" if key == "crop_top_left" else "--" + key.replace("_", "-")
            raise ValueError(
                f"{flag} {value[0]} {value[1]}: sizes must be positive and crop "
                "offsets non-negative (pixels)"
            )
    return {**given, **{k: float(v) for k, v in scores.items() if v is not None}}


def set_micro_conditioning(given: dict[str, tuple[int, int] | float], model: object) -> None:
    """Applies SDXL micro-conditioning values (:func:`micro_conditioning_flags`) to the model.

    Raises:
        ValueError: Values are given for a model without micro-conditioning.
    """
    if not given:
        return
    if not hasattr(model, "crop_top_left"):
        raise ValueError(
            "--original-size, --crop, --target-size and --aesthetic-score need an "
            "SDXL model "
            "(this checkpoint has no size/crop micro-conditioning)"
        )
    if "target_size" in given and getattr(model, "is_refiner", False):
        raise ValueError(
            "--target-size: the SDXL refiner conditions on --aesthetic-score "
            "instead of a target size"
        )
    if any("aesthetic" in k for k in given) and not getattr(model, "is_refiner", False):
        raise ValueError(
            "--aesthetic-score and --negative-aesthetic-score need an SDXL refiner "
            "(a U-Net taking five numbers: original size, crop, score)"
        )
    for key, value in given.items():
        setattr(model, key, value)


@error_boundary
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.sampler is not None and args.sampler not in SAMPLER_NAMES:
            raise ValueError(
                f"unknown sampler '{args.sampler}'; choose one of {', '.join(SAMPLER_NAMES)}"
            )
        prompts = read_prompts(args)
        check_args(args, prompts)
        micro = micro_conditioning_flags(args)
        from ldm import assemble, build
        from ldm.nn.host_memory import apply_host_memory

        apply_host_memory(args.host_memory, on_cpu=torch.device(args.device).type == "cpu")

        model, cfg = assemble.load_for_sampling(
            args.ckpt, args.config, args.overrides, use_ema=not args.no_ema
        )
        if args.lora:
            from ldm.lora_files import apply_lora_files

            apply_lora_files(model, cfg.model.unet, args.lora)
        s = cfg.sampling
        sampler = build.build_sampler(
            s,
            steps=args.steps,
            sampler=args.sampler,
            karras=args.karras,
            eta=args.eta,
            disable_progress=True,
        )
        height, width = image_size(args, cfg, model)
        init = None
        if args.init_image is not None:
            from ldm.models.image_to_image import img2img_sigmas

            init = read_init_image(args.init_image)
            height, width = init.shape[-2:]
            img2img_sigmas(torch.zeros(sampler.steps + 1), sampler.steps, args.strength)
        mask = None
        if args.mask is not None:
            if init is None:
                raise ValueError("--mask needs --init-image (the image to inpaint)")
            from ldm.models.image_to_image import latent_mask

            pixels = read_init_image(args.mask, "--mask")[:, :1] * 0.5 + 0.5  # (1, 1, H, W)
            if pixels.shape[-2:] != init.shape[-2:]:
                raise ValueError(
                    f"--mask is {pixels.shape[-1]}x{pixels.shape[-2]} but "
                    f"--init-image is {init.shape[-1]}x{init.shape[-2]}; "
                    "give a mask of the image's size"
                )
            mask = latent_mask(pixels, model.downsample_factor)
        inpainting_unet = model.unet_in_channels == model.latent_channels + 5
        if inpainting_unet and mask is None:
            raise ValueError(
                "this is an SD inpainting U-Net (9 input channels): pass --init-image and --mask"
            )
        set_micro_conditioning(micro, model)
        model.latent_shape(1, height, width)  # validates the size before any work
        sampler.grid(model.schedule)  # validates the grid (e.g. Karras for a sampler without)
        from ldm.config_sources import config_sources

        print(config_sources(args.ckpt, cfg, args.config, args.overrides))
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
    latents: list[torch.Tensor] = []
    steps_total = len(range(0, len(jobs), args.batch_size)) * sampler.steps
    bar = Counter(steps_total, "sampling", unit="step")
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start : start + args.batch_size]
        # One noise stream per sample (CPU, device independent): initial noise, then the
        # sampler's; a sample does not depend on its batch.
        generators = [torch.Generator().manual_seed(sd) for _, sd in chunk]
        init_latents = noise = masked = None
        if init is not None:  # diffusers' per-sample draws: image posterior, noise, masked image
            init_latents, noise, masked = model.image_inputs(
                init.to(args.device),
                generators,
                args.strength,
                None if mask is None else (pixels < 0.5).to(args.device),
            )
        last = [-1]

        def tick(info: dict, last: list[int] = last) -> None:
            i = int(info.get("i", last[0] + 1))
            if i > last[0]:
                bar.update(i - last[0])
                last[0] = i

        out, z = model.generate(
            [p for p, _ in chunk],
            sampler,
            guidance=guidance,
            negative_prompts=negative,
            guidance_rescale=rescale,
            height=height,
            width=width,
            generator=generators,
            callback=tick,
            latents=noise,
            init_latents=init_latents,
            strength=args.strength,
            mask=None if mask is None else mask.expand(len(chunk), -1, -1, -1),
            masked_latents=masked,
        )
        latents.append(z.float().cpu())
        bar.update(max(0, sampler.steps - 1 - last[0]))
        for j, ((prompt, sd), arr) in enumerate(zip(chunk, to_uint8(out), strict=True)):
            meta = {
                "prompt": prompt,
                "negative_prompt": negative,
                "seed": sd,
                **(
                    {"init_image": args.init_image, "strength": args.strength}
                    if init is not None
                    else {}
                ),
                **({"mask": args.mask} if mask is not None else {}),
                "sampler": sampler.sampler,
                "steps": sampler.steps,
                "guidance": guidance,
                "karras": sampler.karras,
                "eta": sampler.eta,
                "timestep_spacing": sampler.timestep_spacing,
                "grid": sampler.grid_kind,
                "guidance_rescale": rescale,
                "checkpoint": str(args.ckpt),
            }
            name = f"{len(images):04d}-{slug(prompt)}-s{sd}.png"
            save_png(
                arr,
                outdir / name,
                {**{k: str(v) for k, v in meta.items()}, "parameters": json.dumps(meta)},
            )
            images.append(out[j : j + 1].cpu())
    bar.close()
    grid = torch.cat(images)
    nrow = args.n if args.n > 1 else min(len(grid), 4)
    grid_path = save_png(
        make_grid(grid, nrow=nrow),
        outdir / "grid.png",
        {"captions": caption_grid([p for p, _ in jobs], nrow)},
    )
    if args.save_latents:
        from safetensors.torch import save_file

        from ldm.checkpoint.format import atomic_write

        tensors = {
            "latents": torch.cat(latents).contiguous(),
            "seeds": torch.tensor([sd for _, sd in jobs]),
        }
        atomic_write(
            args.save_latents,
            lambda tmp: save_file(
                tensors, tmp, metadata={"prompts": json.dumps([p for p, _ in jobs])}
            ),
        )
        print(f"wrote latents to {args.save_latents}")
    print(f"wrote {len(images)} images and {grid_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
