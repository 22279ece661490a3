"""CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1 with w = 100, as torchmetrics defines it):
``max(100 · cos(E_img, E_txt), 0)`` per image–prompt pair, averaged.

The CLIP model comes from a local Hugging Face folder (``CLIPModel.save_pretrained`` layout, for
example a copy of ``openai/clip-vit-large-patch14``): no download. Images are prepared by the
folder's own ``CLIPImageProcessor`` (resize the short side, centre crop, normalise; PIL-based,
no torchvision), prompts by its tokenizer, truncated to the model's context length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class CLIPScorer:
    """Image and text embeddings of a local CLIP model, and their CLIP score."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        import transformers

        from ldm.models.text_encoders import load_pretrained

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"no CLIP model at {path}: give a local folder saved with "
                "CLIPModel.save_pretrained (config.json, weights, tokenizer, "
                "preprocessor_config.json)"
            )
        self.device = torch.device(device)
        self.model = load_pretrained(transformers.CLIPModel, path)
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        # The PIL implementation (the default one needs torchvision); same maths.
        processor_cls = getattr(
            transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor
        )
        if (path / "preprocessor_config.json").is_file():
            self.processor = processor_cls.from_pretrained(path)
        else:
            size = self.model.config.vision_config.image_size
            self.processor = processor_cls(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of ``(B, 3, H, W)`` images (uint8, or float in [-1, 1])."""
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        arrays = [np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]
        pixels = self.processor(images=arrays, return_tensors="pt")["pixel_values"]
        emb = self.model.get_image_features(pixel_values=pixels.to(self.device))
        emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings of prompts."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        emb = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        emb = getattr(emb, "pooler_output", emb)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """``(B,)`` CLIP scores of image i against prompt i."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return clip_score_from_embeddings(
            self.image_embeddings(images), self.text_embeddings(prompts)
        )


def clip_score_from_embeddings(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """``max(100 · cos, 0)`` per row pair of two ``(B, D)`` embedding batches."""
    cos = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return (100 * cos).clamp_min(0)
