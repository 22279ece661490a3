"""Original Stable Diffusion 1.x/2.x single-file checkpoints (CompVis / Stability layout).

A single file (``.safetensors``, or a ``.ckpt`` read with ``torch.load(weights_only=True)``,
optionally wrapping everything in a top-level ``state_dict``) holds the whole
``ldm.models.diffusion.ddpm.LatentDiffusion`` of the original code:

- ``model.diffusion_model.*``: the U-Net, in our names already (`unet_keys.strip_prefix`);
- ``model_ema.*``: LitEma's copy of the U-Net parameters, named with the dots removed
  (``model_ema.diffusion_modelinput_blocks00weight``), plus ``model_ema.decay`` and
  ``model_ema.num_updates``; released "ema-only" files have already folded it into
  ``model.diffusion_model.*``;
- ``first_stage_model.*``: the KL autoencoder, in our names (`vae_keys.strip_first_stage_prefix`);
- ``cond_stage_model.*``: SD1's HF CLIP under ``cond_stage_model.transformer.`` or SD2's open_clip
  text tower under ``cond_stage_model.model.`` (`text_keys`, converted to HF CLIP keys so that it
  runs through `ClipTextEncoder` without open_clip);
- schedule buffers (``betas``, ``alphas_cumprod``, ...), which are checked against the config.

The file carries no config: ``configs/ldm/sd1.yaml`` / ``sd2.yaml`` state it (including the
autoencoder's ``scale_factor``, 0.18215, which lives in SD's inference YAMLs, not in the file).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ldm.checkpoint.format import CheckpointError, assign_weights
from ldm.checkpoint.text_keys import (
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    convert_open_clip_to_hf_clip,
    detect_text_encoder_layout,
    extract_sd1_clip,
    keys_for_model,
)
from ldm.checkpoint.unet_keys import COMPVIS_UNET_PREFIX, strip_prefix
from ldm.checkpoint.vae_keys import strip_first_stage_prefix

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)

FIRST_STAGE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_META_KEYS = ("model_ema.decay", "model_ema.num_updates")

StateDict = dict[str, Tensor]


def read_state_dict(path: str | Path) -> StateDict:
    """All tensors of an original SD file, without unpickling code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``. A top-level ``state_dict`` entry (Lightning ``.ckpt``) is
    unwrapped; non-tensor entries (``global_step``, ...) are dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file cannot be read safely or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError and friends: refuse instead of unpickling code
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"{path} cannot be read with torch.load(weights_only=True) ({first}); convert it "
                "to .safetensors with a tool you trust (no pickled code is ever executed here)"
            ) from None
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict")
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def ema_key(unet_key: str) -> str:
    """LitEma's name for a U-Net parameter: ``input_blocks.0.0.weight`` ->
    ``model_ema.diffusion_modelinput_blocks00weight`` (dots removed)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def unet_state_dict(
    state_dict: Mapping[str, Tensor], unet: nn.Module, use_ema: bool = True
) -> tuple[StateDict, bool]:
    """The U-Net weights of an SD checkpoint in our names, EMA ones if asked for and present.

    LitEma keeps only parameters, so buffers (if a U-Net had any) come from the raw weights.

    Args:
        state_dict: The checkpoint's tensors.
        unet: The U-Net the weights are for (its parameter names select the EMA entries).
        use_ema: Take the ``model_ema.*`` copy when the file has one.

    Returns:
        (state dict for ``unet.load_state_dict(strict=True)``, whether EMA weights were used).

    Raises:
        CheckpointError: No U-Net weights (neither raw nor, when asked for, EMA ones), or EMA
            entries for only some parameters.
    """
    raw = strip_prefix(state_dict, COMPVIS_UNET_PREFIX)
    names = [name for name, _ in unet.named_parameters()]
    keys = {name: ema_key(name) for name in names}
    if len(set(keys.values())) != len(keys):
        raise CheckpointError("U-Net parameter names collide once their dots are removed")
    ema_entries = {k for k in state_dict if k.startswith(EMA_PREFIX) and k not in EMA_META_KEYS}
    if not use_ema or not ema_entries:
        if not raw:
            raise CheckpointError(
                f"no U-Net weights (no keys under '{COMPVIS_UNET_PREFIX}'"
                f"{'' if use_ema else '; the EMA ones are not asked for'})"
            )
        if use_ema:
            log.info("no EMA weights in the checkpoint; using model.diffusion_model.*")
        return raw, False
    missing = [name for name, key in keys.items() if key not in state_dict]
    unknown = ema_entries - set(keys.values())
    if missing or unknown:
        detail = (
            f"{len(missing)} parameters lack EMA weights (e.g. {missing[:1]})"
            if missing
            else f"{len(unknown)} EMA entries match no parameter (e.g. {sorted(unknown)[:1]})"
        )
        raise CheckpointError(
            f"partial EMA in the checkpoint: {detail}; pass use_ema=False (sample.py --no-ema) "
            "to use the raw weights"
        )
    out = dict(raw)
    out.update({name: state_dict[keys[name]] for name in names})
    return out, True


def text_state_dict(
    state_dict: Mapping[str, Tensor], text_model: nn.Module, layer: str
) -> StateDict | None:
    """The text encoder weights of an SD checkpoint, keyed for ``text_model`` (a CLIPTextModel).

    SD1's HF CLIP keys are taken as they are. SD2's open_clip tower is converted to HF CLIP;
    with all of its 24 blocks it reproduces SD2's conditioning with ``layer="penultimate"``
    (``hidden_states[-2]`` then ``final_layer_norm``). A ``text_model`` with one block fewer
    (diffusers' SD2 ``text_encoder``) gets the tower without its last block and must use
    ``layer="last"``, which is the same computation.

    Returns:
        The state dict, or None when the checkpoint has no text encoder.

    Raises:
        CheckpointError: The layer count or ``layer`` cannot reproduce SD2's conditioning.
    """
    layout = detect_text_encoder_layout(state_dict)
    if layout is None:
        return None
    if layout == "clip":
        return keys_for_model(extract_sd1_clip(state_dict, SD1_CLIP_PREFIX), text_model)
    blocks = SD2_OPEN_CLIP_PREFIX + "transformer.resblocks."
    depth = len({k[len(blocks) :].split(".")[0] for k in state_dict if k.startswith(blocks)})
    model_depth = int(text_model.config.num_hidden_layers)
    if model_depth == depth and layer == "penultimate":
        drop_last = False
    elif model_depth == depth - 1 and layer == "last":
        drop_last = True
    else:
        raise CheckpointError(
            f"the checkpoint's open_clip text tower has {depth} layers and SD2 uses its "
            f"penultimate one; model.text_encoder must have {depth} layers with layer="
            f"penultimate (or {depth - 1} layers with layer=last), not {model_depth} layers with "
            f"layer={layer}"
        )
    converted = convert_open_clip_to_hf_clip(
        state_dict, SD2_OPEN_CLIP_PREFIX, drop_last_layer=drop_last
    )
    return keys_for_model(converted, text_model)


def use_open_clip_padding(text_encoder: nn.Module) -> None:
    """Make a CLIP tokenizer pad with id 0, as open_clip's tokenizer (SD2's) does.

    SD2 was trained on prompts padded with token 0 (``!``), not with ``<|endoftext|>``; the
    padded positions' embeddings reach the U-Net, so the pad token matters. diffusers' SD2
    ``tokenizer/`` already pads with ``!``; laion's CLIP tokenizers do not.
    """
    tokenizer = getattr(text_encoder, "tokenizer", None)
    if tokenizer is None or tokenizer.pad_token_id == 0:
        return
    pad = tokenizer.convert_ids_to_tokens(0)
    log.warning(
        "SD2 checkpoint: padding prompts with token 0 (%r) as open_clip does, instead of %r",
        pad,
        tokenizer.pad_token,
    )
    tokenizer.pad_token = pad
    cache = getattr(text_encoder, "_empty_cache", None)
    if cache is not None:  # the cached empty-prompt encoding used the old padding
        cache.clear()


def check_schedule(state_dict: Mapping[str, Tensor], model: LatentDiffusion) -> None:
    """Warn when the file's ``alphas_cumprod`` buffer disagrees with the configured schedule."""
    stored = state_dict.get("alphas_cumprod")
    if stored is None or getattr(model.schedule, "is_flow", False):  # flow: no ᾱ to compare
        return
    ours = model.schedule.alphas_cumprod.detach().cpu().double()
    if stored.shape != ours.shape or (stored.double() - ours).abs().max().item() > 1e-5:
        warnings.warn(
            "the checkpoint's alphas_cumprod differ from model.diffusion (schedule, beta_start, "
            "beta_end, num_timesteps): check the config",
            UserWarning,
            stacklevel=3,
        )


