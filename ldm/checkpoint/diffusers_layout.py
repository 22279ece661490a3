"""diffusers-layout folders (``StableDiffusionPipeline.save_pretrained``): load and export.

A folder holds ``model_index.json`` and one sub-folder per component::

    unet/        config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    vae/         config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL)
    text_encoder/, tokenizer/                                        (transformers CLIP)
    scheduler/   scheduler_config.json

Loading reads the JSON configs into our config sections (:func:`diffusers_folder_config`),
merges the caller's ``-c`` files and overrides over them (:func:`folder_config`: the caller wins,
except for what the folder's weights fix, `WEIGHT_KEYS`); :mod:`ldm.assemble` builds the model
and :func:`load_diffusers_folder` fills the U-Net and autoencoder with ``strict=True`` through the
key maps in `unet_keys` / `vae_keys`. The text encoder and tokenizer
load from the folder itself (``model.text_encoder.name_or_path`` = the folder). diffusers itself
is not needed for either direction.

Export (:func:`export_diffusers_folder`, in `ldm.checkpoint.diffusers_export`) writes the same
layout, so
``diffusers.StableDiffusionPipeline.from_pretrained(folder)`` loads our models; the CLI is
``python -m ldm.export``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ldm.checkpoint.diffusers_export import (
    BETA_SCHEDULES,
    MODEL_INDEX,
    PREDICTION_TYPES,
    WEIGHTS_NAME,
    export_diffusers_folder,
)
from ldm.checkpoint.format import CheckpointError, assign_weights
from ldm.checkpoint.unet_keys import unet_diffusers_to_ldm, unet_kwargs_from_diffusers_config
from ldm.checkpoint.vae_keys import vae_config_diffusers_to_ldm, vae_diffusers_to_ldm
from ldm.diffusion.flow_sampling import FLOW_SCHEDULER_CLASSES
from ldm.diffusion.grids import SCHEDULER_CLASSES

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ldm.models.latent_diffusion import LatentDiffusion

__all__ = [
    "diffusers_folder_config",
    "export_diffusers_folder",
    "folder_config",
    "load_diffusers_folder",
    "resolve_folder_config",
]

CLIP_TEXT_CLASSES = ("CLIPTextModel",)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict (one-line CheckpointError when missing or malformed)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (not a diffusers-layout folder?)")
    try:
        return dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def read_weights(folder: Path) -> dict[str, Tensor]:
    """A component's weights: ``diffusion_pytorch_model.safetensors`` (or its ``.fp16`` variant),
    the sharded ``.safetensors.index.json`` form, or ``.bin`` read with
    ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    for name in (f"{WEIGHTS_NAME}.safetensors", f"{WEIGHTS_NAME}.fp16.safetensors"):
        if (folder / name).is_file():
            return load_file(str(folder / name))
    index = folder / f"{WEIGHTS_NAME}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    pickled = folder / f"{WEIGHTS_NAME}.bin"
    if pickled.is_file():
        try:
            return dict(torch.load(pickled, map_location="cpu", weights_only=True))
        except Exception as e:  # never fall back to unpickling code
            raise CheckpointError(
                f"{pickled} cannot be read with weights_only=True ({e})"
            ) from None
    raise CheckpointError(f"no {WEIGHTS_NAME}.safetensors (or .bin) in {folder}")


# a scheduler config value that changes samples in a way we do not reproduce: class (None: any),
# key, the class default, the value we reproduce
UNREPRODUCED = [
    (None, "thresholding", False, False),
    ("DDPMScheduler", "variance_type", "fixed_small", "fixed_small"),
    ("EulerDiscreteScheduler", "interpolation_type", "linear", "linear"),
    ("EulerDiscreteScheduler", "timestep_type", "discrete", "discrete"),
    (None, "use_exponential_sigmas", False, False),
    (None, "use_beta_sigmas", False, False),
    (None, "use_lu_lambdas", False, False),
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver++", "dpmsolver++"),
    ("DPMSolverMultistepScheduler", "solver_order", 2, 2),
    ("DPMSolverMultistepScheduler", "solver_type", "midpoint", "midpoint"),
    ("DPMSolverMultistepScheduler", "lower_order_final", True, True),
    ("DPMSolverMultistepScheduler", "euler_at_final", False, False),
    ("DPMSolverMultistepScheduler", "use_flow_sigmas", False, False),
]
SAMPLERS_OF_CLASSES = {v: k for k, v in SCHEDULER_CLASSES.items()}


