"""Weights sources become module weights: our checkpoints, SD single files, diffusers folders.

Three kinds of source are recognised by :func:`source_kind`:

- ``ours``: a ``.safetensors`` written by :func:`ldm.checkpoint.format.save_checkpoint`;
- ``sd``: an original Stable Diffusion 1.x/2.x single file (``.safetensors``, or a ``.ckpt``
  read with ``torch.load(weights_only=True)``);
- ``diffusers``: a diffusers pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ...) or,
  for the autoencoder alone, a ``vae/`` folder (``config.json`` + weights).

Used for ``model.init_from`` (start a fine-tuning run's U-Net, and optionally its text encoder,
from a source: :func:`apply_init`) and ``model.autoencoder_ckpt`` (:func:`autoencoder_section`,
:func:`load_autoencoder`). Every load is ``strict=True`` through the key maps of
:mod:`ldm.checkpoint`; a mismatch is a one-line :class:`CheckpointError` naming the file and key.

A source's fingerprint (:func:`fingerprint`, SHA-256 over the bytes of the files read) is stored
in the run config, so a rerun of that config refuses a source whose weights have changed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.checkpoint.format import FORMAT, CheckpointError, load_checkpoint, read_metadata

log = logging.getLogger(__name__)

#: Latent scale factor of original SD single files, which do not store it (SD's inference YAMLs
#: state ``scale_factor: 0.18215`` for SD 1.x and 2.x alike). ``model.autoencoder_scale_factor``
#: overrides it.
SD_SCALE_FACTOR = 0.18215

#: SDXL's (sd_xl_base.yaml ``scale_factor``), for SDXL single files, which do not store it either.
SDXL_SCALE_FACTOR = 0.13025

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def source_kind(path: str | Path) -> str:
    """``ours``, ``sd`` or ``diffusers`` for a weights source.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: A folder that is neither a diffusers pipeline nor a component folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "config.json").is_file():
            return "diffusers"
        raise CheckpointError(
            f"{path} is a folder without model_index.json or config.json (not "
            "a diffusers pipeline or component folder)"
        )
    if path.suffix == ".safetensors" and read_metadata(path).get("format") == FORMAT:
        return "ours"
    return "sd"