def load_sd_single_file(
    path: str | Path, cfg: DictConfig, model: LatentDiffusion, use_ema: bool = True
) -> LatentDiffusion:
    """Fill ``model`` with an original SD 1.x/2.x single-file checkpoint.

    ``model`` is built from ``cfg`` (e.g. ``configs/ldm/sd1.yaml``) by the caller
    (:func:`ldm.assemble.sd_single_file_model`, on the meta device); every part is loaded with
    ``strict=True``. The text
    encoder's tokenizer and config come from ``model.text_encoder.name_or_path``; its weights are
    then replaced by the file's (kept, with a warning, when the file has none).

    Args:
        path: ``.safetensors`` or ``.ckpt`` file.
        cfg: The merged config (``ldm.config.load``).
        model: The model ``cfg`` describes (its U-Net and autoencoder may be empty).
        use_ema: Use the ``model_ema.*`` U-Net weights when present.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: Unreadable file, missing parts, partial EMA, or weights that do not fit
            the config.
    """
    state_dict = read_state_dict(path)
    if not any(k.startswith(FIRST_STAGE_PREFIX) for k in state_dict):
        raise CheckpointError(f"{path} has no autoencoder weights (no '{FIRST_STAGE_PREFIX}*')")
    check_in_channels(state_dict, cfg, path)
    unet_sd, used_ema = unet_state_dict(state_dict, model.unet, use_ema)
    _load(model.unet, unet_sd, "U-Net", "model.unet", assign=True)
    log.info("U-Net: %s weights", "EMA" if used_ema else "raw")

    if "scale_factor" in state_dict:  # scale_by_std models store it; SD v1/v2 do not
        vae_sd = strip_first_stage_prefix(state_dict, FIRST_STAGE_PREFIX)
        if abs(float(vae_sd["scale_factor"]) - cfg.model.autoencoder.scale_factor) > 1e-6:
            log.warning(
                "using the checkpoint's scale_factor %.6g instead of the config's %.6g",
                float(vae_sd["scale_factor"]),
                cfg.model.autoencoder.scale_factor,
            )
    else:
        vae_sd = strip_first_stage_prefix(
            state_dict, FIRST_STAGE_PREFIX, scale_factor=cfg.model.autoencoder.scale_factor
        )
    _load(model.autoencoder, vae_sd, "autoencoder", "model.autoencoder", assign=True)

    text_model = getattr(model.text_encoder, "model", None)
    layout = detect_text_encoder_layout(state_dict)
    if layout is not None and type(text_model).__name__ != "CLIPTextModel":
        raise CheckpointError(
            "the checkpoint's text encoder loads as a transformers "
            "CLIPTextModel: set model.text_encoder.kind=clip"
        )
    text_sd = (
        text_state_dict(state_dict, text_model, cfg.model.text_encoder.layer)
        if layout is not None
        else None
    )
    if text_sd is None:
        warnings.warn(
            f"{path} has no text encoder weights; keeping those of "
            f"{cfg.model.text_encoder.name_or_path}",
            UserWarning,
            stacklevel=2,
        )
    else:
        _load(model.text_encoder, text_sd, "text encoder", "model.text_encoder", sub="model")
    if layout == "openclip":
        use_open_clip_padding(model.text_encoder)
    check_schedule(state_dict, model)
    return model


