#!/usr/bin/env python
"""Train an autoencoder or a latent diffusion model from YAML configs.

    python train.py -c configs/autoencoder/kl-f8.yaml [-c more.yaml] [key=value ...]
    python train.py -c cfg.yaml --print-config      # show the resolved config and exit

The config's ``task`` says what is trained. Overrides use OmegaConf's dotlist syntax
(``optim.lr=2e-4``); the wandb agent's ``--optim.lr=2e-4`` style is accepted too.
"""

from __future__ import annotations

import argparse
import sys

from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError, load, to_yaml


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", default=[], metavar="YAML",
                        help="config file; repeat to merge several, later ones win")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") and "=" not in r]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    try:
        cfg = load(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0

    from ldm import build

    try:
        build.seed_everything(cfg.run.seed)
        cfg = build.resolve(cfg)
        path = build.prepare_run_dir(cfg)
        datamodule = build.build_datamodule(cfg)
        module = build.build_module(cfg, datamodule)
        trainer = build.build_trainer(cfg, path)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.fit(module, datamodule=datamodule)
    print(f"run directory: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
