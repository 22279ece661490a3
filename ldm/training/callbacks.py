"""Callbacks: safetensors checkpoints (atomic, keep-last-K, `last`) and image grids.

A LightningModule used with these callbacks provides:

- ``checkpoint_kind``: ``"autoencoder"`` or ``"ldm"``;
- ``export_modules() -> dict[str, state_dict]``: the weights a checkpoint carries;
- ``log_images(batch) -> dict[str, tuple[Tensor, list[str] | None]]``: named image batches in
  [-1, 1] with optional per-image captions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from ldm.checkpoint.format import save_checkpoint
from ldm.images import caption_grid, make_grid, save_png

log = logging.getLogger(__name__)


def _replace_link(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s content atomically (hard link, or copy when links fail)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dst)


class SafetensorsCheckpoint(pl.Callback):
    """Write ``<dir>/step-XXXXXXXX.safetensors`` every N steps and at the end; keep the last K.

    ``<dir>/last.safetensors`` always names the newest complete checkpoint. Every file carries
    the resolved config, so it is enough to sample from or to resume the weights.
    """

    def __init__(self, dirpath: str | Path, config: dict[str, Any], every_n_steps: int,
                 keep_last_k: int = 3) -> None:
        self.dirpath = Path(dirpath)
        self.config = config
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self._last_saved_step = -1

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Save now (rank 0 writes; all ranks must call for sharded strategies)."""
        step = trainer.global_step
        if step == self._last_saved_step:
            return None
        modules = pl_module.export_modules()
        self._last_saved_step = step
        if not trainer.is_global_zero:
            return None
        path = self.dirpath / f"step-{step:08d}.safetensors"
        save_checkpoint(path, modules, self.config, pl_module.checkpoint_kind,
                        extra={"step": step, "epoch": trainer.current_epoch})
        _replace_link(path, self.dirpath / "last.safetensors")
        self._prune()
        log.info("saved checkpoint %s", path)
        return path

    def _prune(self) -> None:
        if self.keep_last_k <= 0:
            return
        steps = sorted(self.dirpath.glob("step-*.safetensors"))
        for old in steps[: -self.keep_last_k]:
            old.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
                           ) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.save(trainer, pl_module)


class ImageLogger(pl.Callback):
    """Every N steps (and on the first validation batch) save image grids as PNG and to wandb."""

    def __init__(self, dirpath: str | Path, every_n_steps: int, max_images: int = 8) -> None:
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.max_images = max_images
        self._last_step = -1

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, split: str
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
                    caption = "\n".join(captions) if captions else None
                    logger.log_image(key=f"{split}/{name}", images=[grid],
                                     caption=[caption] if caption else None, step=step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self._log(trainer, pl_module, batch, "train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking and self.every_n_steps > 0:
            self._log(trainer, pl_module, batch, "val")
