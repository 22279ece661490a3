#!/usr/bin/env python
"""Train an autoencoder or a latent diffusion model from YAML configs.

    python train.py -c configs/autoencoder/kl-f8.yaml [-c more.yaml] [key=value ...]
    python train.py -c cfg.yaml --print-config           # show the resolved config and exit
    python train.py --resume runs/my-run [key=value ...]  # continue an interrupted run
    python train.py -c cfg.yaml --sweep 'optim.lr=1e-4,2e-4' --sweep 'data.batch_size=8,16'

The config's ``task`` says what is trained. Overrides use OmegaConf's dotlist syntax
(``optim.lr=2e-4``); the wandb agent's ``--optim.lr=2e-4`` style is accepted too, so
``wandb agent`` can drive train.py directly (see configs/sweeps/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ldm.boundary import error_boundary
from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError, load, to_yaml


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="YAML",
        help="config file; repeat to merge several, later ones win",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR|CKPT",
        help="continue a run from its directory (or its resume.ckpt)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="local grid sweep axis (repeat for a product of axes)",
    )
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") and "=" not in r]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return args, rest


def resume_paths(target: str) -> tuple[Path, Path]:
    """(run config, resume checkpoint) of a run directory or a resume checkpoint path."""
    from ldm.training.callbacks import RESUME_NAME

    path = Path(target).absolute()
    ckpt = path if path.is_file() else path / "checkpoints" / RESUME_NAME
    run_dir = ckpt.parent.parent
    config = run_dir / "config.yaml"
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"no resume checkpoint at {ckpt} (runs save one every trainer.ckpt_every_n_steps steps)"
        )
    if not config.is_file():
        raise FileNotFoundError(f"no run config at {config}")
    check_resume_checkpoint(ckpt)
    return config, ckpt


def check_resume_checkpoint(ckpt: Path) -> None:
    """Refuse a damaged ``resume.ckpt`` (a zip archive, as torch.save writes) in one line.

    Raises:
        CheckpointError: The file is not a complete torch checkpoint.
    """
    import zipfile

    try:
        with zipfile.ZipFile(ckpt) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        names, reason = [], str(e)
    else:
        reason = "no data.pkl inside"
    if not any(name.endswith("/data.pkl") or name == "data.pkl" for name in names):
        raise CheckpointError(
            f"{ckpt} is damaged ({reason}): the run's step-*.safetensors files still hold "
            "its weights for sampling and export, but its training state cannot be resumed"
        )


def resume_location(ckpt: Path) -> list[str]:
    """Overrides that put a resumed run back into the directory it was resumed from (which may
    have moved, or been named relative to another working directory, since it was started)."""
    run_dir = ckpt.parent.parent
    return [f"run.root={run_dir.parent}", f"run.name={run_dir.name}"]


def fit(cfg: Any, resume_ckpt: Path | None = None) -> tuple[Path, dict[str, float]]:
    """Build everything from ``cfg`` and train; returns the run directory and final metrics."""
    from ldm import build
    from ldm.consistency import check_inputs_exist, check_trainable

    build.seed_everything(cfg.run.seed)
    check_trainable(cfg)  # nothing is written before the model and inputs are known to be fit
    check_inputs_exist(cfg)
    cfg = build.resolve(cfg)
    quality = build.build_quality_monitor(cfg)  # checks its files before the run dir exists
    path = build.prepare_run_dir(cfg, resuming=resume_ckpt is not None)
    datamodule = build.build_datamodule(cfg)
    module = build.build_module(cfg, datamodule)
    extra = {"extra_callbacks": [quality]} if quality else {}
    trainer = build.build_trainer(cfg, path, resuming=resume_ckpt is not None, **extra)
    stopped_by = _fit_until_signal(trainer, module, datamodule, resume_ckpt)
    if stopped_by:
        print(
            f"{stopped_by}: saved a resumable checkpoint at step {trainer.global_step}; "
            f"continue with: python train.py --resume {path}",
            flush=True,
        )
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return path, metrics


def _fit_until_signal(
    trainer: Any, module: Any, datamodule: Any, resume_ckpt: Path | None
) -> str | None:
    """``trainer.fit``; returns the signal that stopped it after saving (None: it finished)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from ldm.training.callbacks import SafetensorsCheckpoint

    try:
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=str(resume_ckpt) if resume_ckpt else None,
            weights_only=True,
        )
    except SIGTERMException as stop:  # the checkpoint callback saved in on_exception
        return getattr(stop, "signal_name", "SIGTERM")  # SIGINT/SIGUSR1 while waiting for data
    saver = next((c for c in trainer.callbacks if isinstance(c, SafetensorsCheckpoint)), None)
    return saver.stop_signal if saver is not None else None


@error_boundary
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        files: list[str | Path] = list(args.config)
        resume_ckpt = None
        if args.resume:
            run_config, resume_ckpt = resume_paths(args.resume)
            files = [run_config, *files]
            overrides = [*overrides, *resume_location(resume_ckpt)]
        cfg = load(files, overrides)
        if args.print_config:
            sys.stdout.write(to_yaml(cfg))
            return 0
        if args.sweep:
            return sweep(files, overrides, args.sweep, cfg)
        path, _ = fit(cfg, resume_ckpt)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.trainer.profiler != "off" and (profiles := sorted(path.glob("fit-profile*.txt"))):
        names = ", ".join(str(f) for f in profiles)  # one per rank under DDP
        print(f"time per training action (trainer.profiler={cfg.trainer.profiler}): {names}")
    print(f"run directory: {path}")
    return 0


def sweep(files: list[str | Path], overrides: list[str], axes: list[str], base: Any) -> int:
    """Run every combination of the sweep axes in turn and print a summary table."""
    from ldm.training.sweep import grid, run_name, summary_table, write_summary

    rows = []
    for i, combo in enumerate(grid(axes)):
        name = run_name(base.run.name, i, combo)
        cfg = load(files, [*overrides, *combo, f"run.name={name}"])
        print(f"=== sweep run {i + 1}: {name}: {' '.join(combo)}", flush=True)
        try:
            _, metrics = fit(cfg)
            rows.append({"name": name, "overrides": combo, "status": "ok", "metrics": metrics})
        except Exception as e:  # one failed trial must not lose the others
            print(f"sweep run {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"name": name, "overrides": combo, "status": "failed", "metrics": {}})
    path = write_summary(base.run.root, base.run.name, rows)
    print(summary_table(rows))
    print(f"sweep summary: {path}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
