"""Progress for people: a bar on a terminal, plain lines when output goes to a file.

On a terminal, Lightning's rich bar, described as ``Epoch 0 (of 500 steps)`` for a step-bounded
run instead of Lightning's ``Epoch 0/-2``. When stdout is not a terminal
(``nohup``, SLURM, ``| tee``, a CI log), no bar at all: a bar there is one unreadable line of
carriage returns, or silence until the epoch ends. Instead :class:`ProgressLines` prints one line
every so often::

    step 120/500  loss 0.1234  3.21 it/s  elapsed 0:00:37  ETA 0:01:58
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichProgressBar

from ldm.console import is_terminal, progress_line


class ProgressLines(pl.Callback):
    """Print a progress line at step 1, then every ``every_n_steps`` steps or ``every_s``
    seconds, whichever comes first, and a last one when training ends (rank 0 only).

    Args:
        every_n_steps: Step interval (0: time only).
        every_s: Longest silence in seconds.
        stream: Where the lines go (default stdout).
    """

    def __init__(
        self, every_n_steps: int = 50, every_s: float = 30.0, stream: TextIO | None = None
    ) -> None:
        self.every_n_steps = every_n_steps
        self.every_s = every_s
        self.stream = stream
        self._start: tuple[float, int] | None = None
        self._last_print = 0.0
        self._last_step = -1

    def _loss(self, trainer: pl.Trainer, outputs: Any) -> float | None:
        value = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(value, torch.Tensor):
            metrics = trainer.callback_metrics
            value = next(
                (metrics[k] for k in ("train/loss", "train/rec_loss", "loss") if k in metrics), None
            )
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.detach())
        return None

    def _print(self, trainer: pl.Trainer, loss: float | None) -> None:
        now = time.perf_counter()
        assert self._start is not None
        t0, step0 = self._start
        step = trainer.global_step
        elapsed = now - t0
        rate = (step - step0) / elapsed if elapsed > 0 else 0.0
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        print(
            progress_line(step, total, loss, rate, elapsed),
            file=self.stream or sys.stdout,
            flush=True,
        )
        self._last_print = now
        self._last_step = step

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        self._last_print = self._start[0]

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        step = trainer.global_step
        due = (
            step - self._start[1] == 1
            or (self.every_n_steps > 0 and step % self.every_n_steps == 0)
            or time.perf_counter() - self._last_print >= self.every_s
        )
        if due:
            self._print(trainer, self._loss(trainer, outputs))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            trainer.is_global_zero
            and self._start is not None
            and trainer.global_step != self._last_step
        ):
            self._print(trainer, self._loss(trainer, None))


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, described by steps when the run is bounded by ``max_steps``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:  # the bar counts this epoch's batches
            description = f"Epoch {current_epoch} (of {trainer.max_steps} steps)"
        elif trainer.max_epochs is not None and trainer.max_epochs > 0:
            description = f"Epoch {current_epoch}/{trainer.max_epochs - 1}"
        else:
            description = f"Epoch {current_epoch}"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description


def progress_callbacks(enabled: bool, every_n_steps: int) -> tuple[list[pl.Callback], bool]:
    """The progress callbacks of a run and whether Lightning's own bar is enabled.

    ``enabled`` is ``trainer.enable_progress_bar``: off means no progress output at all.
    """
    if not enabled:
        return [], False
    if is_terminal():
        import importlib.util

        if importlib.util.find_spec("rich") is None:  # Lightning's tqdm bar has no "/-2"
            return [], True
        return [StepProgressBar()], True
    return [ProgressLines(every_n_steps=every_n_steps)], False
