"""Reading diffusers SDXL folders (``unet/`` with ``addition_embed_type="text_time"``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``, ``tokenizer_2/``, ``scheduler/``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.checkpoint.diffusers_layout import (
    _load_component,
    diffusion_section,
    read_json,
    read_weights,
)
from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.sdxl_keys import (
    is_sdxl_unet_config,
    sdxl_unet_diffusers_to_ldm,
    sdxl_unet_kwargs_from_diffusers_config,
)
from ldm.checkpoint.vae_keys import vae_config_diffusers_to_ldm, vae_diffusers_to_ldm
from ldm.diffusion import NoiseSchedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioner import SDXLConditioner
from ldm.models.sdxl import SDXLLatentDiffusion
from ldm.models.unet import UNetModel


def is_sdxl_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers folder whose U-Net is SDXL-style."""
    config = Path(path) / "unet" / "config.json"
    return config.is_file() and is_sdxl_unet_config(read_json(config))


def sdxl_folder_config(
    path: str | Path, cfg: DictConfig | Mapping[str, Any] | None = None
) -> DictConfig:
    """``cfg`` with an SDXL folder's sections merged over it: ``model.unet`` (SDXL layout),
    ``model.autoencoder`` (scale factor = the VAE's ``scaling_factor``), ``model.diffusion``,
    ``data.image_size`` and the scheduler's ``sampling.timestep_spacing``. The text encoders
    come from the folder itself (:meth:`SDXLConditioner.from_diffusers_folder`): the config says
    ``model.text_encoder.kind: sdxl`` (training from it needs ``name_or_path`` = the folder).

    Raises:
        CheckpointError: Not an SDXL folder, or a U-Net/VAE config outside what we implement.
    """
    from ldm.config import load

    root = Path(path)
    if not is_sdxl_folder(root):
        raise CheckpointError(f"{root} is not a diffusers SDXL folder")
    unet_cfg = read_json(root / "unet" / "config.json")
    vae_cfg = read_json(root / "vae" / "config.json")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    try:
        unet = sdxl_unet_kwargs_from_diffusers_config(unet_cfg)
        autoencoder = vae_config_diffusers_to_ldm(vae_cfg)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{root}: {e}") from None
    unet.update(resblock_updown=False, conv_resample=True)
    autoencoder["scale_factor"] = float(vae_cfg.get("scaling_factor", 0.13025))
    folder: dict[str, Any] = {"task": "ldm", "model": {
        "unet": unet, "autoencoder": autoencoder, "autoencoder_ckpt": None,
        "diffusion": diffusion_section(scheduler), "use_context_mask": False,
        "text_encoder": {"kind": "sdxl"}}}  # fmt: skip
    if unet_cfg.get("sample_size"):
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        folder["data"] = {"image_size": int(unet_cfg["sample_size"]) * factor}
    if scheduler.get("timestep_spacing"):
        folder["sampling"] = {"timestep_spacing": scheduler["timestep_spacing"]}
    base = OmegaConf.create({} if cfg is None else cfg)
    merged = OmegaConf.merge(base, OmegaConf.create(folder))
    # The folder's own two encoders condition the model; model.text_encoder is unused, so the
    # context-width check against it does not apply.
    return load(base=OmegaConf.to_container(merged, resolve=True), consistency=False)


def load_sdxl_folder(path: str | Path) -> SDXLLatentDiffusion:
    """An :class:`SDXLLatentDiffusion` (eval mode) from a diffusers SDXL folder; U-Net and VAE
    load with ``strict=True``, the VAE keeps the folder's ``scaling_factor`` (SDXL: 0.13025).
    A refiner folder (``text_encoder`` null in ``model_index.json``) has the second encoder only;
    ``force_zeros_for_empty_prompt`` there says whether empty prompts condition on zeros.

    Raises:
        CheckpointError: Not an SDXL folder, or weights that do not match their configs.
        FileNotFoundError: A text encoder or tokenizer folder is missing.
    """
    root = Path(path)
    if not is_sdxl_folder(root):
        raise CheckpointError(
            f"{root} is not a diffusers SDXL folder (unet/config.json with "
            "addition_embed_type 'text_time')"
        )
    unet_kw = sdxl_unet_kwargs_from_diffusers_config(read_json(root / "unet" / "config.json"))
    unet = UNetModel(**unet_kw)
    weights = read_weights(root / "unet")
    _load_component(root / "unet", unet, lambda: sdxl_unet_diffusers_to_ldm(weights, unet_kw))
    vae_cfg = read_json(root / "vae" / "config.json")
    autoencoder = AutoencoderKL(**vae_config_diffusers_to_ldm(vae_cfg))
    vae = read_weights(root / "vae")
    _load_component(root / "vae", autoencoder, lambda: vae_diffusers_to_ldm(
        vae, scale_factor=vae_cfg.get("scaling_factor", 0.13025)))  # fmt: skip
    d = diffusion_section(read_json(root / "scheduler" / "scheduler_config.json"))
    schedule = NoiseSchedule(schedule=d["schedule"], num_timesteps=d["num_timesteps"],
                             beta_start=d["beta_start"], beta_end=d["beta_end"],
                             zero_terminal_snr=d["zero_terminal_snr"])  # fmt: skip
    model = SDXLLatentDiffusion(unet, autoencoder, SDXLConditioner.from_diffusers_folder(root),
                                schedule, d["prediction"])  # fmt: skip
    index = root / "model_index.json"  # the refiner's pipeline encodes "" (false there)
    if index.is_file():
        model.zero_empty_prompts = bool(read_json(index).get("force_zeros_for_empty_prompt", True))
    return model.eval()
