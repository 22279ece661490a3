"""State-dict key mappings for the text encoders inside original Stable Diffusion checkpoints.

SD1 (`FrozenCLIPEmbedder`) stores a transformers `CLIPTextModel` under
`cond_stage_model.transformer.` (older files without the `text_model.` level). SD2
(`FrozenOpenCLIPEmbedder`) stores an open_clip text tower under `cond_stage_model.model.`:
`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_*,
attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale`.

Both are mapped to transformers' canonical CLIP text keys (`text_model.embeddings...`, the names
in hub and diffusers files), so either runs through `ldm.models.text_encoders.ClipTextEncoder`
without open_clip. `keys_for_model` adapts canonical keys to the installed `CLIPTextModel`
(transformers >= 5 drops the `text_model.` level), after which `load_state_dict(strict=True)`
holds. The SD2 conversion follows diffusers' `convert_open_clip_checkpoint`, and its inverse is
exact, which the tests check by a round trip.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
HF_TEXT_PREFIX = "text_model."
_HF_LAYERS = HF_TEXT_PREFIX + "encoder.layers."

# open_clip name -> transformers name, outside the residual blocks.
_OPEN_CLIP_GLOBALS = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# open_clip name -> transformers name inside residual block N (q/k/v handled separately).
_OPEN_CLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_OPEN_CLIP_IGNORED = ("logit_scale", "logit_bias", "attn_mask")

StateDict = dict[str, torch.Tensor]


def detect_text_encoder_layout(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The text encoder inside an SD checkpoint: "clip" (SD1), "openclip" (SD2) or None."""
    for key in state_dict:
        if key.startswith(SD1_CLIP_PREFIX):
            return "clip"
        if key.startswith(SD2_OPEN_CLIP_PREFIX):
            return "openclip"
    return None


def _canonical(key: str) -> str:
    """Adds the `text_model.` level that older files and transformers >= 5 lack."""
    if key.startswith((HF_TEXT_PREFIX, "text_projection")):
        return key
    return HF_TEXT_PREFIX + key


def extract_sd1_clip(
    state_dict: Mapping[str, torch.Tensor], prefix: str = SD1_CLIP_PREFIX
) -> StateDict:
    """The `CLIPTextModel` state dict inside an SD1 checkpoint, in canonical transformers keys.

    Strips `prefix`, adds `text_model.` where an old file lacks it, and drops the `position_ids`
    buffer (an arange that current transformers does not save).

    Raises:
        KeyError: when no key starts with `prefix`.
    """
    out = {
        _canonical(key[len(prefix) :]): value
        for key, value in state_dict.items()
        if key.startswith(prefix) and not key.endswith("position_ids")
    }
    if not out:
        raise KeyError(f"no text encoder keys under {prefix!r}")
    return out


def convert_open_clip_to_hf_clip(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = SD2_OPEN_CLIP_PREFIX,
    include_projection: bool = False,
    drop_last_layer: bool = False,
) -> StateDict:
    """Converts an open_clip text tower (SD2) to canonical transformers `CLIPTextModel` keys.

    Each block's fused `attn.in_proj_{weight,bias}` ((3D, D) / (3D,)) is split into q, k, v in
    that order, as `nn.MultiheadAttention` stacks them.

    Args:
        state_dict: checkpoint holding keys `prefix + "token_embedding.weight"` etc.
        prefix: where the text tower lives (`""` for a bare open_clip state dict).
        include_projection: also emit `text_projection.weight` (transposed, for
            `CLIPTextModelWithProjection`); it is not part of `CLIPTextModel`.
        drop_last_layer: omit the last block, giving diffusers' 23-layer SD2 `text_encoder`
            (whose last layer then equals SD2's penultimate one).

    Raises:
        KeyError: when no key starts with `prefix + "transformer.resblocks."`.
    """
    tower = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    blocks = "transformer.resblocks."
    indices = {int(k[len(blocks) :].split(".")[0]) for k in tower if k.startswith(blocks)}
    if not indices:
        raise KeyError(f"no open_clip text blocks under {prefix + blocks!r}")
    last = max(indices)
    out: StateDict = {}
    for key, value in tower.items():
        if key in _OPEN_CLIP_GLOBALS:
            out[_OPEN_CLIP_GLOBALS[key]] = value
        elif key == "text_projection":
            if include_projection:
                out["text_projection.weight"] = value.T.contiguous()  # (D, E) -> (E, D)
        elif key.startswith(blocks):
            index, name = key[len(blocks) :].split(".", 1)
            if drop_last_layer and int(index) == last:
                continue
            base = f"{_HF_LAYERS}{index}."
            if name.startswith("attn.in_proj_"):
                kind = name.rsplit("_", 1)[1]  # weight | bias
                for proj, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{base}self_attn.{proj}_proj.{kind}"] = part.clone()
            elif name in _OPEN_CLIP_BLOCK:
                out[base + _OPEN_CLIP_BLOCK[name]] = value
            else:
                raise KeyError(f"unexpected open_clip text key {prefix + key!r}")
        elif key not in _OPEN_CLIP_IGNORED and not key.startswith("visual."):
            raise KeyError(f"unexpected open_clip text key {prefix + key!r}")
    return out


