"""A tiny random SDXL-shaped diffusers folder (two CLIP encoders, text_time U-Net, KL VAE),
built locally for tests."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

LETTERS = list(string.ascii_lowercase)
MAX_LEN, WIDTH_1, WIDTH_2, POOLED = 16, 32, 48, 24


def _tokenizer(root: Path, pad: str | None):  # noqa: ANN202 - transformers type
    import transformers

    vocab = LETTERS + [c + "</w>" for c in LETTERS]
    vocab += ["th", "the</w>", "re", "red</w>", "!</w>", "<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\nr e\nre d</w>\n")
    extra = {"pad_token": pad} if pad else {}
    return transformers.CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=MAX_LEN, **extra
    ), len(vocab)


def _clip(width: int, vocab: int):  # noqa: ANN202 - transformers type
    import transformers

    return transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=POOLED,
        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
    )  # fmt: skip


def build_tiny_refiner(root: Path) -> Path:
    """Saves a StableDiffusionXLImg2ImgPipeline shaped as SDXL's refiner (the second encoder
    only, five micro-conditioning numbers with the aesthetic score, empty prompts encoded) of
    tiny random modules to ``root`` and returns it."""
    import diffusers
    import transformers

    tok_2, vocab = _tokenizer(root / "_tok2", "!</w>")
    torch.manual_seed(1)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip(WIDTH_2, vocab))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1),
        cross_attention_dim=WIDTH_2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 5 * 256, norm_num_groups=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
        tokenizer_2=tok_2, unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "refiner")
    return root / "refiner"


def build_tiny_sdxl(root: Path) -> Path:
    """Saves a StableDiffusionXLPipeline of tiny random modules to ``root`` and returns it."""
    import diffusers
    import transformers

    tok_1, vocab = _tokenizer(root / "_tok1", None)
    tok_2, _ = _tokenizer(root / "_tok2", "!</w>")

    def clip(width: int) -> transformers.CLIPTextConfig:
        return _clip(width, vocab)

    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(clip(WIDTH_1))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(clip(WIDTH_2))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        cross_attention_dim=WIDTH_1 + WIDTH_2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 6 * 256, norm_num_groups=32,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
        latent_channels=4, norm_num_groups=32, sample_size=16, scaling_factor=0.13025,
    )  # fmt: skip
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok_1,
        tokenizer_2=tok_2, unet=unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.save_pretrained(root / "sdxl")
    return root / "sdxl"


def sdxl_text_towers():  # noqa: ANN201 - transformers types
    """SDXL's two text encoders at full size (CLIP ViT-L/14, OpenCLIP ViT-bigG/14 as
    transformers classes), built on the current device (call under ``torch.device("meta")``
    to count parameters without weights)."""
    import transformers

    clip = transformers.CLIPTextConfig
    vit_l = transformers.CLIPTextModel(clip(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu"))  # fmt: skip
    vit_g = transformers.CLIPTextModelWithProjection(clip(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))  # fmt: skip
    return vit_l, vit_g
