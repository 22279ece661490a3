"""LoRA files merged at sampling (``sample.py --lora path[:scale]``): any layout
``ldm.checkpoint.lora_keys.read_lora`` reads (ldm, diffusers/peft, kohya; SD 1.x/2.x or SDXL),
folded into the U-Net and text encoder weights, W ← W + scale · (α/r) · B A (Hu et al. 2021)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from ldm.checkpoint.format import CheckpointError

log = logging.getLogger(__name__)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``path[:scale]`` → (path, scale); the scale defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def lora_targets(model: nn.Module) -> dict[str, nn.Module | None]:
    """The modules LoRA files adapt, by part: the U-Net, the text encoder's transformers model
    (None if it has none) and, for SDXL, both encoders (``text_encoder`` None on the refiner)."""
    encoder = getattr(model, "text_encoder", None)
    if hasattr(encoder, "text_encoder_2"):  # SDXLConditioner
        return {"unet": model.unet, "text_encoder": encoder.text_encoder,
                "text_encoder_2": encoder.text_encoder_2}  # fmt: skip
    text = getattr(encoder, "model", None)
    text = text if isinstance(text, nn.Module) and hasattr(text, "config") else None
    return {"unet": model.unet, "text_encoder": text}


def apply_lora_files(model: nn.Module, unet_cfg: Any, specs: list[str]) -> None:
    """Merge each ``path[:scale]`` LoRA file (ldm, diffusers/peft or kohya layout, told apart by
    its keys; SD 1.x/2.x or SDXL) into the model's U-Net and text encoder weights, in order
    (files add up).

    Args:
        model: A ``LatentDiffusion``.
        unet_cfg: Its ``model.unet`` config section (the U-Net layout names layers).
        specs: ``path[:scale]`` strings (``sample.py --lora``).

    Raises:
        FileNotFoundError, CheckpointError: A missing or unreadable file, or adapters that do not
            fit the model (named with the file and key).
    """
    from ldm.checkpoint.lora_keys import read_lora, unet_layout
    from ldm.models.lora import merge_adapters

    modules = lora_targets(model)
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        parts = read_lora(path, modules["unet"], unet_layout(unet_cfg), modules["text_encoder"],
                          modules.get("text_encoder_2"))  # fmt: skip
        try:
            for part, adapters in parts.items():
                merge_adapters(modules[part], adapters, scale)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        counts = ", ".join(f"{len(a)} {part} layers" for part, a in parts.items())
        log.warning("LoRA %s merged at scale %g (%s)", path, scale, counts)


__all__ = ["apply_lora_files", "lora_targets", "parse_lora_spec"]