def check_in_channels(
    state_dict: Mapping[str, Tensor], cfg: DictConfig, path: str | Path = "the file"
) -> None:
    """The file's U-Net input channels against ``model.unet.in_channels``.

    SD inpainting files (sd-v1-5-inpainting, 512-inpainting-ema) have a 9-channel U-Net:
    latents, mask and masked-image latents (Rombach et al. 2022). Their config is SD's with
    ``in_channels: 9`` (the original ``v1-inpainting-inference.yaml``).

    Raises:
        CheckpointError: The channels differ (one line naming the override to add).
    """
    weight = state_dict.get(COMPVIS_UNET_PREFIX + "input_blocks.0.0.weight")
    configured = int(cfg.model.unet.in_channels)
    if weight is None or weight.ndim != 4 or int(weight.shape[1]) == configured:
        return
    found = int(weight.shape[1])
    latent = int(cfg.model.unet.out_channels)
    kind = "an SD inpainting checkpoint" if found == latent + 5 else "a checkpoint"
    raise CheckpointError(
        f"{path} is {kind}: its U-Net takes {found} input channels and "
        f"model.unet.in_channels is {configured}; add "
        f"model.unet.in_channels={found}"
    )


def _load(
    module: nn.Module,
    state: Mapping[str, Tensor],
    what: str,
    section: str,
    sub: str | None = None,
    assign: bool = False,
) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the config section.

    ``sub`` loads into ``module.<sub>`` through ``module`` so that ``module``'s own
    ``_load_from_state_dict`` hooks run (the text encoder forgets its cached empty prompt).
    ``assign`` makes the file's tensors, cast to the module's dtypes, the module's own (a
    module built on the meta device).
    """
    if sub is not None:
        state = {f"{sub}.{k}": v for k, v in state.items()}
    try:
        if assign:
            assign_weights(module, state)
        else:
            module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(
            f"the checkpoint's {what} does not fit {section} ({detail[:300]})"
        ) from None
