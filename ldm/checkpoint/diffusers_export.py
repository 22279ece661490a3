"""Export a ``LatentDiffusion`` to the diffusers layout, loadable by
``diffusers.StableDiffusionPipeline.from_pretrained(out_dir)``.

Written without importing diffusers: configs are JSON built by `unet_keys` / `vae_keys`, weights
are safetensors renamed by their key maps, the text encoder and tokenizer use transformers'
``save_pretrained``. `ldm.checkpoint.diffusers_layout` re-exports :func:`export_diffusers_folder`
and holds the loader and the CLI.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.checkpoint.unet_keys import unet_kwargs_to_diffusers_config, unet_ldm_to_diffusers
from ldm.checkpoint.vae_keys import vae_config_ldm_to_diffusers, vae_ldm_to_diffusers
from ldm.diffusion.grids import SCHEDULER_CLASSES

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ldm.models.latent_diffusion import LatentDiffusion

MODEL_INDEX = "model_index.json"
WEIGHTS_NAME = "diffusion_pytorch_model"
# our model.diffusion.schedule -> diffusers' beta_schedule (cosine = Nichol & Dhariwal 2021,
# clipped at 0.999, which diffusers calls squaredcos_cap_v2).
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}
# our model.diffusion.prediction -> diffusers' prediction_type.
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _plain(section: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    return copy.deepcopy(dict(section))


def _versioned(class_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers config dict: ``_class_name`` (+ ``_diffusers_version`` when installed)."""
    out: dict[str, Any] = {"_class_name": class_name}
    try:
        out["_diffusers_version"] = metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        pass
    return {**out, **config}


