"""SDXL's two-encoder conditioner against diffusers' StableDiffusionXLPipeline.encode_prompt
on a tiny random SDXL folder saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.models.conditioner import SDXLConditioner
from tests.models.sdxl_tiny import POOLED, WIDTH_1, WIDTH_2, build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def test_context_and_pooled_match_diffusers(folder: Path) -> None:
    ours = SDXLConditioner.from_diffusers_folder(folder)
    assert (ours.dim, ours.pooled_dim) == (WIDTH_1 + WIDTH_2, POOLED)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    prompts, negatives = ["the red", "a red the the red"], ["th", "re"]
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt=negatives,
    )  # fmt: skip
    context, got_pooled = ours.encode(prompts)
    neg_context, got_neg_pooled = ours.encode(negatives)
    assert context.shape == (2, 16, WIDTH_1 + WIDTH_2)
    torch.testing.assert_close(context, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_pooled, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(neg_context, neg_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_neg_pooled, neg_pooled, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ours.parameters())


def test_missing_second_encoder_is_named(folder: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for part in ("text_encoder", "tokenizer", "tokenizer_2"):
        (broken / part).symlink_to(folder / part)
    with pytest.raises(FileNotFoundError, match="has no text_encoder_2/"):
        SDXLConditioner.from_diffusers_folder(broken)
