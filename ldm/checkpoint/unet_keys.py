"""U-Net state-dict key mapping: ours (= original Stable Diffusion) <-> diffusers.

Our U-Net uses the CompVis ``openaimodel.UNetModel`` names, so an original SD checkpoint needs
only :func:`strip_prefix` (``model.diffusion_model.``). diffusers'
``UNet2DConditionModel`` names blocks differently; the mapping between the two is written once,
as a table of ``(ours, diffusers, renames)`` module prefixes built from the U-Net's structure,
and used in both directions, so the round trip is exact. Tensors are never reshaped: SD1's 1x1
conv ``proj_in``/``proj_out`` and SD2's linear ones have the same layout in both libraries.

Also here: conversion between our ``UNetModel`` keyword arguments and a diffusers
``UNet2DConditionModel`` config, for the SD-style subset both can express.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.models.unet import UNetModel

COMPVIS_UNET_PREFIX = "model.diffusion_model."

# Sub-module renames inside a ResBlock (ours -> diffusers ResnetBlock2D).
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_Entry = tuple[str, str, "dict[str, str] | None"]  # (ours, diffusers, renames; None = same names)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = COMPVIS_UNET_PREFIX) -> dict:
    """Select the keys that start with ``prefix`` and remove it (other keys are dropped).

    Args:
        state_dict: E.g. a full CompVis SD checkpoint's ``state_dict``.
        prefix: The prefix; ``model.diffusion_model.`` for the U-Net of original SD checkpoints.

    Returns:
        The U-Net's state dict in our (= original SD) names.
    """
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _module_table(
    channel_mult: Sequence[int], num_res_blocks: int, attention_resolutions: Sequence[int]
) -> list[_Entry]:
    """Module prefixes of the U-Net in both layouts, following ``UNetModel.__init__``."""
    levels = len(channel_mult)
    table: list[_Entry] = [
        ("time_embed.0", "time_embedding.linear_1", None),
        ("time_embed.2", "time_embedding.linear_2", None),
        ("label_emb.weight", "class_embedding.weight", None),  # num_classes
        ("label_emb.0.0", "class_embedding.linear_1", None),  # adm_in_channels
        ("label_emb.0.2", "class_embedding.linear_2", None),
        ("input_blocks.0.0", "conv_in", None),
        ("middle_block.0", "mid_block.resnets.0", _RESNET),
        ("middle_block.1", "mid_block.attentions.0", None),
        ("middle_block.2", "mid_block.resnets.1", _RESNET),
        ("out.0", "conv_norm_out", None),
        ("out.2", "conv_out", None),
    ]
    block = 1
    for level in range(levels):
        for j in range(num_res_blocks):
            table.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", _RESNET))
            table.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", None))
            block += 1
        if level != levels - 1:
            down = f"down_blocks.{level}.downsamplers.0"
            table.append((f"input_blocks.{block}.0", down, {"op": "conv"}))
            block += 1
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        has_attn = 2**level in attention_resolutions
        for j in range(num_res_blocks + 1):
            table.append((f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}", _RESNET))
            if has_attn:
                table.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{j}", None))
            if level and j == num_res_blocks:
                upsampler = f"output_blocks.{block}.{2 if has_attn else 1}"
                table.append((upsampler, f"up_blocks.{up}.upsamplers.0", {"conv": "conv"}))
            block += 1
    return table


def _longest_prefix(parts: list[str], table: Mapping[str, Any]) -> tuple[str, str]:
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return head, ".".join(parts[n:])
    raise KeyError(".".join(parts))


def _convert(state_dict: Mapping[str, torch.Tensor], table: list[_Entry]) -> dict:
    lookup = {src: (dst, renames) for src, dst, renames in table}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        try:
            src, rest = _longest_prefix(key.split("."), lookup)
            dst, renames = lookup[src]
            if renames is not None:
                inner, leaf = _longest_prefix(rest.split("."), renames)
                rest = ".".join(filter(None, [renames[inner], leaf]))
        except KeyError:
            raise KeyError(f"no mapping for U-Net key {key!r}") from None
        out[".".join(filter(None, [dst, rest]))] = value
    return out


def _invert(table: list[_Entry]) -> list[_Entry]:
    return [
        (dst, src, None if renames is None else {v: k for k, v in renames.items()})
        for src, dst, renames in table
    ]


def unet_ldm_to_diffusers(
    state_dict: Mapping[str, torch.Tensor],
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Rename our (= original SD) U-Net keys to diffusers ``UNet2DConditionModel`` keys.

    Args:
        state_dict: Our U-Net state dict (no ``model.diffusion_model.`` prefix).
        channel_mult: The U-Net's ``channel_mult`` (only its length matters).
        num_res_blocks: The U-Net's ``num_res_blocks``.
        attention_resolutions: The U-Net's ``attention_resolutions``.

    Returns:
        A new dict with the same tensors under diffusers names.

    Raises:
        KeyError: A key has no diffusers counterpart (e.g. from ``resblock_updown``).
    """
    return _convert(state_dict, _module_table(channel_mult, num_res_blocks, attention_resolutions))