FLOW_CLASSES = {v: k for k, v in FLOW_SCHEDULER_CLASSES.items()}


def flow_diffusion_section(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """``model.diffusion`` for a diffusers flow-matching scheduler (static shift only)."""
    for key, default in (
        ("use_dynamic_shifting", False),
        ("invert_sigmas", False),
        ("shift_terminal", None),
        ("use_karras_sigmas", False),
        ("use_exponential_sigmas", False),
        ("use_beta_sigmas", False),
        ("stochastic_sampling", False),
    ):
        if scheduler.get(key, default) != default:
            raise CheckpointError(
                f"scheduler {key}={scheduler.get(key)!r} ({scheduler.get('_class_name')}) is not "
                f'reproduced by our flow samplers; set "{key}": {json.dumps(default)} in '
                "scheduler_config.json"
            )
    return {
        "objective": "flow",
        "num_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "flow_shift": float(scheduler.get("shift", 1.0)),
    }


def sampling_section(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """``sampling`` keys a diffusers scheduler config fixes (missing keys: the class defaults).

    The class gives ``sampler`` (when one of ours reproduces it; others, e.g. PNDMScheduler,
    leave the sampler to the caller), and its fields ``timestep_spacing``,
    ``clip_sample_range`` (DDIM, DDPM), ``set_alpha_to_one`` (DDIM), ``karras``
    (``use_karras_sigmas``) and ``final_sigma`` (``final_sigmas_type``). ``steps_offset`` and
    ``clip_sample`` are 1 and false whatever the folder says, as `StableDiffusionPipeline` makes
    them.

    Raises:
        CheckpointError: A field set to a value whose sampling we do not reproduce.
    """
    cls = scheduler.get("_class_name")
    if cls in FLOW_CLASSES:  # flow grids have no spacing/offset options
        return {"sampler": FLOW_CLASSES[cls]}
    for owner, key, default, ours in UNREPRODUCED:
        if owner in (None, cls) and scheduler.get(key, default) != ours:
            raise CheckpointError(
                f"scheduler {key}={scheduler.get(key, default)!r} ({cls}) is not reproduced by "
                f'our samplers; set "{key}": {json.dumps(ours)} in scheduler_config.json'
            )
    # StableDiffusionPipeline (and its img2img/inpainting siblings) resets steps_offset to 1 and
    # clip_sample to false when it is built from a folder whose scheduler says otherwise: so does
    # sample.py (sampling.clip_sample=true still clips on request)
    out: dict[str, Any] = {
        "timestep_spacing": scheduler.get("timestep_spacing", "leading"),
        "steps_offset": 1,
    }
    if cls in SAMPLERS_OF_CLASSES:
        out["sampler"] = SAMPLERS_OF_CLASSES[cls]
    if cls in ("DDIMScheduler", "DDPMScheduler") or "clip_sample" in scheduler:
        out["clip_sample"] = False
        out["clip_sample_range"] = float(scheduler.get("clip_sample_range", 1.0))
    if cls == "DDIMScheduler" or "set_alpha_to_one" in scheduler:
        out["set_alpha_to_one"] = bool(scheduler.get("set_alpha_to_one", True))
    if "use_karras_sigmas" in scheduler or cls in SAMPLERS_OF_CLASSES:
        out["karras"] = bool(scheduler.get("use_karras_sigmas", False))
    if "final_sigmas_type" in scheduler or cls in SAMPLERS_OF_CLASSES:
        out["final_sigma"] = str(scheduler.get("final_sigmas_type", "zero"))
    return out


def diffusion_section(scheduler: Mapping[str, Any]) -> dict[str, Any]:
    """``model.diffusion`` keys from a diffusers scheduler config (defaults as DDIMScheduler).

    A ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` gives
    ``objective: flow`` with its static ``shift`` (`ldm.diffusion.flow`).
    """
    if str(scheduler.get("_class_name", "")) in FLOW_CLASSES:
        return flow_diffusion_section(scheduler)
    if scheduler.get("trained_betas") is not None:
        raise CheckpointError("scheduler trained_betas (explicit betas) are not supported")
    beta_schedule = scheduler.get("beta_schedule", "linear")
    schedules = {v: k for k, v in BETA_SCHEDULES.items()}
    predictions = {v: k for k, v in PREDICTION_TYPES.items()}
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if beta_schedule not in schedules or prediction_type not in predictions:
        raise CheckpointError(
            f"unsupported scheduler beta_schedule={beta_schedule!r} or prediction_type="
            f"{prediction_type!r} (supported: {', '.join(schedules)}; {', '.join(predictions)})"
        )
    return {
        "num_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "schedule": schedules[beta_schedule],
        "beta_start": float(scheduler.get("beta_start", 0.0001)),
        "beta_end": float(scheduler.get("beta_end", 0.02)),
        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)),
        "prediction": predictions[prediction_type],
    }


