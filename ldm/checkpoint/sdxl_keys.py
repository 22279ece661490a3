"""SDXL U-Net key and config maps: diffusers' ``UNet2DConditionModel`` with
``addition_embed_type="text_time"`` ↔ our :class:`~ldm.models.unet.UNetModel`.

SDXL's U-Net is an SD-family U-Net whose vector input ``y`` (pooled text + embedded sizes,
:mod:`ldm.models.micro_conditioning`) enters through ``label_emb``. diffusers names that MLP
``add_embedding`` and embeds the sizes inside the model (``add_time_proj``, no weights);
generative-models' single files (``model.diffusion_model.*``) use our names already, so they
need only :func:`ldm.checkpoint.unet_keys.strip_prefix`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.checkpoint.unet_keys import (
    unet_diffusers_to_ldm,
    unet_kwargs_from_diffusers_config,
    unet_kwargs_to_diffusers_config,
    unet_ldm_to_diffusers,
)
from ldm.models.micro_conditioning import SIZE_EMBED_DIM

_ADD = "add_embedding."
_CLASS = "class_embedding."


def is_sdxl_unet_config(config: Mapping[str, Any]) -> bool:
    """Whether a diffusers U-Net config is SDXL-style (``addition_embed_type="text_time"``)."""
    return config.get("addition_embed_type") == "text_time"


def sdxl_unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``UNetModel`` arguments for an SDXL-style diffusers U-Net config.

    Raises:
        ValueError: Not a ``text_time`` config, a size embedding other than 256 wide, or a
            ``class_embed_type`` beside it (diffusers would add both).
    """
    c = dict(config)
    if not is_sdxl_unet_config(c):
        raise ValueError("not an SDXL U-Net config (addition_embed_type is not 'text_time')")
    if c.get("addition_time_embed_dim") != SIZE_EMBED_DIM:
        raise ValueError(
            f"addition_time_embed_dim {c.get('addition_time_embed_dim')} is not supported "
            f"(SDXL uses {SIZE_EMBED_DIM})"
        )
    if c.get("class_embed_type") is not None or c.get("num_class_embeds") is not None:
        raise ValueError("an SDXL U-Net with a class embedding as well is not supported")
    if c.get("projection_class_embeddings_input_dim") is None:
        raise ValueError("the SDXL U-Net config lacks projection_class_embeddings_input_dim")
    c["addition_embed_type"] = None
    c["class_embed_type"] = "projection"
    return unet_kwargs_from_diffusers_config(c)


def sdxl_unet_kwargs_to_diffusers_config(unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers SDXL ``UNet2DConditionModel`` config for our SDXL ``UNetModel`` arguments
    (``adm_in_channels`` required)."""
    config = unet_kwargs_to_diffusers_config(unet_kwargs)
    if config.pop("class_embed_type", None) != "projection":
        raise ValueError("an SDXL U-Net needs adm_in_channels (pooled text + embedded sizes)")
    config.update(addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBED_DIM)
    return config


def _rename(state_dict: Mapping[str, torch.Tensor], old: str, new: str) -> dict:
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state_dict.items()}


def sdxl_unet_diffusers_to_ldm(
    state_dict: Mapping[str, torch.Tensor], unet_kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """diffusers SDXL U-Net weights → our names (``add_embedding`` → ``label_emb.0``)."""
    return unet_diffusers_to_ldm(
        _rename(state_dict, _ADD, _CLASS), unet_kwargs["channel_mult"],
        unet_kwargs["num_res_blocks"], unet_kwargs["attention_resolutions"],
    )  # fmt: skip


def sdxl_unet_ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], unet_kwargs: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Our SDXL U-Net weights → diffusers names (inverse of :func:`sdxl_unet_diffusers_to_ldm`)."""
    out = unet_ldm_to_diffusers(
        state_dict, unet_kwargs["channel_mult"], unet_kwargs["num_res_blocks"],
        unet_kwargs["attention_resolutions"],
    )  # fmt: skip
    return _rename(out, _CLASS, _ADD)