def unet_diffusers_to_ldm(
    state_dict: Mapping[str, torch.Tensor],
    channel_mult: Sequence[int],
    num_res_blocks: int,
    attention_resolutions: Sequence[int],
) -> dict[str, torch.Tensor]:
    """Rename diffusers ``UNet2DConditionModel`` keys to ours (= original SD); the inverse of
    :func:`unet_ldm_to_diffusers`. Arguments as there, in our terms."""
    table = _module_table(channel_mult, num_res_blocks, attention_resolutions)
    return _convert(state_dict, _invert(table))


def _unet_defaults() -> dict[str, Any]:
    params = inspect.signature(UNetModel.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def unet_kwargs_to_diffusers_config(unet_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config equivalent to ``UNetModel(**unet_kwargs)``.

    Args:
        unet_kwargs: Our constructor arguments; missing ones take ``UNetModel``'s defaults.

    Returns:
        Keyword arguments for ``diffusers.UNet2DConditionModel``.

    Raises:
        ValueError: A feature diffusers' model cannot express (``resblock_updown``,
            ``conv_resample=False``, ``context_dim=None``).
    """
    kw = {**_unet_defaults(), **unet_kwargs}
    if kw["resblock_updown"] or not kw["conv_resample"] or kw["context_dim"] is None:
        raise ValueError(
            "resblock_updown, conv_resample=False and context_dim=None have no diffusers equivalent"
        )
    widths = [kw["model_channels"] * m for m in kw["channel_mult"]]
    cross = [2**level in kw["attention_resolutions"] for level in range(len(widths))]
    heads = (
        kw["num_heads"]
        if kw["num_head_channels"] == -1
        else [w // kw["num_head_channels"] for w in widths]
    )
    depth = kw["transformer_depth"]
    config: dict[str, Any] = {
        "in_channels": kw["in_channels"],
        "out_channels": kw["out_channels"],
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "layers_per_block": kw["num_res_blocks"],
        "attention_head_dim": heads,  # diffusers' name for the number of heads
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        "cross_attention_dim": kw["context_dim"],
        "use_linear_projection": kw["use_linear_in_transformer"],
        "resnet_time_scale_shift": "scale_shift" if kw["use_scale_shift_norm"] else "default",
        "upcast_attention": kw["upcast_attention"],
        "dropout": kw["dropout"],
    }
    if kw["num_classes"] is not None:
        config["num_class_embeds"] = kw["num_classes"]
    if kw["adm_in_channels"] is not None:
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = kw["adm_in_channels"]
    return config


# Every UNet2DConditionModel (diffusers 0.42) config key that changes the function but that our
# U-Net does not implement, with the one value we reproduce. Keys mapped below (block types,
# widths, heads, depths, projections, class embeddings, upcast, scale-shift) are checked there;
# ``sample_size`` and ``dropout`` do not change sampling; ``addition_time_embed_dim`` and
# ``addition_embed_type_num_heads`` only act with an ``addition_embed_type``, which is refused.
# Keys outside diffusers' signature are ignored, as diffusers itself ignores them.
UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
    "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "addition_embed_type": None,
}


def check_diffusers_unet_config(config: Mapping[str, Any]) -> None:
    """Refuse every diffusers U-Net option that would change the function (:data:`UNET_FIXED`).

    Raises:
        ValueError: One line naming the first such key and the value we reproduce.
    """
    for key, fixed in UNET_FIXED.items():
        value = config.get(key, fixed)
        same = value == fixed or (key == "mid_block_only_cross_attention" and value is False)
        if not same:
            raise ValueError(
                f"UNet2DConditionModel option {key}={value!r} is not implemented "
                f"(ldm reproduces only {key}={fixed!r})"
            )
    width = 4 * int(config["block_out_channels"][0])
    if config.get("time_embedding_dim") not in (None, width):
        raise ValueError(
            f"UNet2DConditionModel option time_embedding_dim="
            f"{config['time_embedding_dim']!r} is not implemented (ldm reproduces "
            f"only 4 x block_out_channels[0] = {width})"
        )
    if not isinstance(config.get("cross_attention_dim", 1280), int):
        raise ValueError(
            "UNet2DConditionModel option cross_attention_dim per block "
            f"({config['cross_attention_dim']!r}) is not implemented (one int)"
        )


def unet_kwargs_from_diffusers_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``UNetModel`` keyword arguments for a diffusers ``UNet2DConditionModel`` config.

    Args:
        config: The diffusers config (e.g. ``model.config`` or a loaded ``config.json``).

    Returns:
        Keyword arguments for :class:`~ldm.models.unet.UNetModel`.

    Raises:
        ValueError: The config uses diffusers features outside the SD-style U-Net, or an option
            that changes the function and that we do not implement (:data:`UNET_FIXED`).
    """
    c = dict(config)
    check_diffusers_unet_config(c)
    widths = list(c["block_out_channels"])
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    cross = [t == "CrossAttnDownBlock2D" for t in down]
    supported = (
        all(t in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down)
        and up == ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(cross)]
        and c.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn"
        and isinstance(c.get("layers_per_block", 2), int)
        and c.get("addition_embed_type") is None
        and c.get("class_embed_type") in (None, "projection")
        and not c.get("only_cross_attention", False)
        and c.get("time_embedding_type", "positional") == "positional"
        and c.get("flip_sin_to_cos", True)
        and c.get("freq_shift", 0) == 0
        and all(w % widths[0] == 0 for w in widths)
    )
    if not supported:
        raise ValueError("diffusers config outside the Stable Diffusion U-Net family")
    heads = c.get("num_attention_heads") or c.get("attention_head_dim", 8)
    if not isinstance(heads, int) and len(set(heads)) == 1:
        heads = heads[0]  # the same head count at every level
    num_heads, num_head_channels = heads if isinstance(heads, int) else -1, -1
    if not isinstance(heads, int):
        per_head = {w // h for w, h in zip(widths, heads, strict=True)}
        if len(per_head) != 1:
            raise ValueError(f"per-level heads {heads} fit neither num_heads nor num_head_channels")
        num_head_channels = per_head.pop()
    depth = c.get("transformer_layers_per_block", 1)
    projection = c.get("class_embed_type") == "projection"
    return {
        "in_channels": c.get("in_channels", 4),
        "out_channels": c.get("out_channels", 4),
        "model_channels": widths[0],
        "channel_mult": [w // widths[0] for w in widths],
        "num_res_blocks": c.get("layers_per_block", 2),
        "attention_resolutions": [2**level for level, x in enumerate(cross) if x],
        "num_heads": num_heads,
        "num_head_channels": num_head_channels,
        "transformer_depth": depth if isinstance(depth, int) else list(depth),
        "context_dim": c.get("cross_attention_dim", 1280),
        "use_linear_in_transformer": c.get("use_linear_projection", False),
        "use_scale_shift_norm": c.get("resnet_time_scale_shift", "default") == "scale_shift",
        "dropout": c.get("dropout", 0.0),
        "num_classes": None if projection else c.get("num_class_embeds"),
        "adm_in_channels": c.get("projection_class_embeddings_input_dim") if projection else None,
        "upcast_attention": c.get("upcast_attention", False),
    }
