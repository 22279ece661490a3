"""``python -m ldm.export``: a checkpoint (ours, an original SD or SDXL file, a diffusers folder)
as a diffusers folder that ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` loads.

    python -m ldm.export --ckpt CKPT [-c cfg.yaml] --out DIR [--no-ema] [--overwrite] [k=v ...]

LoRA adapters are merged into the U-Net first; an original SD file needs its ``-c`` config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: export a checkpoint (ours, original SD or diffusers) as a diffusers folder."""
    from ldm import assemble
    from ldm.checkpoint.diffusers_layout import export_diffusers_folder
    from ldm.checkpoint.format import CheckpointError
    from ldm.config import ConfigError

    p = argparse.ArgumentParser(
        prog="python -m ldm.export",
        description="Export a checkpoint to the diffusers layout (StableDiffusionPipeline).",
    )
    p.add_argument("--ckpt", required=True, help="our .safetensors, an SD file or a folder")
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config merged over the checkpoint's (required for original SD files)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-ema", action="store_true", help="export the raw (non-EMA) U-Net")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:  # before the slow part
            raise FileExistsError(f"{out} is not empty (pass --overwrite)")
        model, cfg = assemble.load_for_sampling(
            args.ckpt, args.config, args.overrides, use_ema=not args.no_ema
        )
        from ldm.models.lora import merge_lora

        # diffusers' UNet2DConditionModel and transformers' encoders have no adapters
        merged = merge_lora(model.unet) + merge_lora(model.text_encoder)
        if merged:
            print(f"merged {merged} LoRA adapters into the U-Net and text encoder weights")
        from ldm.models.sdxl import SDXLLatentDiffusion

        if isinstance(model, SDXLLatentDiffusion):  # StableDiffusionXLPipeline's layout
            from ldm.checkpoint.sdxl_export import export_sdxl_folder

            export_sdxl_folder(model, cfg, out, overwrite=args.overwrite)
        else:
            export_diffusers_folder(model, cfg, out, overwrite=args.overwrite)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from ldm.boundary import error_boundary

    sys.exit(error_boundary(main)())
