"""Writing an :class:`~ldm.models.sdxl.SDXLLatentDiffusion` as a diffusers
``StableDiffusionXLPipeline`` folder (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``text_encoder_2``, ``tokenizer_2``, ``scheduler``, ``model_index.json``)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ldm.checkpoint.diffusers_export import (
    MODEL_INDEX,
    _plain,
    _save_weights,
    _versioned,
    scheduler_config,
)
from ldm.checkpoint.sdxl_keys import (
    sdxl_unet_kwargs_to_diffusers_config,
    sdxl_unet_ldm_to_diffusers,
)
from ldm.checkpoint.vae_keys import vae_config_ldm_to_diffusers, vae_ldm_to_diffusers
from ldm.models.sdxl import SDXLLatentDiffusion
from ldm.models.text_encoders import no_transformers_bars


def export_sdxl_folder(
    model: SDXLLatentDiffusion, cfg: Mapping[str, Any], out_dir: str | Path, overwrite: bool = False
) -> Path:
    """Writes ``model`` as a diffusers SDXL folder.

    Args:
        model: The SDXL model (its U-Net weights as they are).
        cfg: Its config (``model.unet``, ``model.autoencoder``, ``model.diffusion``,
            ``sampling.timestep_spacing``, ``data.image_size``).
        out_dir: Output folder.
        overwrite: Allow a non-empty ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True)")
    m = _plain(cfg["model"])
    unet_kwargs, ae_kwargs = m["unet"], m["autoencoder"]
    factor = int(model.autoencoder.downsample_factor)
    image_size = int(_plain(cfg.get("data", {})).get("image_size", ae_kwargs["resolution"]))
    unet_config = sdxl_unet_kwargs_to_diffusers_config(unet_kwargs)
    unet_config["sample_size"] = image_size // factor
    _save_weights(sdxl_unet_ldm_to_diffusers(model.unet.state_dict(), unet_kwargs), out / "unet",
                  _versioned("UNet2DConditionModel", unet_config))  # fmt: skip
    scale = float(str(np.float32(model.autoencoder.scale_factor.item())))
    vae_config = vae_config_ldm_to_diffusers(**{**ae_kwargs, "scale_factor": scale})
    _save_weights(vae_ldm_to_diffusers(model.autoencoder.state_dict()), out / "vae",
                  _versioned("AutoencoderKL", vae_config))  # fmt: skip
    c = model.text_encoder
    index: dict[str, Any] = {}
    for name, encoder, tokenizer in (
        ("", c.text_encoder, c.tokenizer),
        ("_2", c.text_encoder_2, c.tokenizer_2),
    ):
        with no_transformers_bars():
            encoder.save_pretrained(out / f"text_encoder{name}")
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = c.max_length  # what diffusers pads to
        tokenizer.save_pretrained(out / f"tokenizer{name}")
        index[f"text_encoder{name}"] = ["transformers", type(encoder).__name__]
        index[f"tokenizer{name}"] = ["transformers", type(tokenizer).__name__]
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = scheduler_config(m["diffusion"], _plain(cfg.get("sampling", {})))
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = _versioned("StableDiffusionXLPipeline", {
        "vae": ["diffusers", "AutoencoderKL"], **index,
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
        "force_zeros_for_empty_prompt": bool(model.zero_empty_prompts),
    })  # fmt: skip
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out
