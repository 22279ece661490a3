"""Experiment loggers: wandb (online with a key, offline otherwise), CSV, or none.

wandb never prompts and never needs an account: with ``wandb_mode: auto`` it goes online only
when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry written by
``wandb login``), and otherwise runs in offline mode, writing to ``<run_dir>/wandb`` for a
later ``wandb sync``.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only


def wandb_has_key() -> bool:
    """Whether a wandb API key is configured (environment or netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` becomes ``online`` with a key and ``offline`` without; other modes pass."""
    if mode == "auto":
        return "online" if wandb_has_key() else "offline"
    return mode


def build_logger(
    kind: str,
    run_dir: str | Path,
    name: str,
    project: str = "ldm",
    wandb_mode: str = "auto",
    config: dict[str, Any] | None = None,
    resume: bool = False,
) -> Logger | bool:
    """The Lightning logger for a run.

    Args:
        kind: ``wandb``, ``csv`` or ``none``.
        run_dir: The run directory (logs go under it).
        name: Run name.
        project: wandb project.
        wandb_mode: ``auto``, ``online`` or ``offline``.
        config: The resolved run config, stored as the wandb run config / CSV hparams.
        resume: The run continues from its resume checkpoint: wandb logs into the same run
            (the id kept in ``<run_dir>/wandb/run-id``), so the curves are not split.

    Returns:
        A logger, or ``False`` for none.
    """
    run_dir = Path(run_dir)
    if kind == "none":
        return False
    if kind == "csv":
        logger = CSVLogger(save_dir=str(run_dir), name="logs", version="")
        if config:
            logger.log_hyperparams(config)
        return logger
    if kind != "wandb":
        raise ValueError(f"unknown logger '{kind}'; expected wandb, csv or none")
    mode = resolve_wandb_mode(wandb_mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"
    logger = FinishingWandbLogger(
        name=name,
        project=project,
        save_dir=str(run_dir),
        offline=mode == "offline",
        config=config or {},
        settings=_wandb_settings(),
        id=wandb_run_id(run_dir, resume),
        resume="allow",
    )
    return logger


RUN_ID_FILE = "run-id"


def wandb_run_id(run_dir: str | Path, resume: bool) -> str:
    """The wandb run id of a run directory: the saved one when resuming, else a new one (saved).

    Offline runs with the same id are synced into one wandb run (``wandb sync``).
    """
    import secrets
    import string

    path = Path(run_dir) / "wandb" / RUN_ID_FILE
    if resume and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # wandb's own id alphabet and length
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    if getattr(rank_zero_only, "rank", 0) == 0:  # only rank 0 logs to wandb
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id + "\n")
    return run_id


class FinishingWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that also finishes the wandb run when the trainer finalizes.

    Lightning leaves the run open until the process exits, so the next run in the same process
    (a local ``--sweep`` trial, a test) would be logged into the same wandb run, and a run's
    summary and exit record would only be written at interpreter exit. Rank 0 only, like every
    Lightning logger method that touches the experiment.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Lightning always passes ``anonymous`` to wandb.init, which warns that the setting has
        # no effect; leave it out.
        self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush as Lightning does, then finish the run (exit code 1 unless it succeeded)."""
        super().finalize(status)
        if self._experiment is not None and hasattr(self._experiment, "finish"):
            self._experiment.finish(exit_code=0 if status in ("success", "finished") else 1)


def _wandb_settings() -> Any:
    import wandb

    # No console capture (keeps Lightning's progress bar clean); no login prompt ever.
    return wandb.Settings(console="off", silent=True)


def define_step_metrics(logger: Logger | bool) -> None:
    """Declare ``trainer/global_step`` as every metric's x-axis so no point is dropped."""
    if isinstance(logger, WandbLogger):
        experiment = logger.experiment
        if hasattr(experiment, "define_metric"):
            experiment.define_metric("trainer/global_step")
            experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
