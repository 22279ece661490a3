"""LoRA files: the adapters alone, small enough to share.

Keys follow the adapted layer's name in our (= original SD) U-Net, kohya-style, one ``alpha`` per
layer::

    <layer>.lora_down.weight   (r, in)     A of Hu et al. 2021
    <layer>.lora_up.weight     (out, r)    B
    <layer>.alpha              ()          the update is scaled by alpha / r

with ``format: ldm-lora`` in the safetensors metadata. Written from a training checkpoint by
``python -m ldm.checkpoint.lora_keys --ckpt runs/x/checkpoints/last.safetensors --out a.st``
and applied by ``sample.py --lora a.safetensors[:scale]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ldm.checkpoint.format import CheckpointError, atomic_write, load_checkpoint

LORA_FORMAT = "ldm-lora"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"

#: layer -> (A: r × in, B: out × r, alpha)
Adapters = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def adapters_from_state(state: Mapping[str, torch.Tensor], alpha: float | None) -> Adapters:
    """Adapters from a LoRA'd U-Net state dict (``alpha`` None: the rank, a scale of 1)."""
    out: Adapters = {}
    for key, down in state.items():
        if key.endswith(DOWN):
            layer = key[: -len(DOWN)]
            up = state.get(layer + UP)
            if up is None:
                raise CheckpointError(f"LoRA layer {layer} has lora_down but no lora_up")
            out[layer] = (down, up, float(down.shape[0] if alpha is None else alpha))
    return out


def save_lora_file(path: str | Path, adapters: Adapters) -> Path:
    """Write adapters atomically as a LoRA safetensors file."""
    if not adapters:
        raise CheckpointError("no LoRA adapters to save (was the run trained with "
                              "model.lora.rank>0?)")
    tensors: dict[str, torch.Tensor] = {}
    for layer, (down, up, alpha) in adapters.items():
        tensors[layer + DOWN] = down.detach().float().cpu().contiguous().clone()
        tensors[layer + UP] = up.detach().float().cpu().contiguous().clone()
        tensors[layer + ALPHA] = torch.tensor(float(alpha))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": LORA_FORMAT}))
    return Path(path)


def read_lora_file(path: str | Path) -> Adapters:
    """Adapters of a LoRA file written by :func:`save_lora_file`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Not a readable LoRA file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != LORA_FORMAT:
        raise CheckpointError(f"{path} is not an ldm LoRA file (no 'format: {LORA_FORMAT}' "
                              "metadata; write one with python -m ldm.checkpoint.lora_keys)")
    adapters = adapters_from_state(tensors, None)
    for layer in adapters:
        down, up, _ = adapters[layer]
        if layer + ALPHA in tensors:
            adapters[layer] = (down, up, float(tensors[layer + ALPHA]))
    if not adapters:
        raise CheckpointError(f"{path} holds no lora_down/lora_up weights")
    return adapters


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: extract the adapters of a LoRA training checkpoint into a small LoRA file."""
    p = argparse.ArgumentParser(prog="python -m ldm.checkpoint.lora_keys",
                                description="Write the LoRA adapters of a checkpoint to a file.")
    p.add_argument("--ckpt", required=True, help="our ldm checkpoint of a model.lora run")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--no-ema", action="store_true", help="the raw adapters instead of the EMA")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt, expect_kind="ldm")
        key = "unet" if args.no_ema or not any(k.startswith("unet_ema.") for k in ckpt.tensors) \
            else "unet_ema"
        alpha = ckpt.config.get("model", {}).get("lora", {}).get("alpha")
        adapters = adapters_from_state(ckpt.module_state(key), alpha)
        path = save_lora_file(args.out, adapters)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(adapters)} adapted layers, {path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
