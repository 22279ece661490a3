"""SDXL LoRA names in the diffusers/peft and kohya layouts, the checks that keep an SD 1.x/2.x
LoRA off an SDXL model (and the reverse), and diffusers' older LoRA key forms.

SDXL LoRA files adapt three parts: the U-Net, the first text encoder (CLIP ViT-L,
``CLIPTextModel``) and the second (OpenCLIP ViT-bigG as ``CLIPTextModelWithProjection``)::

    ldm        <our U-Net layer>.lora_down.weight / .lora_up.weight / .alpha
               text_encoder.text_model.<module>..., text_encoder_2.text_model.<module>...
    diffusers  unet.<diffusers module>.lora_A.weight / .lora_B.weight (SDXL U-Net names:
               label_emb.0 is add_embedding), text_encoder.…, text_encoder_2.… (its
               text_projection outside text_model.), alpha as for SD (lora_formats)
    kohya      lora_unet_<original SGM module, dots as underscores> (sd-scripts trains SDXL on
               its sdxl_original_unet, whose names are ours: input_blocks_4_1_transformer_
               blocks_0_attn1_to_q), lora_te1_text_model_… (ViT-L), lora_te2_text_model_…
               (ViT-bigG in transformers' names, sdxl_model_util.convert_sdxl_text_encoder_2_
               checkpoint); .lora_down.weight / .lora_up.weight / .alpha

kohya files of SDXL written with diffusers' U-Net names (``lora_unet_down_blocks_…``, e.g.
converted from a diffusers training run) are read as well. The refiner has the second encoder
only. Older diffusers files (``…lora.down.weight``, ``…processor.to_q_lora.up.weight``,
``…lora_linear_layer.down.weight``; text encoders ``…self_attn.to_q_lora…``), which
``load_lora_weights`` still accepts, are renamed to peft's names first (:func:`peft_names`),
as diffusers' ``convert_unet_state_dict_to_peft`` and ``DIFFUSERS_OLD_TO_PEFT`` do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.lora_formats import (
    LayerNames,
    Layout,
    adaptable_layers,
    text_layer_names,
    unet_layer_names,
)

_OLD_SUFFIX = re.compile(r"(\.|_)lora(_linear_layer)?\.(down|up)\.weight$")
_OLD_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_SGM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def sdxl_unet_layer_names(layers: Iterable[str], layout: Layout) -> dict[str, str]:
    """Our SDXL U-Net layer names -> diffusers module names (``label_emb.0`` is diffusers'
    ``add_embedding``, as `ldm.checkpoint.sdxl_keys`)."""
    out = unet_layer_names(layers, layout)
    return {
        ours: "add_embedding." + theirs[len("class_embedding.") :]
        if theirs.startswith("class_embedding.")
        else theirs
        for ours, theirs in out.items()
    }


def sdxl_layer_names(
    layers: Mapping[str, Iterable[str]], layout: Layout, kohya_unet: Iterable[str] | None = None
) -> LayerNames:
    """:class:`LayerNames` of SDXL layers given per part (``unet``, ``text_encoder``,
    ``text_encoder_2``); kohya's U-Net names are ours (``kohya_unet``: the layers, default
    ``layers["unet"]``)."""
    unet = list(layers.get("unet", ()))
    return LayerNames(
        sdxl_unet_layer_names(unet, layout),
        text_layer_names(layers.get("text_encoder", ())),
        text_layer_names(layers.get("text_encoder_2", ())),
        kohya_unet={layer: layer for layer in (unet if kohya_unet is None else kohya_unet)},
    )


def sdxl_model_layer_names(
    unet: nn.Module, layout: Layout, text_model: nn.Module | None, text_model_2: nn.Module
) -> LayerNames:
    """:class:`LayerNames` of every layer of a live SDXL U-Net and its encoders a LoRA may adapt
    (``text_model`` None: the refiner)."""
    return sdxl_layer_names(
        {
            "unet": adaptable_layers(unet),
            "text_encoder": adaptable_layers(text_model) if text_model is not None else (),
            "text_encoder_2": adaptable_layers(text_model_2),
        },
        layout,
    )


def _old_to_peft(key: str) -> str:
    match = _OLD_SUFFIX.search(key)
    if match is None:
        return key
    ab = "A" if match.group(3) == "down" else "B"
    module = key[: match.start()].replace(".processor.", ".")
    if match.group(1) == "_":  # <attn>.to_q_lora.down: the projection's name inside the key
        head, _, proj = module.rpartition(".")
        if key.startswith("text_encoder"):
            proj = _OLD_ATTN.get(proj, proj)
        elif proj == "to_out":
            proj = "to_out.0"
        module = f"{head}.{proj}"
    return f"{module}.lora_{ab}.weight"


def peft_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers LoRA's tensors with older key forms renamed to peft's (others unchanged).

    ``unet.<m>.lora.down.weight`` → ``unet.<m>.lora_A.weight``; ``…attn1.processor.to_q_lora.
    up.weight`` → ``…attn1.to_q.lora_B.weight`` (``to_out_lora`` → ``to_out.0``); text
    encoders' ``self_attn.to_q_lora`` → ``self_attn.q_proj``, ``lora_linear_layer`` → ``lora_``.
    """
    if not any(k.startswith(("unet.", "text_encoder")) for k in tensors):
        return dict(tensors)
    return {_old_to_peft(k): v for k, v in tensors.items()}


def check_family(keys: Iterable[str], fmt: str, sdxl: bool, first_encoder: bool, path: Any) -> None:
    """Refuses a LoRA file of the other model family in one line: SDXL files (kohya's
    ``lora_te1_``/``lora_te2_``/SGM U-Net names, ``text_encoder_2.``) for an SD 1.x/2.x model,
    SD 1.x/2.x kohya files (``lora_te_``) for SDXL, first-encoder adapters for the refiner.

    Args:
        keys: The file's keys (older diffusers forms already renamed).
        fmt: Its layout ("ldm", "diffusers" or "kohya").
        sdxl: Whether the model is SDXL.
        first_encoder: Whether the model has SDXL's first encoder (False: the refiner).
        path: The file, for the message.

    Raises:
        CheckpointError: The first offending key, the two families and the fix.
    """
    keys = list(keys)

    def first(*prefixes: str) -> str | None:
        return next((k for k in keys if k.startswith(prefixes)), None)

    second = "lora_te2_" if fmt == "kohya" else "text_encoder_2."
    if not sdxl:
        key = first("lora_te1_", "lora_te2_", *_SGM_UNET) if fmt == "kohya" else first(second)
        if key is not None:
            raise CheckpointError(
                f"{path}: key {key!r} is from an SDXL LoRA (two text encoders) but this model "
                "is SD 1.x/2.x with one: use it with an SDXL model (-c configs/ldm/sdxl.yaml or "
                "an SDXL folder)"
            )
        return
    if fmt == "kohya" and (key := first("lora_te_")) is not None:
        raise CheckpointError(
            f"{path}: key {key!r} is from an SD 1.x/2.x kohya LoRA (lora_te_) but this model is "
            "SDXL (its kohya files name lora_te1_/lora_te2_): use it with an SD 1.x/2.x model"
        )
    if not first_encoder:
        key = first("lora_te1_") if fmt == "kohya" else first("text_encoder.")
        if key is not None:
            raise CheckpointError(
                f"{path}: key {key!r} adapts SDXL's first text encoder (CLIP ViT-L), which the "
                "SDXL refiner does not have (only the second, OpenCLIP ViT-bigG): use it with "
                "the SDXL base"
            )
