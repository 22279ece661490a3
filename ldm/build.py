"""The one place where a config becomes objects.

Model sections are passed to constructors as keyword arguments (the schemas in ``ldm.config``
mirror them one to one). Lightning is imported only by the functions that build training
objects, so ``sample.py`` can build models without it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from ldm.checkpoint.format import Checkpoint, CheckpointError, load_checkpoint
from ldm.config import to_container, to_yaml

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from ldm.diffusion import DiffusionLoss, NoiseSchedule, Sampler
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)


def kwargs(section: Any) -> dict[str, Any]:
    """A config section as plain keyword arguments."""
    if isinstance(section, DictConfig):
        return to_container(section)
    return dict(section)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_autoencoder(section: Any) -> AutoencoderKL:
    """``model.autoencoder`` → ``AutoencoderKL``."""
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(**kwargs(section))


def build_autoencoder_loss(section: Any) -> torch.nn.Module:
    """``model.loss`` → ``AutoencoderLoss`` (with its discriminator)."""
    from ldm.models.autoencoder_loss import AutoencoderLoss

    return AutoencoderLoss(**kwargs(section))


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """An autoencoder from one of our checkpoints (autoencoder or ldm kind), weights loaded."""
    ckpt = load_checkpoint(path)
    if ckpt.kind not in ("autoencoder", "ldm"):
        raise CheckpointError(f"{path} holds no autoencoder")
    return autoencoder_from_checkpoint(ckpt)


def autoencoder_from_checkpoint(ckpt: Checkpoint) -> AutoencoderKL:
    """Rebuild the autoencoder a checkpoint's config describes and load its weights strictly."""
    section = ckpt.config.get("model", {}).get("autoencoder", {})
    from ldm.config import load

    cfg = load(base={"model": {"autoencoder": section}})
    model = build_autoencoder(cfg.model.autoencoder)
    model.load_state_dict(ckpt.module_state("autoencoder"), strict=True)
    return model


def build_unet(section: Any) -> torch.nn.Module:
    """``model.unet`` → ``UNetModel``."""
    from ldm.models.unet import UNetModel

    return UNetModel(**kwargs(section))


def build_text_encoder(section: Any) -> torch.nn.Module:
    """``model.text_encoder`` → a frozen ``TextEncoder`` of the configured kind."""
    from ldm.models.text_encoders import build_text_encoder as build

    args = kwargs(section)
    return build(args.pop("kind"), **args)


def build_schedule(section: Any) -> NoiseSchedule:
    """``model.diffusion`` → the ``NoiseSchedule``."""
    from ldm.diffusion import NoiseSchedule

    d = kwargs(section)
    return NoiseSchedule(schedule=d["schedule"], num_timesteps=d["num_timesteps"],
                         beta_start=d["beta_start"], beta_end=d["beta_end"],
                         zero_terminal_snr=d["zero_terminal_snr"])


def build_diffusion_loss(section: Any) -> DiffusionLoss:
    """``model.diffusion`` → the configured ``DiffusionLoss``."""
    from ldm.diffusion import DiffusionLoss

    d = kwargs(section)
    return DiffusionLoss(prediction=d["prediction"], loss_weighting=d["loss_weighting"],
                         min_snr_gamma=d["min_snr_gamma"], offset_noise=d["offset_noise"],
                         timestep_sampling=d["timestep_sampling"])


def build_sampler(section: Any, disable_progress: bool = False, **override: Any) -> Sampler:
    """``sampling`` (+ overrides such as ``steps=``) → a ``Sampler``."""
    from ldm.diffusion import Sampler

    s = {**kwargs(section), **{k: v for k, v in override.items() if v is not None}}
    return Sampler(sampler=s["sampler"], steps=s["steps"], eta=s["eta"], karras=s["karras"],
                   timestep_spacing=s["timestep_spacing"], final_sigma=s["final_sigma"],
                   disable_progress=disable_progress)


