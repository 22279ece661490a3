"""SDXL's two frozen text encoders (Podell et al. 2023, sec. 2.1).

The context is CLIP ViT-L's and OpenCLIP ViT-bigG's penultimate hidden states (no final layer
norm), concatenated on the feature axis (768 + 1280 = 2048 for SDXL base); the pooled vector is
ViT-bigG's projected end-of-text embedding (1280). Both encoders are transformers' CLIP classes
(``CLIPTextModel`` and ``CLIPTextModelWithProjection``), as in diffusers' SDXL folders
(``text_encoder``/``tokenizer``, ``text_encoder_2``/``tokenizer_2``), so open_clip is not
needed. Each prompt is tokenised by each encoder's own tokenizer, padded to ``max_length``
(SDXL's second tokenizer pads with ``!``, the first with ``<|endoftext|>``), as diffusers'
``StableDiffusionXLPipeline.encode_prompt`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class SDXLConditioner(nn.Module):
    """Frozen CLIP ViT-L + OpenCLIP ViT-bigG text encoders: prompts → (context, pooled).

    Built frozen and in eval mode; a fine-tune may unfreeze both encoders or add LoRA adapters
    to them (`ldm.text_tuning`); it stays in eval mode (no dropout), as the SD 1.x/2.x encoder.

    Args:
        text_encoder: The first encoder (``CLIPTextModel``, ViT-L in SDXL); None for the SDXL
            refiner, whose context is the second encoder's states alone.
        tokenizer: Its tokenizer (None with it).
        text_encoder_2: The second encoder (``CLIPTextModelWithProjection``, ViT-bigG).
        tokenizer_2: Its tokenizer.
        max_length: Token length L; None uses the first tokenizer's ``model_max_length``.
    """

    def __init__(
        self, text_encoder: nn.Module | None, tokenizer: Any, text_encoder_2: nn.Module,
        tokenizer_2: Any, max_length: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if not hasattr(text_encoder_2, "text_projection"):
            raise ValueError(
                "the second SDXL text encoder must have a text projection "
                "(CLIPTextModelWithProjection) for the pooled embedding"
            )
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.max_length = int(max_length or (tokenizer or tokenizer_2).model_max_length)
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_diffusers_folder(
        cls, root: str | Path, max_length: int | None = None, weights: bool = True
    ) -> SDXLConditioner:
        """Both encoders and tokenizers from a diffusers SDXL folder.

        Args:
            root: The folder (``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
                ``tokenizer_2/``).
            max_length: Token length (None: the first tokenizer's).
            weights: Load the encoders' weights; False builds them from their ``config.json``
                alone (random weights, for a caller that loads them from elsewhere, e.g. an
                SDXL single file).

        Raises:
            FileNotFoundError: ``text_encoder``, ``tokenizer``, ``text_encoder_2`` or
                ``tokenizer_2`` is missing (one line naming it).
        """
        from transformers import (
            CLIPTextConfig,
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )

        from ldm.models.text_encoders import load_pretrained

        root = Path(root)
        index = root / "model_index.json"  # the refiner's says "text_encoder": [null, null]
        refiner = index.is_file() and not any(json.loads(index.read_text()).get("text_encoder")
                                              or [None])  # fmt: skip
        parts = (
            ("text_encoder_2", "tokenizer_2")
            if refiner
            else ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        )
        for part in parts:
            if not (root / part).is_dir():
                raise FileNotFoundError(
                    f"{root} has no {part}/: an SDXL folder needs text_encoder/, tokenizer/, "
                    "text_encoder_2/ and tokenizer_2/ (model.text_encoder.name_or_path)"
                )
        first = tokenizer = None
        if weights:
            if not refiner:
                first = load_pretrained(CLIPTextModel, root / "text_encoder")
            second = load_pretrained(CLIPTextModelWithProjection, root / "text_encoder_2")
        else:
            if not refiner:
                first = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
            second = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(root / "text_encoder_2")
            )
        if not refiner:
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        return cls(
            first, tokenizer, second,
            CLIPTokenizer.from_pretrained(root / "tokenizer_2", local_files_only=True),
            max_length,
        )  # fmt: skip

    @property
    def split(self) -> int:
        """Where the second encoder's channels start in the context (the first's width)."""
        return 0 if self.text_encoder is None else int(self.text_encoder.config.hidden_size)

    def train(self, mode: bool = True) -> SDXLConditioner:
        """Stays in eval mode (frozen)."""
        return super().train(False)

    @property
    def dim(self) -> int:
        """Context width: the two encoders' hidden sizes added."""
        return self.split + int(self.text_encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled embedding (the second encoder's projection)."""
        return int(self.text_encoder_2.config.projection_dim)

    def _ids(self, tokenizer: Any, prompts: list[str]) -> Tensor:
        out = tokenizer(prompts, padding="max_length", max_length=self.max_length,
                        truncation=True, return_tensors="pt")  # fmt: skip
        return out.input_ids.to(next(self.parameters()).device)

    @property
    def trainable(self) -> bool:
        """Whether any weight trains (``model.train_text_encoder`` or text-encoder LoRA,
        `ldm.text_tuning`): encoding then keeps the graph."""
        return any(p.requires_grad for p in self.parameters())

    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encodes B prompts (with gradients only where a weight trains and grad is enabled).

        Returns:
            context: (B, L, D1 + D2) float32, both encoders' penultimate hidden states.
            pooled: (B, P) float32, the second encoder's projected pooled output.
        """
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode() needs at least one prompt")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        second = self.text_encoder_2(self._ids(self.tokenizer_2, prompts),
                                     output_hidden_states=True)  # fmt: skip
        if self.text_encoder is None:  # the refiner: ViT-bigG alone
            return second.hidden_states[-2].float(), second.text_embeds.float()
        first = self.text_encoder(self._ids(self.tokenizer, prompts), output_hidden_states=True)
        context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return context.float(), second.text_embeds.float()
