"""Checkpoint callbacks: safetensors checkpoints (atomic, keep-last-K, `last`, saving on a stop
signal) and the RNG state a resume restores (image grids, throughput: ldm.training.monitors).

A LightningModule used with these callbacks provides:

- ``checkpoint_kind``: ``"autoencoder"`` or ``"ldm"``;
- ``export_modules() -> dict[str, state_dict]``: the weights a checkpoint carries.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.checkpoint.format import save_checkpoint
from ldm.data.datamodule import request_stop
from ldm.data.pipe import ShardReadTimeout
from ldm.training.nonfinite import ADVICE, NonFiniteLossError, non_finite_tensors

log = logging.getLogger(__name__)


def _replace_link(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s content atomically (hard link, or copy when links fail)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        try:
            tmp.write_bytes(src.read_bytes())
        except BaseException:  # e.g. a full disk: no partial copy stays behind
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, dst)


RESUME_NAME = "resume.ckpt"


def remove_stale_temporaries(dirpath: Path) -> list[Path]:
    """Delete the temporary files a process killed mid-save left in a checkpoint directory
    (``.step-….tmp``, ``.resume.ckpt.tmp``, ``.last.safetensors.tmp``); returns them."""
    stale = [p for p in Path(dirpath).glob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted save", path)
    return stale


def _at_last_batch(trainer: pl.Trainer) -> bool:
    """Whether the batch that just ended was its epoch's last (Lightning prefetches one)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class SafetensorsCheckpoint(pl.Callback):
    """Write ``<dir>/step-XXXXXXXX.safetensors`` every N steps and at the end; keep the last K.

    ``<dir>/last.safetensors`` always names the newest complete checkpoint. Every file carries
    the resolved config, so it is enough to sample from. Alongside, ``<dir>/resume.ckpt`` holds
    the full training state (optimizer, LR schedule, EMA, loop progress, RNG and data position)
    for ``train.py --resume``; it is a Lightning checkpoint of tensors and plain values only, read
    back with ``weights_only=True``. Both are written atomically; the temporaries of a save
    that was killed are removed at the next start, and weights that are not finite are never
    written. A save due at an epoch's last batch is written when the epoch has ended, so a
    resume from it starts the next epoch instead of replaying an empty one. On SIGTERM (e.g.
    SLURM preemption; Lightning raises ``SIGTERMException`` at the next batch boundary), SIGINT
    or SIGUSR1, the state is saved before the process exits; DataLoader workers survive SIGTERM
    and SIGINT (:func:`ldm.data.shards.defer_stop_signals`), so a signal to the whole process
    group saves too. A signal that arrives while the run waits for a batch (which a hanging
    ``pipe:`` reader may never deliver) raises :class:`ldm.data.datamodule.StopRequested` there
    and saves at once.
    """

    def __init__(
        self, dirpath: str | Path, config: dict[str, Any], every_n_steps: int, keep_last_k: int = 3
    ) -> None:
        self.dirpath = Path(dirpath)
        self.config = config
        self.every_n_steps = every_n_steps
        self.keep_last_k = keep_last_k
        self._last_saved_step = -1
        self._stop_signal: str | None = None
        self._save_at_epoch_end = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import signal

        if stage != "fit":
            return
        # Lightning handles SIGUSR1 itself under SLURM auto-requeue; elsewhere it means "save
        # and stop" (the usual pre-emption warning signal). SIGINT (Ctrl+C, which reaches the
        # whole foreground process group) saves and stops too; a second one interrupts at once.
        # SIGTERM is Lightning's: it raises SIGTERMException at the next batch (on_exception).
        if trainer.is_global_zero:
            remove_stale_temporaries(self.dirpath)
        self._previous_sigint = self._previous_sigterm = None
        self._fitting = True
        request_stop(None)
        try:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                # Lightning adds its handler in front of this one (it keeps existing handlers).
                self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGUSR1, lambda *_: self._request_stop("SIGUSR1"))
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread
            pass

    @property
    def stop_signal(self) -> str | None:
        """The signal (``SIGINT``, ``SIGUSR1``) that made this run save and stop, if any."""
        return self._stop_signal

    def _request_stop(self, name: str) -> None:
        self._stop_signal = name
        request_stop(name)  # raises StopRequested if waiting for data, perhaps forever

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_signal == "SIGINT":  # the second Ctrl+C
            raise KeyboardInterrupt
        self._request_stop("SIGINT")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        import signal

        if not getattr(self, "_fitting", False):  # after fit: the default (or earlier) handler
            signal.signal(signal.SIGTERM, self._previous_sigterm or signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        request_stop("SIGTERM")  # Lightning's handler ran first and noted it

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import signal

        self._fitting = False
        request_stop(None)
        for signum, name in (
            (signal.SIGINT, "_previous_sigint"),
            (signal.SIGTERM, "_previous_sigterm"),
        ):
            if getattr(self, name, None) is not None:
                try:
                    signal.signal(signum, getattr(self, name))
                except ValueError:
                    pass
                setattr(self, name, None)

    def save_resume_state(self, trainer: pl.Trainer) -> Path:
        """Write the full training state to ``resume.ckpt`` (all ranks call; rank 0 writes)."""
        final = self.dirpath / RESUME_NAME
        tmp = self.dirpath / f".{RESUME_NAME}.tmp"
        try:
            trainer.save_checkpoint(tmp, weights_only=False)  # the full state
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
        except BaseException as e:  # e.g. a full disk: leave no partial file behind
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
            if isinstance(e, OSError) and not e.filename:
                raise OSError(e.errno, e.strerror, str(final)) from e
            raise
        trainer.strategy.barrier("resume-checkpoint")
        return final

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Save now (rank 0 writes; all ranks must call for sharded strategies)."""
        step = trainer.global_step
        if step == self._last_saved_step:
            return None
        modules = pl_module.export_modules()
        bad = non_finite_tensors(modules)
        if bad:  # never replace a good checkpoint with NaN weights (every rank sees the same)
            raise NonFiniteLossError(
                f"the weights at step {step} are non-finite ({len(bad)} tensors, e.g. {bad[0]}), "
                f"so they were not saved: {ADVICE}; the run's last finite checkpoint is kept"
            )
        self._last_saved_step = step
        self.save_resume_state(trainer)
        if not trainer.is_global_zero:
            return None
        path = self.dirpath / f"step-{step:08d}.safetensors"
        save_checkpoint(
            path,
            modules,
            self.config,
            pl_module.checkpoint_kind,
            extra={"step": step, "epoch": trainer.current_epoch},
        )
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

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            if _at_last_batch(trainer):
                # Saved here, the loop state reads "inside an epoch whose batches are all
                # consumed": Lightning, not knowing the epoch's length, would replay an empty
                # epoch on resume and shift every later epoch's data. Once the epoch has ended
                # the state reads "epoch done" and resumes at the next epoch's first batch.
                self._save_at_epoch_end = True
            else:
                self.save(trainer, pl_module)
        if trainer.received_sigterm and _at_last_batch(trainer):
            # Lightning raises SIGTERMException only once this epoch is counted complete, a
            # state a resume would misread: save when the epoch ends, as above.
            self._save_at_epoch_end = True
        if self._stop_signal:
            log.warning("%s: saving a checkpoint at step %d and stopping", self._stop_signal, step)
            if _at_last_batch(trainer):  # as above: saved once the epoch has ended
                self._save_at_epoch_end = True
                trainer.should_stop = True
                return
            self.save(trainer, pl_module)
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.fast_dev_run:
            self.save(trainer, pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._fitting = False  # Lightning's teardown puts our SIGTERM handler back alone
        request_stop(None)
        if isinstance(exception, SIGTERMException | ShardReadTimeout) and not trainer.fast_dev_run:
            what = getattr(exception, "signal_name", "SIGTERM")
            if isinstance(exception, ShardReadTimeout):
                what = "a stalled shard reader"
            log.warning(
                "%s: saving a checkpoint at step %d before exiting", what, trainer.global_step
            )
            self.save(trainer, pl_module)
        if isinstance(exception, NonFiniteLossError) and not trainer.fast_dev_run:
            # The skipped steps left the weights as they were: keep the progress made since
            # the last save (a save refuses weights that are themselves non-finite).
            try:
                self.save(trainer, pl_module)
            except NonFiniteLossError as refused:
                log.error("%s", refused)


class RNGState(pl.Callback):
    """Saves and restores python, numpy and torch (CPU and CUDA) RNG states with the resume
    checkpoint, so a resumed run draws the same timesteps, noise and dropout masks."""

    def state_dict(self) -> dict[str, Any]:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": {
                "kind": kind,
                "keys": torch.from_numpy(keys.astype("int64")),
                "pos": pos,
                "has_gauss": has_gauss,
                "cached": cached,
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        import random

        import numpy as np

        python = state_dict["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        n = state_dict["numpy"]
        np.random.set_state(
            (n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"])
        )
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
