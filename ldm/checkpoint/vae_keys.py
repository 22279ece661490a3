"""State-dict key mapping between our autoencoder (= original Stable Diffusion layout) and
diffusers' ``AutoencoderKL``.

The mapping is written once as a table of prefix rules (:data:`_RULES`) read in either direction:

- ResNet blocks: ``encoder.down.I.block.J`` <-> ``encoder.down_blocks.I.resnets.J``,
  ``nin_shortcut`` <-> ``conv_shortcut``; ``mid.block_1/2`` <-> ``mid_block.resnets.0/1``.
- Attention: ``mid.attn_1.{norm,q,k,v,proj_out}`` (1x1 convs, 4-D weights) <->
  ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` (linears, 2-D weights);
  likewise per-level attention ``down.I.attn.J`` <-> ``down_blocks.I.attentions.J``.
- Decoder levels are reversed: our ``decoder.up.0`` is the HIGHEST resolution, diffusers'
  ``decoder.up_blocks.0`` the LOWEST.
- ``scale_factor`` is a buffer in our state dict but a config value (``scaling_factor``) in
  diffusers: it is dropped on the way out and may be given on the way in.

Unknown keys raise ``KeyError`` instead of being passed through silently.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "strip_first_stage_prefix",
    "vae_config_diffusers_to_ldm",
    "vae_config_ldm_to_diffusers",
    "vae_diffusers_to_ldm",
    "vae_ldm_to_diffusers",
]

_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_LEGACY = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # old diffusers
_PLAIN: dict[str, str] = {"": ""}

# (ours, diffusers, sub-module table, reverse level index?) ; {p} = encoder|decoder.
_RULES: list[tuple[str, str, dict[str, str], bool]] = [
    ("{p}.conv_in.", "{p}.conv_in.", _PLAIN, False),
    ("{p}.conv_out.", "{p}.conv_out.", _PLAIN, False),
    ("{p}.norm_out.", "{p}.conv_norm_out.", _PLAIN, False),
    ("quant_conv.", "quant_conv.", _PLAIN, False),
    ("post_quant_conv.", "post_quant_conv.", _PLAIN, False),
    ("{p}.mid.block_1.", "{p}.mid_block.resnets.0.", _RESNET, False),
    ("{p}.mid.block_2.", "{p}.mid_block.resnets.1.", _RESNET, False),
    ("{p}.mid.attn_1.", "{p}.mid_block.attentions.0.", _ATTN, False),
    ("encoder.down.{i}.block.{j}.", "encoder.down_blocks.{i}.resnets.{j}.", _RESNET, False),
    ("encoder.down.{i}.attn.{j}.", "encoder.down_blocks.{i}.attentions.{j}.", _ATTN, False),
    (
        "encoder.down.{i}.downsample.conv.",
        "encoder.down_blocks.{i}.downsamplers.0.conv.",
        _PLAIN,
        False,
    ),
    ("decoder.up.{i}.block.{j}.", "decoder.up_blocks.{i}.resnets.{j}.", _RESNET, True),
    ("decoder.up.{i}.attn.{j}.", "decoder.up_blocks.{i}.attentions.{j}.", _ATTN, True),
    ("decoder.up.{i}.upsample.conv.", "decoder.up_blocks.{i}.upsamplers.0.conv.", _PLAIN, True),
]
_GROUPS = {"p": r"(?P<p>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)"}


def _compile(template: str) -> re.Pattern[str]:
    """Regex for a rule template: the prefix, then ``module.param`` as the rest."""
    parts = re.split(r"(\{[pij]\})", template)
    body = "".join(_GROUPS[p[1]] if p in ("{p}", "{i}", "{j}") else re.escape(p) for p in parts)
    return re.compile("^" + body + r"(?P<rest>.+)$")


_COMPILED = [(_compile(ours), _compile(theirs)) for ours, theirs, _, _ in _RULES]


def _num_up_levels(keys: list[str], to_diffusers: bool) -> int:
    """Number of decoder levels, from the largest ``up`` index among the keys."""
    indices = [
        int(m["i"])
        for (ours, theirs), (_, _, _, flip) in zip(_COMPILED, _RULES, strict=True)
        if flip
        for k in keys
        if (m := (ours if to_diffusers else theirs).match(k))
    ]
    return max(indices, default=-1) + 1


def _lookup(table: dict[str, str], to_diffusers: bool) -> dict[str, str]:
    """Sub-module name table for one direction (diffusers -> ours also takes legacy names)."""
    if to_diffusers:
        return table
    inverse = {v: k for k, v in table.items()}
    return {**inverse, **_ATTN_LEGACY} if table is _ATTN else inverse


def _map_key(key: str, value: Tensor, to_diffusers: bool, num_up: int) -> tuple[str, Tensor]:
    """Translate one key (and reshape attention projections) in the given direction."""
    for (ours_re, theirs_re), (ours, theirs, table, flip) in zip(_COMPILED, _RULES, strict=True):
        m = (ours_re if to_diffusers else theirs_re).match(key)
        if m is None:
            continue
        groups = {g: m[g] for g in ("p", "i", "j") if m.groupdict().get(g) is not None}
        if flip:  # up.I <-> up_blocks.(n-1-I): the map is its own inverse
            groups["i"] = str(num_up - 1 - int(groups["i"]))
        module, _, param = m["rest"].rpartition(".")
        new_module = _lookup(table, to_diffusers).get(module)
        if new_module is None or param not in ("weight", "bias"):
            raise KeyError(f"unknown autoencoder key {key!r}")
        prefix = (theirs if to_diffusers else ours).format(**groups)
        new_key = prefix + (f"{new_module}.{param}" if new_module else param)
        our_module = module if to_diffusers else new_module
        if table is _ATTN and param == "weight" and our_module != "norm":
            # 1x1 conv (C, C, 1, 1) <-> linear (C, C)
            if to_diffusers and value.ndim == 4:
                value = value[:, :, 0, 0]
            elif not to_diffusers and value.ndim == 2:
                value = value[:, :, None, None]
        return new_key, value
    raise KeyError(f"unknown autoencoder key {key!r}")


def _convert(state_dict: Mapping[str, Tensor], to_diffusers: bool) -> dict[str, Tensor]:
    keys = list(state_dict)
    num_up = _num_up_levels(keys, to_diffusers)
    return dict(_map_key(k, state_dict[k], to_diffusers, num_up) for k in keys)


def vae_ldm_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our / original-SD autoencoder state dict -> diffusers ``AutoencoderKL`` state dict.

    Args:
        state_dict: Keys as in :class:`ldm.models.autoencoder.AutoencoderKL` (no prefix). A
            ``scale_factor`` entry is dropped (diffusers keeps it as ``config.scaling_factor``).

    Returns:
        A new dict loadable with ``strict=True`` into diffusers' ``AutoencoderKL``.

    Raises:
        KeyError: For a key outside the autoencoder layout.
    """
    return _convert({k: v for k, v in state_dict.items() if k != "scale_factor"}, True)