def text_encoder_section(root: Path) -> dict[str, Any]:
    """``model.text_encoder`` for the folder's CLIP text encoder and tokenizer.

    diffusers' SD pipelines condition on ``last_hidden_state`` without a padding mask, so
    ``layer`` is ``last`` (SD2 folders ship a text encoder whose last layer is SD2's penultimate).
    ``max_length`` is the tokenizer's ``model_max_length`` (the length diffusers pads to), at most
    the model's positions.
    """
    config = read_json(root / "text_encoder" / "config.json")
    architectures = config.get("architectures") or []
    if (
        not any(a in CLIP_TEXT_CLASSES for a in architectures)
        and config.get("model_type") != "clip_text_model"
    ):
        raise CheckpointError(
            f"{root / 'text_encoder'} is not a CLIPTextModel "
            f"({architectures or config.get('model_type')})"
        )
    positions = int(config.get("max_position_embeddings", 77))
    tokenizer = root / "tokenizer" / "tokenizer_config.json"
    length = (
        read_json(tokenizer).get("model_max_length", positions)
        if tokenizer.is_file()
        else positions
    )
    return {
        "kind": "clip",
        "name_or_path": str(root.resolve()),
        "max_length": min(int(length), positions),
        "layer": "last",
    }


def diffusers_folder_config(path: str | Path) -> dict[str, Any]:
    """Our config sections for a diffusers-layout folder (plain containers).

    Sets ``task``, ``model.unet``, ``model.autoencoder`` (its ``scale_factor`` is the VAE's
    ``scaling_factor``), ``model.diffusion`` (schedule and prediction), ``model.text_encoder``,
    ``model.use_context_mask`` (false), ``data.image_size`` (the U-Net's ``sample_size`` in
    pixels) and the ``sampling`` keys of its scheduler (:func:`sampling_section`).

    Raises:
        CheckpointError: Not a diffusers folder, or components outside the SD family.
    """
    root = Path(path)
    index = read_json(root / MODEL_INDEX)
    missing = [
        c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in index
    ]
    if missing:
        raise CheckpointError(f"{root / MODEL_INDEX} lacks components {', '.join(missing)}")
    unet_config = read_json(root / "unet" / "config.json")
    vae_config = read_json(root / "vae" / "config.json")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    try:
        unet = unet_kwargs_from_diffusers_config(unet_config)
        autoencoder = vae_config_diffusers_to_ldm(vae_config)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{root}: {e}") from None
    unet.update(resblock_updown=False, conv_resample=True)  # all diffusers can express
    config: dict[str, Any] = {
        "task": "ldm",
        "model": {
            "unet": unet,
            "autoencoder": autoencoder,
            "autoencoder_ckpt": None,
            "diffusion": diffusion_section(scheduler),
            "text_encoder": text_encoder_section(root),
            "use_context_mask": False,
        },
    }
    if unet_config.get("sample_size"):
        factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        config["data"] = {"image_size": int(unet_config["sample_size"]) * factor}
    config["sampling"] = sampling_section(scheduler)
    return config


# what the folder's weights fix: its U-Net, autoencoder and text encoder (which layer to read
# and how long to pad stay the caller's)
WEIGHT_KEYS = (
    "model.unet",
    "model.autoencoder",
    "model.autoencoder_ckpt",
    "model.text_encoder.kind",
    "model.text_encoder.name_or_path",
)