def convert_hf_clip_to_open_clip(
    state_dict: Mapping[str, torch.Tensor], prefix: str = SD2_OPEN_CLIP_PREFIX
) -> StateDict:
    """Inverse of `convert_open_clip_to_hf_clip`: transformers CLIP text keys to open_clip's.

    Accepts canonical keys or those of the installed `CLIPTextModel` (with or without
    `text_model.`); q, k, v are concatenated into `attn.in_proj_*`, and a `text_projection.weight`
    (E, D) becomes `text_projection` (D, E). `position_ids` buffers are skipped.
    """
    globals_back = {hf: oc for oc, hf in _OPEN_CLIP_GLOBALS.items()}
    block_back = {hf: oc for oc, hf in _OPEN_CLIP_BLOCK.items()}
    canonical = {_canonical(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    out: StateDict = {}
    for key, value in canonical.items():
        if key in globals_back:
            out[prefix + globals_back[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # (E, D) -> (D, E)
        elif key.startswith(_HF_LAYERS):
            index, name = key[len(_HF_LAYERS) :].split(".", 1)
            base = f"{prefix}transformer.resblocks.{index}."
            if name.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                if name.startswith("self_attn.q_proj."):
                    kind = name.rsplit(".", 1)[1]
                    parts = [
                        canonical[f"{_HF_LAYERS}{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"
                    ]
                    out[f"{base}attn.in_proj_{kind}"] = torch.cat(parts, dim=0)  # (3D, ...)
            elif name in block_back:
                out[base + block_back[name]] = value
            else:
                raise KeyError(f"unexpected CLIP text key {key!r}")
        else:
            raise KeyError(f"unexpected CLIP text key {key!r}")
    return out


def keys_for_model(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Renames canonical CLIP text keys to those of `model` (a `CLIPTextModel` of any version).

    transformers < 5 nests the text modules under `text_model.`, 5 does not; a `position_ids`
    buffer is kept only where the model saves one.
    """
    own = model.state_dict()
    nested = any(k.startswith(HF_TEXT_PREFIX) for k in own)
    out: StateDict = {}
    for key, value in state_dict.items():
        key = _canonical(key)
        if not nested and key.startswith(HF_TEXT_PREFIX):
            key = key[len(HF_TEXT_PREFIX) :]
        out[key] = value
    for key in own:
        if key.endswith("position_ids") and key not in out:
            out[key] = own[key]
    return out


def clip_text_config_kwargs(
    state_dict: Mapping[str, torch.Tensor],
    hidden_act: str = "quick_gelu",
    num_attention_heads: int | None = None,
) -> dict[str, int | str]:
    """`CLIPTextConfig` keyword arguments read off a (canonical-key) CLIP text state dict.

    Sizes come from the weights. Two things do not: the activation (SD1's OpenAI CLIP ViT-L/14
    uses "quick_gelu", SD2's OpenCLIP ViT-H/14 "gelu") and the head count (default: width / 64,
    true of both).
    """
    sd = {_canonical(k): v for k, v in state_dict.items()}
    vocab_size, hidden_size = sd["text_model.embeddings.token_embedding.weight"].shape
    layers = {int(k[len(_HF_LAYERS) :].split(".")[0]) for k in sd if k.startswith(_HF_LAYERS)}
    kwargs: dict[str, int | str] = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "intermediate_size": int(sd[f"{_HF_LAYERS}0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": len(layers),
        "num_attention_heads": num_attention_heads or int(hidden_size) // 64,
        "max_position_embeddings": int(
            sd["text_model.embeddings.position_embedding.weight"].shape[0]
        ),
        "hidden_act": hidden_act,
    }
    if "text_projection.weight" in sd:
        kwargs["projection_dim"] = int(sd["text_projection.weight"].shape[0])
    return kwargs