def resolve(cfg: DictConfig) -> DictConfig:
    """Fill what a config takes from elsewhere: an ldm run's autoencoder section comes from
    ``model.autoencoder_ckpt`` (so the saved config rebuilds the same autoencoder)."""
    if cfg.task == "ldm" and cfg.model.autoencoder_ckpt:
        from ldm.checkpoint.format import read_metadata
        from ldm.config import load

        meta = read_metadata(cfg.model.autoencoder_ckpt)
        source = load(base={"model": {"autoencoder": _section_of(meta, "autoencoder")}})
        cfg.model.autoencoder = source.model.autoencoder
    check_buckets(cfg)
    return cfg


def model_size_step(cfg: DictConfig) -> tuple[int, str]:
    """The pixel step every image side must be a multiple of for ``cfg.task``'s models, and
    what needs it: the autoencoder factor ``2**(levels-1)``, times the U-Net's
    ``2**(levels-1)`` for an ldm (its skip connections need even feature maps at each level)."""
    factor = 2 ** (len(cfg.model.autoencoder.ch_mult) - 1)
    if cfg.task != "ldm":
        return factor, f"the autoencoder (factor {factor})"
    unet = 2 ** (len(cfg.model.unet.channel_mult) - 1)
    return factor * unet, f"the autoencoder (factor {factor}) x U-Net ({unet} levels down)"


def check_buckets(cfg: DictConfig) -> None:
    """Refuse, before anything is built, ``data.buckets`` the models cannot take (one line)."""
    from ldm.data.buckets import bucket_set, check_model_step

    buckets = bucket_set(kwargs(cfg.data.buckets))
    if buckets is not None:
        check_model_step(buckets, *model_size_step(cfg))


def _section_of(meta: dict[str, str], name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.create(meta.get("config", "{}")), resolve=True)
    return config.get("model", {}).get(name, {})  # type: ignore[union-attr]


def build_latent_diffusion(cfg: DictConfig, autoencoder: torch.nn.Module | None = None
                           ) -> LatentDiffusion:
    """``model`` → ``LatentDiffusion``. The autoencoder is, in order: the one given, the one in
    ``model.autoencoder_ckpt``, or a fresh one from ``model.autoencoder``."""
    from ldm.models.latent_diffusion import LatentDiffusion

    m = cfg.model
    if autoencoder is None:
        autoencoder = (load_autoencoder(m.autoencoder_ckpt) if m.autoencoder_ckpt
                       else build_autoencoder(m.autoencoder))
    return LatentDiffusion(
        unet=build_unet(m.unet),
        autoencoder=autoencoder,
        text_encoder=build_text_encoder(m.text_encoder),
        schedule=build_schedule(m.diffusion),
        prediction=m.diffusion.prediction,
        use_context_mask=m.use_context_mask,
    )


def load_latent_diffusion(ckpt: Checkpoint, use_ema: bool = True) -> LatentDiffusion:
    """Rebuild a ``LatentDiffusion`` from one of our ldm checkpoints (EMA U-Net by default)."""
    from ldm.config import load

    if ckpt.kind != "ldm":
        raise CheckpointError(f"a '{ckpt.kind}' checkpoint holds no diffusion model")
    cfg = load(base=ckpt.config)
    model = build_latent_diffusion(cfg, autoencoder=autoencoder_from_checkpoint(ckpt))
    unet_key = "unet_ema" if use_ema and any(k.startswith("unet_ema.") for k in ckpt.tensors) \
        else "unet"
    model.unet.load_state_dict(ckpt.module_state(unet_key), strict=True)
    return model


