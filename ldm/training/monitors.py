"""Monitoring callbacks: image grids (PNG and wandb), throughput, data skip counters.

A LightningModule used with :class:`ImageLogger` provides ``log_images(batch) -> dict[str,
tuple[Tensor, list[str] | None]]``: named image batches in [-1, 1] with optional per-image
captions.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ldm.images import caption_grid, make_grid, save_png

log = logging.getLogger(__name__)


class ImageLogger(pl.Callback):
    """Every N steps (and on the first validation batch) save image grids as PNG and to wandb."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, max_images: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self._last_step = -1

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, split: str
    ) -> None:
        if not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            named = pl_module.log_images(batch, max_images=self.max_images)
        pl_module.train(was_training)
        step = trainer.global_step
        for name, (images, captions) in named.items():
            nrow = min(len(images), 4)
            grid = make_grid(images, nrow=nrow)
            text = {"captions": caption_grid(captions, nrow)} if captions else None
            save_png(grid, self.dirpath / f"{split}_{name}_step{step:08d}.png", text)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    # Lightning's log_image zips every keyword with the images: a caption
                    # keyword must be a list as long as ``images``, or absent.
                    extra = {"caption": ["\n".join(captions)]} if captions else {}
                    logger.log_image(key=f"{split}/{name}", images=[grid], step=step, **extra)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self._log(trainer, pl_module, batch, "train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and self.every_n_steps > 0:
            self._log(trainer, pl_module, batch, "val")


class ThroughputMonitor(pl.Callback):
    """Log samples/s (images or cached latents), step time, peak memory and (on GPU) MFU.

    Args:
        batch_key: Batch entry whose length is the per-device batch size.
        flops_per_sample: Training FLOPs per sample (forward+backward), for MFU; 0 disables.
        peak_flops: Peak FLOP/s of one device (default: looked up for known GPUs).
    """

    PEAK_BF16 = {
        "H100": 989e12,
        "H200": 989e12,
        "A100": 312e12,
        "L40S": 362e12,
        "A10": 125e12,
        "4090": 165e12,
    }

    def __init__(
        self,
        batch_key: str = "image",
        flops_per_sample: float = 0.0,
        peak_flops: float | None = None,
    ) -> None:
        self.batch_key = batch_key
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self._t0: float | None = None

    def _peak(self) -> float | None:
        if self.peak_flops:
            return self.peak_flops
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        return next((v for k, v in self.PEAK_BF16.items() if k in name), None)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:

        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:

        if self._t0 is None:
            return
        cuda = torch.cuda.is_available() and pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        n = len(batch[self.batch_key]) if isinstance(batch, dict) and self.batch_key in batch else 0
        if not n and isinstance(batch, dict):
            n = len(next(iter(batch.values())))
        world = trainer.world_size
        metrics = {"perf/step_time_s": dt, "perf/images_per_s": n * world / dt}
        if cuda:
            metrics["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            peak = self._peak()
            if peak and self.flops_per_sample:
                metrics["perf/mfu"] = n * self.flops_per_sample / dt / peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(n, 1))


class DataSkipLogger(pl.Callback):
    """Log the datamodule's skipped-sample counts per reason (corrupt image, missing caption,
    truncated member, ...) every ``every_n_steps`` steps, summed over ranks."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = max(1, every_n_steps)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.global_step % self.every_n_steps or not hasattr(datamodule, "skipped_counts"):
            return
        counts = datamodule.skipped_counts("train")
        metrics = {f"data/skipped_{k}": float(v) for k, v in counts.items() if k != "ok"}
        metrics["data/skipped_total"] = float(sum(metrics.values()))
        pl_module.log_dict(
            metrics,
            on_step=True,
            on_epoch=False,
            reduce_fx="sum",
            sync_dist=trainer.world_size > 1,
            batch_size=1,
        )
