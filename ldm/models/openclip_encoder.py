"""OpenCLIP text encoder (Stable Diffusion 2's `FrozenOpenCLIPEmbedder`), via `open_clip_torch`.

open_clip is an optional dependency (`pip install -e .[openclip]`), imported only when an
`OpenClipTextEncoder` is constructed. Without it, SD2 text weights can still run through
transformers: `ldm.checkpoint.text_keys.convert_open_clip_to_hf_clip` converts them for
`ClipTextEncoder(layer="penultimate")`, which computes the same function.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ldm.models.text_encoder_base import (
    TextEncoder,
    Tokens,
    check_layer,
    layer_blocks,
    local_dir,
    looks_like_local_path,
)

_CONFIG_FILE = "open_clip_config.json"
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# The vision tower is deleted right after construction (SD2 does `del model.visual` too), so a tiny
# one is built in its place rather than e.g. ViT-H-14's 630M parameters.
_TINY_VISION_CFG: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 16,
    "layers": 1,
    "width": 64,
    "head_width": 64,
}


def import_open_clip() -> ModuleType:
    """Imports open_clip, or raises a one-line ImportError saying how to install it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"OpenClipTextEncoder needs open_clip_torch ({error}): pip install -e .[openclip]"
        ) from None
    return open_clip


def open_clip_text_forward(model: nn.Module, tokens: torch.Tensor, layer: str) -> torch.Tensor:
    """Runs an open_clip CLIP text tower to `layer` and applies `ln_final`.

    The computation of SD2's `FrozenOpenCLIPEmbedder.encode_with_transformer`: token plus
    positional embedding, the causal transformer (all blocks for "last", all but the final one for
    "penultimate", the first k for "k"), then the final layer norm. Works with open_clip's
    sequence-first (older) and batch-first (newer, `transformer.batch_first`) transformers.

    Args:
        model: an open_clip `CLIP` (or anything with `token_embedding`, `positional_embedding`,
            `transformer.resblocks`, `ln_final` and optionally `attn_mask`).
        tokens: (B, L) int64 token ids, L <= the model's context length.
        layer: "last", "penultimate" or a block number "k".

    Returns:
        (B, L, D) context.
    """
    seq_len = tokens.shape[1]
    x = model.token_embedding(tokens)  # (B, L, D)
    x = x + model.positional_embedding[:seq_len].to(x.dtype)
    attn_mask = getattr(model, "attn_mask", None)
    if attn_mask is None:  # causal: -inf above the diagonal, as open_clip builds it
        attn_mask = torch.full((seq_len, seq_len), float("-inf"), device=x.device).triu_(1)
    attn_mask = attn_mask[:seq_len, :seq_len].to(device=x.device, dtype=x.dtype)
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.transpose(0, 1)  # (L, B, D)
    blocks = list(model.transformer.resblocks)
    blocks = blocks[: layer_blocks(layer, len(blocks))]
    for block in blocks:
        x = block(x, attn_mask=attn_mask)
    if not batch_first:
        x = x.transpose(0, 1)  # (B, L, D)
    return model.ln_final(x)


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """Reads a state dict with safetensors or `torch.load(weights_only=True)`."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def _resolve_source(open_clip: ModuleType, name_or_path: str) -> tuple[dict[str, Any], str | None]:
    """Finds the model config and weights file of `name_or_path`.

    Accepts a local directory or hub repository in open_clip's hub layout (`open_clip_config.json`
    plus `open_clip_model.safetensors` or `open_clip_pytorch_model.bin`), written `DIR`,
    `org/name` or `hf-hub:org/name`; or an open_clip architecture name with an optional pretrained
    tag, `ARCH[:TAG]` (e.g. "ViT-H-14:laion2b_s32b_b79k", SD2's text encoder; no tag: random
    weights).

    Returns:
        (model_cfg, weights path or None).
    """
    if looks_like_local_path(name_or_path):
        root = local_dir(name_or_path)
        config = json.loads((root / _CONFIG_FILE).read_text())["model_cfg"]
        weights = next((root / f for f in _WEIGHT_FILES if (root / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"no {' or '.join(_WEIGHT_FILES)} in {name_or_path}")
        return config, str(weights)
    if name_or_path.startswith("hf-hub:") or "/" in name_or_path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        repo = name_or_path.removeprefix("hf-hub:")
        config = json.loads(Path(hf_hub_download(repo, _CONFIG_FILE)).read_text())["model_cfg"]
        try:
            return config, hf_hub_download(repo, _WEIGHT_FILES[0])
        except EntryNotFoundError:
            return config, hf_hub_download(repo, _WEIGHT_FILES[1])
    arch, _, tag = name_or_path.partition(":")
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if not tag:
        return config, None
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not pretrained_cfg:
        raise ValueError(
            f"unknown pretrained tag {tag!r} for {arch}; see open_clip.list_pretrained()"
        )
    return config, str(open_clip.download_pretrained(pretrained_cfg))


def build_open_clip_text_model(open_clip: ModuleType, model_cfg: dict[str, Any]) -> nn.Module:
    """Builds an open_clip `CLIP` from a model config, keeping only its text tower."""
    cfg = dict(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    if cfg.pop("custom_text", False) or text_cfg.get("hf_model_name"):
        raise NotImplementedError(
            "OpenClipTextEncoder supports CLIP-style text towers (SD2's ViT-H-14), not custom ones"
        )
    cfg["vision_cfg"] = dict(_TINY_VISION_CFG)
    model = open_clip.CLIP(**cfg)
    del model.visual
    return model


class OpenClipTextEncoder(TextEncoder):
    """OpenCLIP text transformer, as SD2's `FrozenOpenCLIPEmbedder`.

    `layer="penultimate"` (the default, SD2's choice) runs all but the last residual block and
    applies `ln_final`; "last" runs all blocks. Tokenisation is open_clip's `SimpleTokenizer`
    (lower-cased CLIP BPE, padded with id 0, truncated with the end token kept). The model sees
    only the causal mask; `mask` marks the tokens up to and including the first end token.

    Args:
        name_or_path: `ARCH[:TAG]` (open_clip registry, e.g. "ViT-H-14:laion2b_s32b_b79k"), a
            hub repository in open_clip layout ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K" or with an
            "hf-hub:" prefix), or a local directory in that layout.
        max_length: token sequence length L (at most the model's context length, 77).
        layer: "penultimate", "last" or a block number "k".
        dtype: weight/compute dtype name ("float32", "float16", "bfloat16").
    """

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 77,
        layer: str = "penultimate",
        dtype: str = "float32",
    ) -> None:
        super().__init__(max_length=max_length, dtype=dtype)
        self.layer = check_layer(layer)
        self.name_or_path = name_or_path
        name_or_path = os.fspath(name_or_path)
        if looks_like_local_path(name_or_path):
            local_dir(name_or_path)  # a missing directory is reported before a missing open_clip
        open_clip = import_open_clip()
        model_cfg, weights = _resolve_source(open_clip, name_or_path)
        self.model = build_open_clip_text_model(open_clip, model_cfg)
        if weights is not None:
            state = _load_weights_file(weights)
            state = {k.removeprefix("module."): v for k, v in state.items()}
            state = {k: v for k, v in state.items() if not k.startswith("visual.")}
            self.model.load_state_dict(state, strict=True)
        self.model.to(self.weight_dtype)
        layer_blocks(self.layer, len(self.model.transformer.resblocks))  # k within the model
        context_length = self.model.positional_embedding.shape[0]
        if max_length > context_length:
            raise ValueError(f"max_length={max_length} exceeds the context length {context_length}")
        self.tokenizer = open_clip.SimpleTokenizer()
        self._open_clip = open_clip
        self.freeze()

    @property
    def dim(self) -> int:
        """Width D of the text transformer."""
        return int(self.model.positional_embedding.shape[1])

    def tokenize(self, prompts: list[str]) -> Tokens:
        """open_clip tokenisation to `max_length`, mask up to the first end-of-text token."""
        if callable(self.tokenizer):
            ids = self.tokenizer(prompts, context_length=self.max_length)
        else:  # older open_clip: module-level function with the default tokenizer
            ids = self._open_clip.tokenize(prompts, context_length=self.max_length)
        ids = ids.long()  # (B, L)
        eot = getattr(self.tokenizer, "eot_token_id", None)
        # The end token has the largest id, so argmax finds it where the tokenizer has no attribute.
        end = (ids == eot).int().argmax(dim=1) if eot is not None else ids.argmax(dim=1)  # (B,)
        mask = torch.arange(ids.shape[1])[None, :] <= end[:, None]  # (B, L)
        lengths = [len(self.tokenizer.encode(prompt)) + 2 for prompt in prompts]  # + start, end
        return Tokens(ids, mask, lengths)

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) context of `layer` after `ln_final`."""
        return open_clip_text_forward(self.model, ids, self.layer)

    def extra_repr(self) -> str:
        return f"{self.name_or_path!r}, layer={self.layer!r}, {super().extra_repr()}"
