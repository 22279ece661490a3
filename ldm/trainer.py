"""The Lightning ``Trainer`` of a run, from its config: strategy, precision, logger, callbacks
(part of :mod:`ldm.build`, which re-exports everything here)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig

from ldm.config import to_container
from ldm.nn.host_memory import apply_host_memory
from ldm.training.optim import FP16_MIXED

if TYPE_CHECKING:
    import pytorch_lightning as pl

log = logging.getLogger(__name__)


#: Smallest positive normal float16: a smaller AdamW epsilon rounds to 0 in fp16 state.
_FP16_TINY = 6.2e-5


def runs_on_cpu(accelerator: str) -> bool:
    """Whether ``trainer.accelerator`` trains on the CPU here."""
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def check_precision(
    precision: str,
    accelerator: str,
    eps: float = 1e-8,
    implementation: str = "auto",
    gradient_clip_val: float | None = None,
) -> None:
    """Refuse precisions that cannot work: fp16 mixed precision on CPU (which Lightning would
    silently turn into bf16), ``16-true`` with an AdamW epsilon that rounds to zero in fp16
    (the first step then divides by zero and every weight becomes NaN), and the fused AdamW
    kernel with gradient clipping under fp16 loss scaling (it unscales the gradients inside its
    step, after Lightning would have to clip them).

    Raises:
        ConfigError: Naming the setting and what to use instead.
    """
    from ldm.config import ConfigError

    if str(precision) == "16-true" and eps < _FP16_TINY:
        raise ConfigError(
            f"trainer.precision=16-true keeps AdamW's state in fp16, where optim.eps={eps:g} "
            "rounds to 0 and the first step writes NaN weights: set optim.eps=1e-4, or use "
            "trainer.precision=bf16-true or 16-mixed"
        )
    if implementation == "fused" and gradient_clip_val and str(precision) in FP16_MIXED:
        raise ConfigError(
            f"optim.implementation=fused cannot clip gradients under trainer.precision="
            f"{precision} (the fused step unscales them itself): set optim.implementation=auto "
            "or foreach, or trainer.gradient_clip_val=null"
        )
    if runs_on_cpu(accelerator) and str(precision) in FP16_MIXED:
        raise ConfigError(
            f"trainer.precision={precision} needs a GPU (fp16 autocast does not run on the CPU, "
            "and Lightning would train in bf16 instead): use trainer.precision=bf16-mixed or 32"
        )


def build_profiler(kind: str, path: Path) -> Any:
    """``trainer.profiler`` → Lightning's profiler writing ``<path>/fit-profile.txt`` (None:
    off)."""
    if kind == "off":
        return None
    from pytorch_lightning.profilers import AdvancedProfiler, SimpleProfiler

    profiler = {"simple": SimpleProfiler, "advanced": AdvancedProfiler}[kind]
    return profiler(dirpath=str(path), filename="profile")


def build_quality_monitor(cfg: DictConfig) -> Any:
    """``quality`` → the training-time metrics callback, or None when disabled. Checks its
    settings (prompts, files), so call it before anything is written."""
    if not cfg.quality.every_n_steps:
        return None
    from ldm.build import build_sampler
    from ldm.training.quality import build_quality_monitor as build_monitor

    sampler = build_sampler(cfg.sampling, steps=cfg.quality.steps, disable_progress=True)
    return build_monitor(cfg, sampler)


def build_trainer(
    cfg: DictConfig, path: Path, extra_callbacks: list[Any] | None = None, resuming: bool = False
) -> pl.Trainer:
    """``trainer`` (+ ``logging``) → ``pytorch_lightning.Trainer`` with our callbacks.

    ``resuming``: the run continues from its resume checkpoint (wandb continues the same run).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.utilities import rank_zero_only

    from ldm.training.callbacks import RNGState, SafetensorsCheckpoint
    from ldm.training.checkpoint_io import StreamingCheckpointIO
    from ldm.training.loggers import build_logger, define_step_metrics
    from ldm.training.monitors import DataSkipLogger, ImageLogger, ThroughputMonitor
    from ldm.training.progress import progress_callbacks
    from ldm.training.quiet import quiet_expected_warnings
    from ldm.training.strategy import ExecutionOptions, build_strategy

    quiet_expected_warnings()
    t = cfg.trainer
    check_precision(
        t.precision, t.accelerator, cfg.optim.eps, cfg.optim.implementation, t.gradient_clip_val
    )
    if apply_host_memory(t.host_memory, runs_on_cpu(t.accelerator)):
        rank_zero_only(print)(
            f"host memory: freed blocks kept for reuse (trainer.host_memory={t.host_memory})"
        )
    config = to_container(cfg)
    strategy = build_strategy(
        t.strategy, find_unused_parameters=t.find_unused_parameters, fsdp_sharding=t.fsdp_sharding
    )
    logger = build_logger(
        cfg.logging.logger,
        path,
        cfg.run.name,
        cfg.logging.project,
        cfg.logging.wandb_mode,
        config,
        resume=resuming,
    )
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
    progress, bar = progress_callbacks(t.enable_progress_bar, t.log_every_n_steps)
    callbacks.extend(progress)
    manual = cfg.task == "autoencoder"  # manual optimisation clips inside the module
    plugins = None  # deepspeed saves and loads through its own engine
    if not t.strategy.startswith("deepspeed"):
        plugins = [StreamingCheckpointIO(own_optimizer_state=runs_on_cpu(t.accelerator))]
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
        enable_progress_bar=bar,
        enable_checkpointing=False,
        plugins=plugins,
        default_root_dir=str(path),
        profiler=build_profiler(t.profiler, path),
        logger=logger,
        callbacks=callbacks,
    )