def load_for_sampling(
    path: str | Path, config_files: Sequence[str | Path] = (), overrides: Sequence[str] = (),
    use_ema: bool = True,
) -> tuple[LatentDiffusion, DictConfig]:
    """A ``LatentDiffusion`` (eval mode) and its config from any supported checkpoint.

    Args:
        path: One of our ``ldm`` checkpoints, an original Stable Diffusion single file
            (``.safetensors``/``.ckpt``) or a diffusers-layout folder.
        config_files: Configs merged over the checkpoint's own (required for SD files, which
            carry none, e.g. ``configs/ldm/sd1.yaml``).
        overrides: ``key=value`` overrides.
        use_ema: Use EMA U-Net weights when the checkpoint has them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Not a diffusion checkpoint (e.g. an autoencoder-only one).
    """
    from ldm.checkpoint.format import FORMAT, read_metadata
    from ldm.config import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    from ldm.checkpoint.sdxl_layout import is_sdxl_folder

    if path.is_dir() and is_sdxl_folder(path):
        from ldm.checkpoint.sdxl_layout import load_sdxl_folder, sdxl_folder_config

        cfg = sdxl_folder_config(path, load(config_files, overrides))
        model = load_sdxl_folder(path)
    elif path.is_dir():
        from ldm.checkpoint.diffusers_layout import folder_config, load_diffusers_folder

        cfg = folder_config(path, load(config_files, overrides))
        model = load_diffusers_folder(path, cfg)
    elif path.suffix == ".safetensors" and read_metadata(path).get("format") == FORMAT:
        ckpt = load_checkpoint(path)
        if ckpt.kind != "ldm":
            raise CheckpointError(
                f"{path} is a '{ckpt.kind}' checkpoint; sampling needs an 'ldm' checkpoint "
                "(train one with task=ldm)"
            )
        cfg = load(config_files, overrides, base=ckpt.config)
        model = load_latent_diffusion(ckpt, use_ema=use_ema)
    else:
        from ldm.checkpoint.sdxl_single_file import (
            check_not_sd_file_for_sdxl_config,
            is_sdxl_file,
            load_sdxl_single_file,
        )
        from ldm.checkpoint.stable_diffusion import load_sd_single_file

        if not config_files:
            raise CheckpointError(
                f"{path} is an original Stable Diffusion file, which carries no config: pass "
                "-c configs/ldm/sd1.yaml (SD 1.x), -c configs/ldm/sd2.yaml (SD 2.x) or "
                "-c configs/ldm/sdxl.yaml (SDXL)"
            )
        cfg = load(config_files, overrides)
        if is_sdxl_file(path):
            model = load_sdxl_single_file(path, cfg, cfg.model.text_encoder.name_or_path,
                                          use_ema=use_ema)
        else:
            check_not_sd_file_for_sdxl_config(path, cfg)
            model = load_sd_single_file(path, cfg, use_ema=use_ema)
    return model.eval(), cfg


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """``data`` → the webdataset ``ShardDataModule``."""
    from ldm.data.datamodule import ShardDataModule

    return ShardDataModule(**kwargs(cfg.data), seed=cfg.run.seed)