def fingerprint(path: str | Path, components: tuple[str, ...] = ("unet",)) -> str:
    """``sha256:<hex>`` over the bytes of a source's files (a folder: the named components'
    weights and configs, in sorted order, each preceded by its relative path)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
    else:
        roots = [path / c for c in components if (path / c).is_dir()] or [path]
        files = sorted(
            f
            for root in roots
            for f in root.iterdir()
            if f.is_file() and f.suffix in _WEIGHT_SUFFIXES
        )
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], source: Path, what: str) -> None:
    """``load_state_dict(strict=True)``; missing, unexpected or mis-shaped keys become one line
    naming the source file and the first offending key. LoRA adapters (``.lora_`` keys) are
    not expected in the source: they start fresh."""
    own = {k: v for k, v in module.state_dict().items() if ".lora_" not in k}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shaped:
        if shaped:
            k = shaped[0]
            detail = (
                f"key {k} has shape {tuple(state[k].shape)}, the configured {what} needs "
                f"{tuple(own[k].shape)}"
            )
        elif missing:
            detail = f"key {missing[0]} is missing ({len(missing)} in all)"
        else:
            detail = (
                f"key {unexpected[0]} is not in the configured {what} ({len(unexpected)} in all)"
            )
        raise CheckpointError(f"{source}: {what} weights do not fit the config: {detail}")
    module.load_state_dict(state, strict=len(own) == len(module.state_dict()))


# ---------------------------------------------------------------------------------------------
# U-Net and text encoder (model.init_from)
# ---------------------------------------------------------------------------------------------


def unet_state(
    path: str | Path, unet: nn.Module, unet_kwargs: Mapping[str, Any], use_ema: bool = True
) -> tuple[dict[str, Tensor], str]:
    """A source's U-Net weights in our names, and which copy they are (``EMA``/``raw``).

    Args:
        path: Our ldm checkpoint, an SD single file or a diffusers folder.
        unet: The configured U-Net (its parameter names select SD's EMA entries).
        unet_kwargs: ``model.unet`` as plain values (the diffusers key map needs its levels).
        use_ema: Prefer the EMA copy (ours: ``unet_ema``; SD: ``model_ema``).
    """
    path = Path(path)
    kind = source_kind(path)
    if kind == "ours":
        ckpt = load_checkpoint(path)
        if ckpt.kind != "ldm":
            raise CheckpointError(f"{path} is a '{ckpt.kind}' checkpoint: it holds no U-Net")
        ema = use_ema and any(k.startswith("unet_ema.") for k in ckpt.tensors)
        return ckpt.module_state("unet_ema" if ema else "unet"), "EMA" if ema else "raw"
    if kind == "sd":
        from ldm.checkpoint.stable_diffusion import read_state_dict, unet_state_dict

        try:
            state, used_ema = unet_state_dict(read_state_dict(path), unet, use_ema)
        except CheckpointError as e:
            message = str(e)
            raise CheckpointError(
                message if str(path) in message else f"{path}: {message}"
            ) from None
        return state, "EMA" if used_ema else "raw"
    from ldm.checkpoint.diffusers_layout import read_weights
    from ldm.checkpoint.sdxl_layout import is_sdxl_folder
    from ldm.checkpoint.unet_keys import unet_diffusers_to_ldm

    if is_sdxl_folder(path):
        from ldm import build_sdxl

        return build_sdxl.unet_state(path, unet_kwargs), "diffusers"
    folder = path / "unet" if (path / "unet").is_dir() else path
    try:
        state = unet_diffusers_to_ldm(
            read_weights(folder),
            unet_kwargs["channel_mult"],
            unet_kwargs["num_res_blocks"],
            unet_kwargs["attention_resolutions"],
        )
    except KeyError as e:
        raise CheckpointError(
            f"{folder}: key {e} is outside the U-Net key map (not a "
            "UNet2DConditionModel of the configured shape?)"
        ) from None
    return state, "diffusers"


def text_state(path: str | Path, text_encoder: nn.Module, layer: str) -> dict[str, Tensor]:
    """A source's text-encoder weights keyed for ``text_encoder.model`` (a CLIPTextModel).

    SD1 files hold HF CLIP, SD2 files open_clip (converted); diffusers folders hold
    ``text_encoder/``; our checkpoints do not store the frozen encoder (its config names it).
    """
    from ldm.checkpoint.text_keys import keys_for_model

    path = Path(path)
    kind = source_kind(path)
    model = getattr(text_encoder, "model", None)
    if type(model).__name__ != "CLIPTextModel":
        raise CheckpointError(
            f"{path}: its text encoder loads as a transformers CLIPTextModel: "
            "set model.text_encoder.kind=clip"
        )
    if kind == "ours":
        raise CheckpointError(
            f"{path} is one of our checkpoints, which keep no text encoder: "
            "set model.init_from.text_encoder=false and name the encoder in "
            "model.text_encoder"
        )
    if kind == "sd":
        from ldm.checkpoint.stable_diffusion import read_state_dict, text_state_dict

        state = text_state_dict(read_state_dict(path), model, layer)
        if state is None:
            raise CheckpointError(f"{path} has no text encoder weights (no cond_stage_model.*)")
        return state
    from safetensors.torch import load_file

    folder = path / "text_encoder"
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    raw = {k: v for f in files for k, v in load_file(str(f)).items()}
    return keys_for_model(raw, model)


def apply_init(model: nn.Module, init: Any, unet_kwargs: Mapping[str, Any]) -> None:
    """Load ``model.init_from`` into a freshly built ``LatentDiffusion`` (before the EMA copy
    is made, so the EMA starts from the loaded weights).

    :func:`resolve_init` has checked the source's fingerprint first.

    Raises:
        FileNotFoundError, CheckpointError: A missing, unreadable or non-fitting source.
    """
    path = Path(init.path)
    state, which = unet_state(path, model.unet, unet_kwargs, use_ema=init.weights == "ema")
    _load_strict(model.unet, state, path, "U-Net")
    log.warning(
        "model.init_from: U-Net from %s (%s weights, %s)", path, which, str(init.fingerprint)[:19]
    )
    if init.text_encoder:
        apply_text_init(model, init)


def apply_text_init(model: nn.Module, init: Any) -> None:
    """Load the text encoder of ``model.init_from`` (``init.text_encoder``) into ``model``: at
    the start of a run, and again when a checkpoint of that run is rebuilt for sampling (our
    checkpoints carry only the text encoder's trained weights).

    Raises:
        FileNotFoundError, CheckpointError: A missing, unreadable or non-fitting source.
    """
    if hasattr(model.text_encoder, "text_encoder_2"):
        return  # SDXL's two encoders were loaded from the source when built (ldm.build_sdxl)
    path = Path(init.path)
    layer = str(getattr(model.text_encoder, "layer", "last"))
    tstate = text_state(path, model.text_encoder, layer)
    _load_strict(model.text_encoder.model, tstate, path, "text encoder")
    cache = getattr(model.text_encoder, "_empty_cache", None)
    if cache is not None:
        cache.clear()
    log.warning("model.init_from: text encoder from %s", path)


def resolve_init(cfg: Any) -> None:
    """Record the fingerprint of ``model.init_from.path`` in ``cfg`` (checking it when set)."""
    init = cfg.model.init_from
    if not init.path:
        return
    path = Path(init.path)
    if not path.exists():
        raise FileNotFoundError(f"model.init_from.path: checkpoint not found: {path}")
    source_kind(path)  # a folder of no known layout fails here, before anything is built
    from ldm.build_sdxl import check_source_family

    check_source_family(path, cfg)  # an SD 1.x/2.x source for an SDXL config, or the reverse
    components = ("unet", "text_encoder", "text_encoder_2") if init.text_encoder else ("unet",)
    found = fingerprint(path, components)
    if init.fingerprint and init.fingerprint != found:
        raise CheckpointError(
            f"{path} is not the source this run started from (model.init_from.fingerprint "
            f"{init.fingerprint[:19]}…, the file gives {found[:19]}…): restore it, or set "
            "model.init_from.fingerprint=null to start from the file as it is now"
        )
    init.fingerprint = found


# ---------------------------------------------------------------------------------------------
# Autoencoder (model.autoencoder_ckpt)
# ---------------------------------------------------------------------------------------------


def _vae_folder(path: Path) -> Path:
    return path / "vae" if (path / "vae" / "config.json").is_file() else path


def autoencoder_section(
    path: str | Path, configured: Mapping[str, Any], scale_factor: float | None = None
) -> tuple[dict[str, Any], str]:
    """``model.autoencoder`` for a source, and where its ``scale_factor`` came from.

    Ours: the section stored in the checkpoint. diffusers (a pipeline or its ``vae/``): from
    ``vae/config.json`` (``scaling_factor``). SD single file: ``configured`` (the file carries no
    config) with :data:`SD_SCALE_FACTOR`. ``scale_factor`` (``model.autoencoder_scale_factor``)
    overrides the source's value for diffusers and SD sources.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    kind = source_kind(path)
    if kind == "ours":
        meta = read_metadata(path)
        config = OmegaConf.to_container(OmegaConf.create(meta.get("config", "{}")), resolve=True)
        section = dict(config.get("model", {}).get("autoencoder", {}))  # type: ignore[union-attr]
        return section, "the checkpoint"
    if kind == "diffusers":
        from ldm.checkpoint.diffusers_layout import read_json
        from ldm.checkpoint.vae_keys import vae_config_diffusers_to_ldm

        folder = _vae_folder(path)
        try:
            section = vae_config_diffusers_to_ldm(read_json(folder / "config.json"))
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"{folder / 'config.json'}: not an AutoencoderKL config ({e})"
            ) from None
        where = f"{folder / 'config.json'} scaling_factor"
    else:
        from ldm.checkpoint.sdxl_single_file import is_sdxl_file

        section = dict(configured)
        sdxl = is_sdxl_file(path)
        section["scale_factor"] = SDXL_SCALE_FACTOR if sdxl else SD_SCALE_FACTOR
        where = f"the {'SDXL' if sdxl else 'SD 1.x/2.x'} value (single files do not store it)"
    if scale_factor is not None:
        section["scale_factor"] = float(scale_factor)
        where = "model.autoencoder_scale_factor"
    return section, where


def load_autoencoder(path: str | Path, section: Mapping[str, Any] | None = None) -> nn.Module:
    """An ``AutoencoderKL`` with a source's weights (strict).

    Args:
        path: Our autoencoder/ldm checkpoint, an SD single file, a diffusers ``vae/`` folder or
            a diffusers pipeline folder.
        section: ``model.autoencoder`` (as :func:`autoencoder_section` resolved it); required for
            SD single files, defaulting to the source's own for the others.
    """
    from ldm.models.autoencoder import AutoencoderKL

    path = Path(path)
    kind = source_kind(path)
    if kind == "ours":
        ckpt = load_checkpoint(path)
        if ckpt.kind not in ("autoencoder", "ldm"):
            raise CheckpointError(f"{path} holds no autoencoder")
        own, _ = autoencoder_section(path, {})
        from ldm.config import load

        model = AutoencoderKL(**load(base={"model": {"autoencoder": own}}).model.autoencoder)
        _load_strict(model, ckpt.module_state("autoencoder"), path, "autoencoder")
        return model
    if section is None:
        if kind == "sd":
            raise CheckpointError(
                f"{path} is an SD single file, which carries no autoencoder "
                "config: pass the model.autoencoder section"
            )
        section, _ = autoencoder_section(path, {})
    from ldm.config import load

    args = dict(load(base={"model": {"autoencoder": dict(section)}}).model.autoencoder)
    model = AutoencoderKL(**args)
    scale = float(args["scale_factor"])
    if kind == "diffusers":
        from ldm.checkpoint.diffusers_layout import read_weights
        from ldm.checkpoint.vae_keys import vae_diffusers_to_ldm

        folder = _vae_folder(path)
        try:
            state = vae_diffusers_to_ldm(read_weights(folder), scale_factor=scale)
        except KeyError as e:
            raise CheckpointError(
                f"{folder}: key {e} is outside the AutoencoderKL key map"
            ) from None
        _load_strict(model, state, folder, "autoencoder")
        return model
    from ldm.checkpoint.stable_diffusion import FIRST_STAGE_PREFIX, read_state_dict
    from ldm.checkpoint.vae_keys import strip_first_stage_prefix

    raw = read_state_dict(path)
    state = strip_first_stage_prefix(raw, FIRST_STAGE_PREFIX, scale_factor=scale)
    _load_strict(model, state, path, "autoencoder")
    return model


__all__ = [
    "SD_SCALE_FACTOR",
    "apply_init",
    "apply_text_init",
    "autoencoder_section",
    "fingerprint",
    "load_autoencoder",
    "resolve_init",
    "source_kind",
    "text_state",
    "unet_state",
]