def vae_diffusers_to_ldm(
    state_dict: Mapping[str, Tensor], scale_factor: float | Tensor | None = None
) -> dict[str, Tensor]:
    """Diffusers ``AutoencoderKL`` state dict -> our / original-SD layout (exact inverse of
    :func:`vae_ldm_to_diffusers`; old diffusers names ``query/key/value/proj_attn`` also accepted).

    Args:
        state_dict: A diffusers ``AutoencoderKL`` state dict.
        scale_factor: If given, stored as the ``scale_factor`` buffer (diffusers'
            ``config.scaling_factor``), so that the result loads with ``strict=True``.

    Returns:
        A new dict in our layout.

    Raises:
        KeyError: For a key outside the diffusers autoencoder layout.
    """
    out = _convert(state_dict, False)
    if scale_factor is not None:
        out["scale_factor"] = torch.as_tensor(scale_factor, dtype=torch.float32).clone()
    return out


def strip_first_stage_prefix(
    state_dict: Mapping[str, Tensor],
    prefix: str = "first_stage_model.",
    scale_factor: float | Tensor | None = None,
) -> dict[str, Tensor]:
    """The autoencoder part of an original latent-diffusion checkpoint, without its prefix.

    If no key starts with ``prefix`` the dict is taken as a stand-alone VAE checkpoint: its
    training-loss entries (``loss.*``, saved by CompVis' VAE trainer) are dropped.

    Args:
        state_dict: A CompVis/SD checkpoint's ``state_dict``.
        prefix: Prefix of the autoencoder's keys.
        scale_factor: Value for our ``scale_factor`` buffer when the checkpoint has none (SD v1/v2
            keep it in the YAML, e.g. 0.18215; a top-level ``scale_factor`` tensor is used if
            present and this is None).

    Returns:
        A new dict that loads into :class:`~ldm.models.autoencoder.AutoencoderKL` with
        ``strict=True`` (provided the scale factor was found or given).
    """
    if any(k.startswith(prefix) for k in state_dict):
        out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    else:
        out = {k: v for k, v in state_dict.items() if not k.startswith("loss.")}
    if scale_factor is not None:
        out["scale_factor"] = torch.as_tensor(scale_factor, dtype=torch.float32).clone()
    elif "scale_factor" in state_dict:
        out["scale_factor"] = torch.as_tensor(state_dict["scale_factor"]).float().clone()
    return out


