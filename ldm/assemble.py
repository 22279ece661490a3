"""Models from original SD single files and diffusers folders: built here, filled by ldm.checkpoint.

``ldm.checkpoint`` holds file formats and key maps only (DESIGN.md); it never builds a model.
This module builds the model a config describes (on the meta device: every weight is loaded next)
and hands it to the checkpoint loader of its format; ``load_for_sampling`` does so for any
supported checkpoint (ours, SD/SDXL single files, diffusers folders). ``sample.py``, the export,
the demo and ``ldm.pretrained`` use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldm import build
from ldm.checkpoint.diffusers_layout import load_diffusers_folder, resolve_folder_config
from ldm.checkpoint.format import CheckpointError, load_checkpoint
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


def load_for_sampling(
    path: str | Path,
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    use_ema: bool = True,
) -> tuple[LatentDiffusion, DictConfig]:
    """A ``LatentDiffusion`` (eval mode) and its config from any supported checkpoint.

    Args:
        path: One of our ``ldm`` checkpoints, an original Stable Diffusion single file
            (``.safetensors``/``.ckpt``) or a diffusers-layout folder.
        config_files: Configs merged over the checkpoint's own or the folder's (required for
            SD files, which carry none, e.g. ``configs/ldm/sd1.yaml``): they win over what the
            checkpoint or folder says, except for what its weights fix (`ldm.config_sources`).
        overrides: ``key=value`` overrides (win over everything).
        use_ema: Use EMA U-Net weights when the checkpoint has them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Not a diffusion checkpoint (e.g. an autoencoder-only one).
    """
    from ldm.checkpoint.format import FORMAT, read_metadata
    from ldm.config import load

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    from ldm.checkpoint.sdxl_layout import is_sdxl_folder

    if path.is_dir() and is_sdxl_folder(path):
        from ldm.checkpoint.sdxl_layout import load_sdxl_folder, sdxl_folder_config

        cfg = sdxl_folder_config(path, load(config_files, overrides))
        model = load_sdxl_folder(path)
    elif path.is_dir():
        from ldm.checkpoint.diffusers_layout import folder_config

        cfg = folder_config(path, config_files, overrides)  # the caller wins over the folder
        model = diffusers_folder_model(path, cfg)
    elif path.suffix == ".safetensors" and read_metadata(path).get("format") == FORMAT:
        ckpt = load_checkpoint(path)
        if ckpt.kind != "ldm":
            raise CheckpointError(
                f"{path} is a '{ckpt.kind}' checkpoint; sampling needs an 'ldm' checkpoint "
                "(train one with task=ldm)"
            )
        cfg = load(config_files, overrides, base=ckpt.config)
        model = build.load_latent_diffusion(ckpt, use_ema=use_ema)
    else:
        from ldm.checkpoint.sdxl_single_file import (
            check_not_sd_file_for_sdxl_config,
            check_refiner_config,
            is_sdxl_file,
            load_sdxl_single_file,
        )
        from ldm.consistency import check_consistency

        if not config_files:
            raise CheckpointError(
                f"{path} is an original Stable Diffusion file, which carries no config: pass "
                "-c configs/ldm/sd1.yaml (SD 1.x), -c configs/ldm/sd2.yaml (SD 2.x) or "
                "-c configs/ldm/sdxl.yaml (SDXL)"
            )
        # Whether the file and the config are of one family comes before the config's own
        # cross-section checks: a wrong -c is named as such, not by a symptom of it.
        cfg = load(config_files, overrides, consistency=False)
        sdxl = is_sdxl_file(path)
        if sdxl:
            check_refiner_config(path, cfg)
        else:
            check_not_sd_file_for_sdxl_config(path, cfg)
        check_consistency(cfg)
        if sdxl:
            model = load_sdxl_single_file(
                path, cfg, cfg.model.text_encoder.name_or_path, use_ema=use_ema
            )
        else:
            model = sd_single_file_model(path, cfg, use_ema=use_ema)
    return model.eval(), cfg
