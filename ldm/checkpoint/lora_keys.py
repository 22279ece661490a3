"""LoRA files: the adapters alone, small enough to share, in ours, diffusers' or kohya's layout.

Our layout (``format: ldm-lora`` in the safetensors metadata) follows the adapted layer's name
in our (= original SD) U-Net, one ``alpha`` per layer::

    <layer>.lora_down.weight   (r, in)     A of Hu et al. 2021
    <layer>.lora_up.weight     (out, r)    B
    <layer>.alpha              ()          the update is scaled by alpha / r

text-encoder adapters under ``text_encoder.text_model.<module>`` (SDXL's second encoder under
``text_encoder_2.``). The diffusers/peft layout (``pipe.load_lora_weights``) and kohya's
(``lora_unet_…``) are described in `ldm.checkpoint.lora_formats` (SDXL's names in
`ldm.checkpoint.lora_sdxl`); :func:`read_lora` tells the three apart by their keys. Written
from a training checkpoint (SD 1.x/2.x or SDXL; an SDXL run gets SDXL's names) by::

    python -m ldm.checkpoint.lora_keys --ckpt runs/x/checkpoints/last.safetensors --out a.st \\
        [--format ldm|diffusers|kohya]

and applied by ``sample.py --lora a.safetensors[:scale]`` (any of the three).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ldm.checkpoint.format import CheckpointError, atomic_write, load_checkpoint
from ldm.checkpoint.lora_formats import (
    FORMATS,
    Adapters,
    FileKeys,
    LayerNames,
    Layout,
    LoRAParts,
    adaptable_layers,
    detect_format,
    from_diffusers,
    from_kohya,
    model_layer_names,
    text_layer_names,
    to_diffusers,
    to_kohya,
    unet_layer_names,
    unmatched_error,
)
from ldm.checkpoint.lora_sdxl import (
    check_family,
    peft_names,
    sdxl_layer_names,
    sdxl_model_layer_names,
)

LORA_FORMAT = "ldm-lora"
DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
TEXT_ENCODER = "text_encoder."
#: our file's prefix of each text-encoder part
TEXT_PREFIXES = {"text_encoder": TEXT_ENCODER, "text_encoder_2": "text_encoder_2."}


def adapters_from_state(state: Mapping[str, torch.Tensor], alpha: float | None) -> Adapters:
    """Adapters from a LoRA'd module's state dict (``alpha`` None: the rank, a scale of 1)."""
    out: Adapters = {}
    for key, down in state.items():
        if key.endswith(DOWN):
            layer = key[: -len(DOWN)]
            up = state.get(layer + UP)
            if up is None:
                raise CheckpointError(f"LoRA layer {layer} has lora_down but no lora_up")
            out[layer] = (down, up, float(down.shape[0] if alpha is None else alpha))
    return out


def unet_layout(unet_cfg: Any) -> Layout:
    """``(channel_mult, num_res_blocks, attention_resolutions)`` of a ``model.unet`` section."""
    return (
        list(unet_cfg["channel_mult"]),
        int(unet_cfg["num_res_blocks"]),
        list(unet_cfg["attention_resolutions"]),
    )


def _to_ldm(parts: LoRAParts) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    for part, adapters in parts.items():
        canonical = text_layer_names(adapters) if part in TEXT_PREFIXES else {}
        for layer, (down, up, alpha) in adapters.items():
            key = TEXT_PREFIXES[part] + canonical[layer] if canonical else layer
            tensors[key + DOWN], tensors[key + UP] = down.float(), up.float()
            tensors[key + ALPHA] = torch.tensor(float(alpha))
    return tensors, {"format": LORA_FORMAT}


def write_lora(
    path: str | Path,
    parts: LoRAParts,
    fmt: str = "ldm",
    layout: Layout | None = None,
    sdxl: bool = False,
) -> Path:
    """Write adapters atomically as a LoRA safetensors file in layout ``fmt``.

    Args:
        path: Output file.
        parts: ``{"unet": adapters, "text_encoder": adapters}`` (SDXL: and
            ``"text_encoder_2"``) under our layer names.
        fmt: "ldm", "diffusers" or "kohya".
        layout: The U-Net's layout (needed for diffusers and kohya names).
        sdxl: The adapters are SDXL's (diffusers' SDXL U-Net names; kohya's SGM U-Net names
            and ``lora_te1_``/``lora_te2_``).

    Raises:
        CheckpointError: No adapters, or a layer the format cannot name.
    """
    parts = {part: adapters for part, adapters in parts.items() if adapters}
    if not parts:
        raise CheckpointError(
            "no LoRA adapters to save (was the run trained with model.lora.rank>0?)"
        )
    parts = {
        part: {
            layer: (d.detach().cpu().contiguous(), u.detach().cpu().contiguous(), a)
            for layer, (d, u, a) in adapters.items()
        }
        for part, adapters in parts.items()
    }
    if fmt == "ldm":
        tensors, meta = _to_ldm(parts)
    else:
        if layout is None:
            raise ValueError(f"the {fmt} format needs the U-Net layout")
        if sdxl:
            names = sdxl_layer_names(parts, layout)
        else:
            if "text_encoder_2" in parts:
                raise CheckpointError("text_encoder_2 adapters need sdxl=True (SDXL names)")
            names = LayerNames(
                unet_layer_names(parts.get("unet", {}), layout),
                text_layer_names(parts.get("text_encoder", {})),
            )
        writer = {"diffusers": to_diffusers, "kohya": to_kohya}[fmt]
        tensors, meta = writer(parts, names)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def _from_ldm(
    tensors: Mapping[str, torch.Tensor], names: LayerNames, path: Path
) -> tuple[LoRAParts, FileKeys]:
    text_inverse = {
        part: {theirs: ours for ours, theirs in names.part(part).items()} for part in TEXT_PREFIXES
    }
    grouped: dict[str, dict[str, torch.Tensor]] = {"unet": {}, **{p: {} for p in TEXT_PREFIXES}}
    keys: FileKeys = {}
    unmatched: list[tuple[str, str]] = []
    for key, value in tensors.items():
        if not key.endswith((DOWN, UP, ALPHA)):
            raise CheckpointError(
                f"{path}: key {key!r} is not a LoRA weight (expected "
                "<layer>.lora_down.weight / .lora_up.weight / .alpha)"
            )
        suffix = next(s for s in (DOWN, UP, ALPHA) if key.endswith(s))
        layer, part = key[: -len(suffix)], "unet"
        for text_part, prefix in TEXT_PREFIXES.items():
            if layer.startswith(prefix):
                part = text_part
                layer = text_inverse[part].get(layer[len(prefix) :], "\0")
        if layer not in names.part(part):
            unmatched.append((key, part))
            continue
        grouped[part][layer + suffix] = value
        keys.setdefault((part, layer), key)
    if unmatched:
        raise unmatched_error(path, unmatched, names.sdxl)
    parts: LoRAParts = {}
    for part, state in grouped.items():
        adapters = adapters_from_state(state, None)
        for layer, (down, up, _) in adapters.items():
            if layer + ALPHA in state:
                adapters[layer] = (down, up, float(state[layer + ALPHA]))
        if adapters:
            parts[part] = adapters
    return parts, keys


def check_shapes(
    parts: LoRAParts, modules: Mapping[str, nn.Module], keys: FileKeys, path: Any
) -> None:
    """Each adapter fits its layer: ``A`` takes the layer's input, ``B`` gives its output.

    Raises:
        CheckpointError: A mismatch, naming the file, its key, the layer and the shapes.
    """
    for part, adapters in parts.items():
        for layer, (down, up, _) in adapters.items():
            target = modules[part].get_submodule(layer)
            weight = target.weight
            ok = (
                down.shape[1] == weight.shape[1]
                and up.shape[0] == weight.shape[0]
                and up.shape[1] == down.shape[0]
                and all(s == 1 for s in (*down.shape[2:], *up.shape[2:]))
                and down.dim() == up.dim() == weight.dim()
            )
            if not ok:
                raise CheckpointError(
                    f"{path}: key {keys[part, layer]!r} ({part} layer {layer}): lora_down "
                    f"{tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit its weight "
                    f"{tuple(weight.shape)} (a LoRA for another base model?)"
                )


def read_lora(
    path: str | Path,
    unet: nn.Module,
    layout: Layout,
    text_model: nn.Module | None = None,
    text_model_2: nn.Module | None = None,
) -> LoRAParts:
    """The adapters of a LoRA file in any of the three layouts, under our layer names, checked
    against the model they will be merged into.

    Args:
        path: A ``.safetensors`` LoRA file (ldm, diffusers/peft or kohya layout).
        unet: Our U-Net.
        layout: Its layout (:func:`unet_layout`).
        text_model: The text encoder's transformers model (None: no text-encoder adapters;
            SDXL: the first encoder, None for the refiner).
        text_model_2: SDXL's second encoder (not None: the model is SDXL).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: An unreadable file, an unknown key, a layer the model lacks or a shape
            that does not fit, in one line naming the file and the key.
    """
    path = Path(path)
    tensors, meta = _read_tensors(path)
    tensors = peft_names(tensors)
    fmt = detect_format(tensors, meta, path)
    sdxl = text_model_2 is not None
    check_family(tensors, fmt, sdxl, text_model is not None, path)
    if sdxl:
        names = sdxl_model_layer_names(unet, layout, text_model, text_model_2)
    else:
        names = model_layer_names(unet, layout, text_model)
    if fmt == "ldm":
        ours = {layer: layer for layer in adaptable_layers(unet)}
        parts, keys = _from_ldm(tensors, dataclasses.replace(names, unet=ours), path)
    elif fmt == "kohya":
        parts, keys = from_kohya(tensors, names, path)
    else:
        parts, keys = from_diffusers(tensors, meta, names, path)
    if not parts:
        raise CheckpointError(f"{path} holds no lora_down/lora_up weights")
    modules = {"unet": unet, "text_encoder": text_model, "text_encoder_2": text_model_2}
    check_shapes(parts, modules, keys, path)
    return parts


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: extract the adapters of a LoRA training checkpoint into a small LoRA file."""
    p = argparse.ArgumentParser(
        prog="python -m ldm.checkpoint.lora_keys",
        description="Write the LoRA adapters of a checkpoint to a file.",
    )
    p.add_argument("--ckpt", required=True, help="our ldm checkpoint of a model.lora run")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument(
        "--format",
        default="ldm",
        choices=FORMATS,
        help="ldm (ours), diffusers (pipe.load_lora_weights) or kohya (lora_unet_…)",
    )
    p.add_argument("--no-ema", action="store_true", help="the raw adapters instead of the EMA")
    args = p.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.ckpt, expect_kind="ldm")
        key = (
            "unet"
            if args.no_ema or not any(k.startswith("unet_ema.") for k in ckpt.tensors)
            else "unet_ema"
        )
        model_cfg = ckpt.config.get("model", {})
        alpha = model_cfg.get("lora", {}).get("alpha")
        sdxl = model_cfg.get("text_encoder", {}).get("kind") == "sdxl"
        # names inside the text encoders' transformers models (SD: the encoder's ``model.``;
        # SDXL: the conditioner's ``text_encoder.`` and ``text_encoder_2.``)
        encoders = ({"text_encoder": "text_encoder.text_encoder",
                     "text_encoder_2": "text_encoder.text_encoder_2"}
                    if sdxl else {"text_encoder": "text_encoder.model"})  # fmt: skip
        parts = {"unet": adapters_from_state(ckpt.module_state(key), alpha)}
        for part, prefix in encoders.items():
            parts[part] = adapters_from_state(ckpt.module_state(prefix), alpha)
        layout = unet_layout(model_cfg["unet"]) if args.format != "ldm" else None
        path = write_lora(args.out, parts, args.format, layout, sdxl=sdxl)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{len(a)} {part} layers" for part, a in parts.items() if a)
    print(f"wrote {path} ({args.format} format, {counts}, {path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