def vae_config_ldm_to_diffusers(
    ch: int = 128,
    ch_mult: Sequence[int] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    attn_resolutions: Sequence[int] = (),
    z_channels: int = 4,
    embed_dim: int = 4,
    resolution: int = 256,
    in_channels: int = 3,
    out_channels: int = 3,
    mid_attention: bool = True,
    scale_factor: float = 1.0,
    **ignored: object,
) -> dict[str, Any]:
    """Keyword arguments of diffusers' ``AutoencoderKL`` equivalent to our constructor's.

    Levels whose size is in ``attn_resolutions`` become ``Attn{Down,Up}...Block2D``. Keys in
    ``ignored`` (``dropout``, ``use_checkpoint``) do not change the weights.

    Raises:
        ValueError: For a configuration diffusers cannot express (``ch_mult[0] != 1``, or
            ``embed_dim != z_channels``).
    """
    if ch_mult[0] != 1 or embed_dim != z_channels:
        raise ValueError(
            "diffusers' AutoencoderKL needs ch_mult[0] == 1 and embed_dim == z_channels"
        )
    attn = [resolution // 2**i in attn_resolutions for i in range(len(ch_mult))]
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in attn[::-1]],
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": num_res_blocks,
        "latent_channels": z_channels,
        "sample_size": resolution,
        "scaling_factor": scale_factor,
        "mid_block_add_attention": mid_attention,
    }


def vae_config_diffusers_to_ldm(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``AutoencoderKL`` keyword arguments from a diffusers ``AutoencoderKL`` config dict.

    Raises:
        ValueError: For diffusers options our autoencoder does not implement.
    """
    unsupported = {
        "act_fn": "silu",
        "norm_num_groups": 32,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
    }
    # force_upcast only sets the dtype diffusers decodes in; sample_size the default size.
    for key, default in unsupported.items():
        if config.get(key, default) != default:
            raise ValueError(
                f"AutoencoderKL option {key}={config[key]!r} is not implemented "
                f"(ldm reproduces only {key}={default!r})"
            )
    channels = list(config["block_out_channels"])
    resolution = int(config.get("sample_size", 256))
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    known = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"}
    mirrored = [t.replace("DownEncoder", "UpDecoder") for t in reversed(down_types)]
    if not set(down_types) <= known or up_types != mirrored:
        raise ValueError(
            f"AutoencoderKL options down_block_types={down_types} / up_block_types="
            f"{up_types} are not implemented (ldm reproduces "
            "(Attn)DownEncoderBlock2D levels mirrored by (Attn)UpDecoderBlock2D)"
        )
    return {
        "in_channels": config.get("in_channels", 3),
        "out_channels": config.get("out_channels", 3),
        "ch": channels[0],
        "ch_mult": [c // channels[0] for c in channels],
        "num_res_blocks": config.get("layers_per_block", 1),
        "attn_resolutions": [resolution // 2**i for i, t in enumerate(down_types) if "Attn" in t],
        "z_channels": config.get("latent_channels", 4),
        "embed_dim": config.get("latent_channels", 4),
        "resolution": resolution,
        "mid_attention": config.get("mid_block_add_attention", True),
        "scale_factor": config.get("scaling_factor", 0.18215),
    }