def scheduler_config(
    diffusion: Mapping[str, Any], sampling: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The diffusers scheduler config that samples as ``sampling`` does on ``model.diffusion``.

    The class is the one ``sampling.sampler`` reproduces (DDIM by default); every field that
    changes a sample is written: the schedule, ``prediction_type``, ``rescale_betas_zero_snr``,
    ``timestep_spacing``, ``steps_offset`` and, where the class has them, ``clip_sample`` (and
    its range), ``set_alpha_to_one``, ``use_karras_sigmas`` and ``final_sigmas_type``.
    """
    s = {
        "sampler": "ddim",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "karras": False,
        "final_sigma": "zero",
        "set_alpha_to_one": True,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        **(sampling or {}),
    }
    if diffusion.get("objective", "ddpm") == "flow":
        raise ValueError(
            "diffusers has no pipeline for a flow-matching U-Net (StableDiffusion"
            "Pipeline needs a DDPM-family scheduler, SD3/Flux take transformers): "
            "export needs model.diffusion.objective=ddpm"
        )
    cls = SCHEDULER_CLASSES[s["sampler"]]
    if int(s["steps_offset"]) != 1 or s["clip_sample"]:
        raise ValueError(
            "diffusers' StableDiffusionPipeline resets steps_offset to 1 and "
            "clip_sample to false when it loads a folder: export with "
            "sampling.steps_offset=1 sampling.clip_sample=false"
        )
    if cls == "HeunDiscreteScheduler" and diffusion["zero_terminal_snr"]:
        raise ValueError(
            "diffusers' HeunDiscreteScheduler has no rescale_betas_zero_snr: "
            "export a zero-terminal-SNR model with another sampling.sampler "
            "(e.g. sampling.sampler=euler)"
        )
    config: dict[str, Any] = {
        "num_train_timesteps": int(diffusion["num_timesteps"]),
        "beta_schedule": BETA_SCHEDULES[diffusion["schedule"]],
        "beta_start": float(diffusion["beta_start"]),
        "beta_end": float(diffusion["beta_end"]),
        "prediction_type": PREDICTION_TYPES[diffusion["prediction"]],
        "rescale_betas_zero_snr": bool(diffusion["zero_terminal_snr"]),
        "timestep_spacing": str(s["timestep_spacing"]),
        "steps_offset": int(s["steps_offset"]),
        "trained_betas": None,
    }
    if cls in ("DDIMScheduler", "DDPMScheduler"):
        config["clip_sample"] = bool(s["clip_sample"])
        config["clip_sample_range"] = float(s["clip_sample_range"])
    if cls == "DDIMScheduler":
        config["set_alpha_to_one"] = bool(s["set_alpha_to_one"])
    if cls == "DDPMScheduler":
        config["variance_type"] = "fixed_small"
    if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler"):
        config["use_karras_sigmas"] = bool(s["karras"])
    if cls in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        config["final_sigmas_type"] = str(s["final_sigma"])
    if cls == "DPMSolverMultistepScheduler":
        config.update(
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
        )
    return _versioned(cls, config)


# Where transformers models keep their blocks (CLIP, BERT-likes, T5).
_BLOCK_LISTS = ("text_model.encoder.layers", "encoder.layers", "encoder.layer", "encoder.block")


def _block_list(model: nn.Module) -> tuple[nn.Module, str] | None:
    for path in _BLOCK_LISTS:
        *parents, leaf = path.split(".")
        owner: Any = model
        for name in parents:
            owner = getattr(owner, name, None)
        if isinstance(getattr(owner, leaf, None), nn.ModuleList):
            return owner, leaf
    return None


def diffusers_text_model(text_encoder: nn.Module) -> nn.Module:
    """The text encoder's transformers model as diffusers' pipeline runs it: the pipeline
    conditions on ``text_encoder(ids, attention_mask)[0]`` (``last_hidden_state``), passing the
    mask only when the model's config says ``use_attention_mask``.

    A ``layer`` other than ``last`` exports as a copy holding only the blocks that layer runs
    (``hidden_states[k]`` then the encoder's inner-layer norm is ``last_hidden_state`` of the
    first k blocks for CLIP, BERT-likes and T5: the SD2 ``text_encoder`` layout); an encoder that
    sees its padding mask (BERT-likes, T5) is written with ``use_attention_mask: true``. The
    result is checked on a probe prompt against our encoder.

    Raises:
        ValueError: One line saying why diffusers would condition differently (not a transformers
            model, blocks that cannot be cut, or a probe that differs).
    """
    model = getattr(text_encoder, "model", None)
    kind = type(text_encoder).__name__
    if model is None or not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise ValueError(
            f"{kind} does not export: diffusers' pipeline loads a transformers "
            "text model; use model.text_encoder.kind clip, hf or t5"
        )
    num_blocks, blocks = int(text_encoder.num_blocks), int(text_encoder.blocks)
    pass_mask = bool(getattr(text_encoder, "pass_attention_mask", False))
    if blocks != num_blocks or pass_mask:
        model = copy.deepcopy(model)
    if blocks != num_blocks:
        found = _block_list(model)
        if found is None:
            raise ValueError(
                f"{type(model).__name__} keeps its blocks where export cannot cut "
                f"them to layer={text_encoder.layer}; train with "
                "model.text_encoder.layer=last to export"
            )
        owner, leaf = found
        setattr(owner, leaf, getattr(owner, leaf)[:blocks])
        for name in ("num_hidden_layers", "num_layers"):
            if hasattr(model.config, name):
                setattr(model.config, name, blocks)
    if pass_mask:
        model.config.use_attention_mask = True  # diffusers' encode_prompt reads this flag
    tokens = text_encoder.tokenize(["a probe prompt", ""])
    with torch.no_grad():
        ours = text_encoder.encode_tokens(tokens.ids, tokens.mask)
        out = model(tokens.ids, attention_mask=tokens.mask.long() if pass_mask else None)[0]
    err = (out.float() - ours.float()).abs().max().item()
    if not err <= 1e-5 * max(1.0, ours.abs().max().item()):
        raise ValueError(
            f"diffusers would condition on the last_hidden_state of the exported "
            f"{type(model).__name__}, which differs from layer="
            f"{text_encoder.layer} by {err:.2e} (a final norm ours does not apply); "
            "train with model.text_encoder.layer=last to export"
        )
    return model


def _save_weights(state: Mapping[str, Tensor], folder: Path, config: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(folder / f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})


def export_diffusers_folder(
    model: LatentDiffusion,
    cfg: DictConfig | Mapping[str, Any],
    out_dir: str | Path,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a diffusers ``StableDiffusionPipeline`` folder.

    Args:
        model: The model (its U-Net weights as they are: load EMA weights first to export them).
        cfg: Its config (``model.unet``, ``model.autoencoder``, ``model.diffusion``,
            ``model.text_encoder``, ``sampling`` (the scheduler), ``data.image_size``).
        out_dir: Output folder.
        overwrite: Allow a non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: What diffusers' pipeline cannot express: a non-CLIP text encoder, a context
            mask, or a U-Net/autoencoder outside the SD family.
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
    m = _plain(cfg["model"])
    scheduler = scheduler_config(m["diffusion"], _plain(cfg.get("sampling", {})))  # refuse early
    if getattr(model, "use_context_mask", False):
        raise ValueError(
            "this model was trained with model.use_context_mask=true (cross-"
            "attention ignores padding tokens) but diffusers' StableDiffusionPipeline "
            "passes no encoder_attention_mask, so it would sample differently; only "
            "models trained with model.use_context_mask=false export (sample this "
            "one with sample.py)"
        )
    text_model = diffusers_text_model(model.text_encoder)
    unet_kwargs, ae_kwargs = m["unet"], m["autoencoder"]
    factor = int(model.autoencoder.downsample_factor)
    image_size = int(_plain(cfg.get("data", {})).get("image_size", ae_kwargs["resolution"]))

    unet_config = unet_kwargs_to_diffusers_config(unet_kwargs)
    unet_config["sample_size"] = image_size // factor
    unet_state = unet_ldm_to_diffusers(
        model.unet.state_dict(),
        unet_kwargs["channel_mult"],
        unet_kwargs["num_res_blocks"],
        unet_kwargs["attention_resolutions"],
    )
    _save_weights(unet_state, out / "unet", _versioned("UNet2DConditionModel", unet_config))

    # the buffer, not the config: scale_factor travels with the weights (DESIGN.md, 5); written
    # as the shortest decimal of its float32 value (0.18215, not 0.1821500062942505)
    scale = float(str(np.float32(model.autoencoder.scale_factor.item())))
    vae_config = vae_config_ldm_to_diffusers(**{**ae_kwargs, "scale_factor": scale})
    _save_weights(
        vae_ldm_to_diffusers(model.autoencoder.state_dict()),
        out / "vae",
        _versioned("AutoencoderKL", vae_config),
    )

    from ldm.models.text_encoders import no_transformers_bars

    with no_transformers_bars():
        text_model.save_pretrained(out / "text_encoder")
    tokenizer = copy.deepcopy(model.text_encoder.tokenizer)
    tokenizer.model_max_length = int(model.text_encoder.max_length)  # what diffusers pads to
    tokenizer.save_pretrained(out / "tokenizer")

    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")

    index = _versioned(
        "StableDiffusionPipeline",
        {
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", type(text_model).__name__],
            "tokenizer": ["transformers", type(tokenizer).__name__],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", scheduler["_class_name"]],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        },
    )
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out
