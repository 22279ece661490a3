"""The typed schemas of a run's config, one dataclass per section.

Model sections mirror the keyword arguments of the modules they build, one to one, so
``ldm/build.py`` passes them straight through (DESIGN.md: constructors take plain values). Every
field carries a ``help`` text (and, where it has them, its ``choices``) in its metadata; loading,
validation and the generated reference live in :mod:`ldm.config`. The ``model.*`` sections are
in :mod:`ldm.schema_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ldm.schema_fields import opt, section
from ldm.schema_model import ModelConfig


@dataclass
class RunConfig:
    """Where a run lives and how it is seeded."""

    name: str = opt("run", "Run name; the run directory is `<root>/<name>`.")
    root: str = opt("runs", "Directory that holds run directories.")
    seed: int = opt(0, "Global seed (python, numpy, torch; data shuffling derives from it).")


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
    implementation: str = opt(
        "auto",
        "AdamW's kernel: auto (PyTorch's fused one wherever it runs: plain float tensors on "
        "cpu/cuda/xpu/mps, not clipping under 16-mixed; else PyTorch's default), fused, foreach "
        "or for-loop; the same update, rounded differently.",
        ["auto", "fused", "foreach", "for-loop"],
    )
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
    host_memory: str = opt(
        "auto",
        "CPU host memory: keep (glibc keeps freed blocks for reuse, so weight-sized "
        "tensors re-allocated every step do not page-fault; the process keeps its peak "
        "footprint), default (glibc as started), auto (keep when training on the CPU).",
        ["auto", "keep", "default"],
    )
    profiler: str = opt(
        "off",
        "Time per training action (data, training_step, backward, optimizer_step with the "
        "EMA, callbacks), written to <run>/fit-profile.txt (per rank under DDP: "
        "fit-profile-<rank>.txt; train.py names them at the end): "
        "simple (Lightning's SimpleProfiler: mean and total seconds per action) or advanced "
        "(cProfile per action); off.",
        ["off", "simple", "advanced"],
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
