"""``sample.py``'s command line: its flags, the prompts they give, and the checks that refuse
values that cannot work (one line naming the flag, before anything loads)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ldm.diffusion import SAMPLER_NAMES

DESCRIPTION = "Sample images from a text-to-image latent diffusion checkpoint."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file or diffusers folder")
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config for checkpoints that carry none (original SD files)",
    )
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--from-file", help="text file with one prompt per line")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: config)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: config)")
    p.add_argument("--guidance-rescale", type=float, default=None, help="guidance rescale phi")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: config)")
    p.add_argument("--sampler", default=None, help=f"one of {', '.join(SAMPLER_NAMES)}")
    p.add_argument("--karras", action="store_true", default=None, help="Karras sigmas")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta")
    p.add_argument("--seed", type=int, default=None, help="seed (default: config)")
    p.add_argument("--n", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward batch")
    p.add_argument("--height", type=int, default=None, help="image height in pixels")
    p.add_argument("--width", type=int, default=None, help="image width in pixels")
    p.add_argument(
        "--aspect",
        default=None,
        metavar="W:H",
        help="aspect ratio such as 3:2 (width:height): with --height or --width the "
        "other side follows, else about the training area; sides snap to the "
        "model's size step",
    )
    p.add_argument(
        "--init-image",
        default=None,
        metavar="PNG",
        help="img2img (SDEdit): start from this image noised to --strength; its size "
        "is the output size (a multiple of the autoencoder factor)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=0.6,
        help="img2img: fraction of --steps that run, in (0, 1]; 1 ignores the image's "
        "content, small values keep it (default 0.6)",
    )
    p.add_argument(
        "--mask",
        default=None,
        metavar="PNG",
        help="inpainting (with --init-image): white repaints, black keeps; same size "
        "as the init image (regular 4-channel U-Nets: latent blending)",
    )
    p.add_argument(
        "--original-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="SDXL micro-conditioning: original image size (default: the image size)",
    )
    p.add_argument(
        "--crop",
        type=int,
        nargs=2,
        metavar=("TOP", "LEFT"),
        default=None,
        help="SDXL micro-conditioning: crop top-left (default: 0 0)",
    )
    p.add_argument(
        "--target-size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="SDXL micro-conditioning: target size (default: the image size)",
    )
    p.add_argument(
        "--aesthetic-score",
        type=float,
        default=None,
        metavar="S",
        help="SDXL refiner: aesthetic score of the prompts (default 6.0, as diffusers)",
    )
    p.add_argument(
        "--negative-aesthetic-score",
        type=float,
        default=None,
        metavar="S",
        help="SDXL refiner: aesthetic score of the negative prompts (default 2.5)",
    )
    p.add_argument("--outdir", default="samples", help="output directory")
    p.add_argument(
        "--save-latents",
        metavar="FILE",
        default=None,
        help="also write the final latents (N, C, h, w; key 'latents', in prompt "
        "order, with their 'seeds') to this safetensors file",
    )
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) U-Net weights")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA file (ldm, diffusers/peft or kohya layout) merged into the U-Net "
        "(and text encoder) at SCALE (default 1); repeatable",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="U-Net dtype (the autoencoder stays float32)",
    )
    p.add_argument(
        "--host-memory",
        default="auto",
        choices=["auto", "keep", "default"],
        help="keep: glibc keeps freed blocks for reuse (as trainer.host_memory; an SD1 U-Net "
        "call at 512 px: ~800,000 page faults fewer, ~10%% faster); auto: keep on the CPU",
    )
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def read_prompt_file(path: str | Path) -> list[str]:
    """A prompts file: one prompt per line; blank lines and ``#`` comment lines are skipped.

    Raises:
        FileNotFoundError: No such file.
        ValueError: A file without a prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (one per line)")
    return prompts


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.from_file:
        prompts += read_prompt_file(args.from_file)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --from-file FILE")
    return prompts


#: Largest image side accepted (8x SDXL's 1024; beyond it the latents alone need many GB).
MAX_SIDE = 8192
#: Seeds must fit torch's generator (a signed 64-bit seed), one per sample.
MAX_SEED = 2**63 - 1


def check_args(args: argparse.Namespace, prompts: list[str]) -> None:
    """Refuse flag values that cannot work, in one line naming the flag, before any loading.

    Raises:
        UsageError: A count below 1, a size outside 1..MAX_SIDE, a seed out of range, a
            non-finite number, an unknown device, a blank prompt or an --outdir that is a file.
    """
    import math

    from ldm.boundary import UsageError

    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not 1 <= value <= MAX_SIDE:
            raise UsageError(f"{flag} must be between 1 and {MAX_SIDE} pixels, got {value}")
    for flag, number in (
        ("--guidance", args.guidance),
        ("--guidance-rescale", args.guidance_rescale),
        ("--eta", args.eta),
    ):
        if number is not None and not math.isfinite(number):
            raise UsageError(f"{flag} must be a finite number, got {number}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED - args.n * len(prompts):
        raise UsageError(
            f"--seed must be between 0 and 2**63 - 1 minus the number of samples, got {args.seed}"
        )
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise UsageError(
                f"prompt {i + 1} is blank: give it text (--prompt TEXT); for an "
                "unguided sample use --guidance 1"
            )
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(
            f"--device {args.device!r} is not a device: use cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"--outdir {outdir} is a file, not a folder: name a folder")
