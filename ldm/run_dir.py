"""A run's directory: where it lives, and who owns it (one run per directory)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ldm.config import to_yaml


def run_dir(cfg: DictConfig) -> Path:
    """``<run.root>/<run.name>``."""
    return Path(cfg.run.root) / cfg.run.name


class RunDirError(ValueError):
    """A run directory that cannot be used for this run (one-line message with the fix)."""


def prepare_run_dir(cfg: DictConfig, resuming: bool = False) -> Path:
    """Create the run directory and write the resolved config into it (atomically).

    A directory that holds checkpoints, or the config of a different run, belongs to that run:
    only ``train.py --resume`` of it may write there, so a new run never overwrites another
    run's config or resume state, and pruning never deletes another run's checkpoints. A
    directory holding nothing but this very config (a run stopped before its first checkpoint)
    is started again.

    Raises:
        RunDirError: The directory holds another run and this is not a resume of it, or it
            cannot be created or written.
    """
    from ldm.checkpoint.format import atomic_write

    path = run_dir(cfg)
    text = to_yaml(cfg)
    config = path / "config.yaml"
    checkpoints = path / "checkpoints"
    saved = any(checkpoints.glob("*.safetensors")) or any(checkpoints.glob("*.ckpt"))
    other = config.is_file() and config.read_text() != text
    if (saved or other) and not resuming:
        raise RunDirError(
            f"run directory {path} already holds a run: continue it with --resume {path}, or "
            "start this one elsewhere (run.name=<new name> or run.root=<other folder>)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    except OSError as e:
        raise RunDirError(
            f"cannot write the run directory {path} ({e.strerror or e}): set run.root to a "
            "writable folder with free space"
        ) from None
    return path
