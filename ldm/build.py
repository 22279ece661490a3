"""The one place where a config becomes objects.

Model sections are passed to constructors as keyword arguments (the schemas in ``ldm.config``
mirror them one to one). Lightning is imported only by the functions that build training
objects, so ``sample.py`` can build models without it.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from ldm.checkpoint.format import Checkpoint, CheckpointError, load_checkpoint
from ldm.config import to_container, to_yaml

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from ldm.models.autoencoder import AutoencoderKL

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


def build_module(cfg: DictConfig) -> pl.LightningModule:
    """The LightningModule for ``cfg.task``."""
    if cfg.task == "autoencoder":
        from ldm.training.autoencoder_module import AutoencoderModule

        return AutoencoderModule(
            autoencoder=build_autoencoder(cfg.model.autoencoder),
            loss=build_autoencoder_loss(cfg.model.loss),
            lr=cfg.optim.lr,
            disc_lr=cfg.optim.disc_lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            warmup_steps=cfg.optim.warmup_steps,
            lr_schedule=cfg.optim.schedule,
            min_lr_ratio=cfg.optim.min_lr_ratio,
            total_steps=max(cfg.trainer.max_steps, 0),
            gradient_clip_val=cfg.trainer.gradient_clip_val,
        )
    raise NotImplementedError(f"task '{cfg.task}' has no training module yet")


def build_trainer(cfg: DictConfig, path: Path, extra_callbacks: list[Any] | None = None
                  ) -> pl.Trainer:
    """``trainer`` (+ ``logging``) → ``pytorch_lightning.Trainer`` with our callbacks."""
    import pytorch_lightning as pl

    from ldm.training.callbacks import ImageLogger, SafetensorsCheckpoint
    from ldm.training.loggers import build_logger, define_step_metrics

    t = cfg.trainer
    config = to_container(cfg)
    logger = build_logger(cfg.logging.logger, path, cfg.run.name, cfg.logging.project,
                          cfg.logging.wandb_mode, config)
    define_step_metrics(logger)
    callbacks: list[Any] = [
        SafetensorsCheckpoint(path / "checkpoints", config, t.ckpt_every_n_steps, t.keep_last_k),
        ImageLogger(path / "images", cfg.logging.image_every_n_steps, cfg.logging.num_images),
        *(extra_callbacks or []),
    ]
    manual = cfg.task == "autoencoder"  # manual optimisation clips inside the module
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
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