def run_dir(cfg: DictConfig) -> Path:
    """``<run.root>/<run.name>``."""
    return Path(cfg.run.root) / cfg.run.name


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Create the run directory and write the resolved config into it."""
    path = run_dir(cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    return path


def learning_rate(cfg: DictConfig) -> float:
    """``optim.lr``, times the global batch size only when ``optim.scale_lr`` is on (logged)."""
    lr = float(cfg.optim.lr)
    if not cfg.optim.scale_lr:
        return lr
    t = cfg.trainer
    devices = t.devices  # an int, a list of ids, or a string ("auto" counts as one device)
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else 1
    elif not isinstance(devices, int):
        devices = len(devices)
    global_batch = cfg.data.batch_size * max(devices, 1) * t.num_nodes * t.accumulate_grad_batches
    log.warning("optim.scale_lr: lr %.3g x global batch %d = %.3g", lr, global_batch,
                lr * global_batch)
    return lr * global_batch


def build_module(cfg: DictConfig, datamodule: Any | None = None) -> pl.LightningModule:
    """The LightningModule for ``cfg.task``."""
    if cfg.task == "autoencoder":
        from ldm.training.autoencoder_module import AutoencoderModule

        return AutoencoderModule(
            autoencoder=build_autoencoder(cfg.model.autoencoder),
            loss=build_autoencoder_loss(cfg.model.loss),
            lr=learning_rate(cfg),
            disc_lr=cfg.optim.disc_lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_steps,
            lr_schedule=cfg.optim.schedule,
            min_lr_ratio=cfg.optim.min_lr_ratio,
            total_steps=max(cfg.trainer.max_steps, 0),
            gradient_clip_val=cfg.trainer.gradient_clip_val,
        )
    from ldm.training.diffusion_module import DiffusionModule

    empty = None
    if cfg.data.cached and datamodule is not None:
        prompt = datamodule.empty_prompt()
        empty = (prompt["context"], prompt["context_mask"])
    ema = cfg.model.ema
    return DiffusionModule(
        model=build_latent_diffusion(cfg),
        loss=build_diffusion_loss(cfg.model.diffusion),
        p_uncond=cfg.model.p_uncond,
        lr=learning_rate(cfg),
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
        warmup_steps=cfg.optim.warmup_steps,
        lr_schedule=cfg.optim.schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        total_steps=max(cfg.trainer.max_steps, 0),
        ema_decay=ema.decay if ema.enabled else None,
        ema_every=ema.update_every,
        sampler=build_sampler(cfg.sampling, disable_progress=True),
        sample_prompts=list(cfg.sampling.prompts),
        guidance=cfg.sampling.guidance,
        negative_prompt=cfg.sampling.negative_prompt,
        sample_seed=cfg.sampling.seed,
        empty_context=empty,
    )


def build_quality_monitor(cfg: DictConfig) -> Any:
    """``quality`` → the training-time metrics callback, or None when disabled. Checks its
    settings (prompts, files), so call it before anything is written."""
    if not cfg.quality.every_n_steps:
        return None
    from ldm.training.quality import build_quality_monitor as build_monitor

    sampler = build_sampler(cfg.sampling, steps=cfg.quality.steps, disable_progress=True)
    return build_monitor(cfg, sampler)


def build_trainer(cfg: DictConfig, path: Path, extra_callbacks: list[Any] | None = None
                  ) -> pl.Trainer:
    """``trainer`` (+ ``logging``) → ``pytorch_lightning.Trainer`` with our callbacks."""
    import pytorch_lightning as pl

    from ldm.training.callbacks import (
        DataSkipLogger,
        ImageLogger,
        RNGState,
        SafetensorsCheckpoint,
        ThroughputMonitor,
    )
    from ldm.training.loggers import build_logger, define_step_metrics
    from ldm.training.strategy import ExecutionOptions, build_strategy

    t = cfg.trainer
    config = to_container(cfg)
    strategy = build_strategy(t.strategy, find_unused_parameters=t.find_unused_parameters,
                              fsdp_sharding=t.fsdp_sharding)
    logger = build_logger(cfg.logging.logger, path, cfg.run.name, cfg.logging.project,
                          cfg.logging.wandb_mode, config)
    define_step_metrics(logger)
    callbacks: list[Any] = [
        SafetensorsCheckpoint(path / "checkpoints", config, t.ckpt_every_n_steps, t.keep_last_k),
        ImageLogger(path / "images", cfg.logging.image_every_n_steps, cfg.logging.num_images),
        RNGState(),
        DataSkipLogger(t.log_every_n_steps),
        ThroughputMonitor(batch_key="image" if not cfg.data.cached else "latent_mean"),
        ExecutionOptions(t.compile, t.gradient_checkpointing, t.vae_precision),
        *(extra_callbacks or []),
    ]

    manual = cfg.task == "autoencoder"  # manual optimisation clips inside the module
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=t.max_epochs,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=None if manual else t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_val_batches=t.limit_val_batches,
        limit_train_batches=t.limit_train_batches,
        num_sanity_val_steps=t.num_sanity_val_steps,
        fast_dev_run=t.fast_dev_run,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_checkpointing=False,
        default_root_dir=str(path),
        logger=logger,
        callbacks=callbacks,
    )
