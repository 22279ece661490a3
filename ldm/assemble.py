"""Models from original SD single files and diffusers folders: built here, filled by ldm.checkpoint.

``ldm.checkpoint`` holds file formats and key maps only (DESIGN.md); it never builds a model.
This module builds the model a config describes (on the meta device: every weight is loaded next)
and hands it to the checkpoint loader of its format. ``ldm.build.load_for_sampling`` and
``ldm.pretrained`` use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldm import build
from ldm.checkpoint.diffusers_layout import load_diffusers_folder, resolve_folder_config
from ldm.checkpoint.stable_diffusion import load_sd_single_file
from ldm.models.latent_diffusion import LatentDiffusion


def diffusers_folder_model(
    path: str | Path, cfg: DictConfig | Mapping[str, Any] | None = None
) -> LatentDiffusion:
    """A ``LatentDiffusion`` from a diffusers-layout folder (config: ``cfg`` with the folder's
    weight keys pinned; None: the folder's own).

    Raises:
        CheckpointError: Not a diffusers folder, unsupported components, or weights that do not
            match their configs.
    """
    cfg = resolve_folder_config(path, cfg)
    model = build.build_latent_diffusion(cfg, empty_weights=True)
    return load_diffusers_folder(path, cfg, model)


def sd_single_file_model(
    path: str | Path, cfg: DictConfig, use_ema: bool = True
) -> LatentDiffusion:
    """A ``LatentDiffusion`` from an original SD 1.x/2.x single file, built from ``cfg``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Unreadable file, missing parts, partial EMA, or weights that do not fit
            the config.
    """
    model = build.build_latent_diffusion(cfg, empty_weights=True)
    return load_sd_single_file(path, cfg, model, use_ema=use_ema)