def _leaves(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, Mapping):
        return {
            k: v for key, sub in node.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()
        }
    return {prefix: node}


def pin_weight_keys(cfg: DictConfig, sections: Mapping[str, Any]) -> tuple[DictConfig, list[str]]:
    """``cfg`` with `WEIGHT_KEYS` set to the folder's values (``sections``, as
    :func:`diffusers_folder_config` gives them); also the caller's keys that this changed."""
    from omegaconf import OmegaConf

    from ldm.config import load

    fixed: dict[str, Any] = {}
    for key in WEIGHT_KEYS:
        node: Any = sections
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        fixed.update(_leaves(node, key) if isinstance(node, Mapping) else {key: node})
    changed = [k for k, v in fixed.items() if OmegaConf.select(cfg, k) != v]
    if not changed:  # already the folder's: no second merge and validation (sample.py's time)
        return cfg, changed
    pinned = OmegaConf.from_dotlist([])
    for key, value in fixed.items():
        OmegaConf.update(pinned, key, value, force_add=True)
    merged = OmegaConf.merge(OmegaConf.to_container(cfg, resolve=True), pinned)
    return load(base=OmegaConf.to_container(merged, resolve=True)), changed


def folder_config(
    path: str | Path, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> DictConfig:
    """The config to sample a folder with: defaults, then the folder's sections
    (:func:`diffusers_folder_config`), then ``files`` and ``overrides`` (the caller wins), and
    finally `WEIGHT_KEYS` from the folder again (they are what its weights are)."""
    from ldm.config import load

    sections = diffusers_folder_config(path)
    return pin_weight_keys(load(files, overrides, base=sections), sections)[0]


def resolve_folder_config(
    path: str | Path, cfg: DictConfig | Mapping[str, Any] | None = None
) -> DictConfig:
    """The config of a diffusers-layout folder's model: :func:`folder_config` by default, else
    ``cfg`` with the folder's `WEIGHT_KEYS` pinned."""
    root = Path(path)
    if cfg is None:
        return folder_config(root)
    from omegaconf import DictConfig

    from ldm.config import load

    if not isinstance(cfg, DictConfig):  # a DictConfig was loaded (validated) already
        cfg = load(base=cfg)
    return pin_weight_keys(cfg, diffusers_folder_config(root))[0]


def load_diffusers_folder(
    path: str | Path, cfg: DictConfig, model: LatentDiffusion
) -> LatentDiffusion:
    """Fill ``model`` from a diffusers-layout folder.

    ``model`` is built from ``cfg`` (:func:`resolve_folder_config`) by the caller
    (:func:`ldm.assemble.diffusers_folder_model`, on the meta device); the U-Net and autoencoder
    weights load with ``strict=True``, the text encoder and tokenizer came from the folder's
    ``text_encoder/`` and ``tokenizer/`` when it was built.

    Raises:
        CheckpointError: Weights that do not match their configs.
    """
    from ldm.config import to_container

    root = Path(path)
    u = to_container(cfg.model.unet)
    unet = read_weights(root / "unet")
    _load_component(
        root / "unet",
        model.unet,
        lambda: unet_diffusers_to_ldm(
            unet, u["channel_mult"], u["num_res_blocks"], u["attention_resolutions"]
        ),
    )
    vae = read_weights(root / "vae")
    _load_component(
        root / "vae",
        model.autoencoder,
        lambda: vae_diffusers_to_ldm(vae, scale_factor=cfg.model.autoencoder.scale_factor),
    )
    return model


def _load_component(
    folder: Path, module: torch.nn.Module, convert: Callable[[], dict[str, Tensor]]
) -> None:
    """``module.load_state_dict(convert(), strict=True, assign=True)`` (the module may be on
    the meta device: its tensors become the file's, in the module's own dtypes); a key-map or
    shape mismatch becomes a one-line CheckpointError."""
    try:
        assign_weights(module, convert())
    except (KeyError, RuntimeError) as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(
            f"{folder} does not match its config.json ({' '.join(detail[:2])[:300]})"
        ) from None


if __name__ == "__main__":  # the export CLI moved up, out of the key maps
    import sys

    print("error: the export CLI is now `python -m ldm.export` (same arguments)", file=sys.stderr)
    sys.exit(2)
