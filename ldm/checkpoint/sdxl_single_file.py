"""SDXL single files (Stability's generative-models layout, e.g. ``sd_xl_base_1.0.safetensors``
and ``sd_xl_refiner_1.0.safetensors``): reading them into
:class:`~ldm.models.sdxl.SDXLLatentDiffusion` and writing that layout.

Keys: ``model.diffusion_model.*`` (the U-Net, our names), ``first_stage_model.*`` (the VAE,
our names), ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L, transformers' layout) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG text tower, open_clip's layout; converted
to ``CLIPTextModelWithProjection``). The refiner's file has ViT-bigG alone, as
``conditioner.embedders.0.model.*`` (generative-models' sd_xl_refiner.yaml; diffusers'
single-file reader takes it from there too), and a U-Net taking five numbers with the aesthetic
score (``adm_in_channels`` 2560). A single file holds no configs or tokenizers: the U-Net and
VAE come from the config (``configs/ldm/sdxl.yaml``, ``configs/ldm/sdxl-refiner.yaml``), the
encoders' configs and tokenizers from a diffusers SDXL folder's ``text_encoder``/``tokenizer``/
``text_encoder_2``/``tokenizer_2`` (a refiner file needs the last two only: a refiner or base
folder; only their config and vocabulary files are read, the weights come from the file).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.stable_diffusion import read_state_dict, unet_state_dict
from ldm.checkpoint.text_keys import (
    convert_hf_clip_to_open_clip,
    convert_open_clip_to_hf_clip,
    extract_sd1_clip,
    keys_for_model,
)
from ldm.checkpoint.unet_keys import COMPVIS_UNET_PREFIX
from ldm.checkpoint.vae_keys import strip_first_stage_prefix
from ldm.diffusion import NoiseSchedule
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.conditioner import SDXLConditioner
from ldm.models.sdxl import SDXLLatentDiffusion
from ldm.models.unet import UNetModel

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."  # the refiner's only embedder
VAE_PREFIX = "first_stage_model."
ADM_KEY = COMPVIS_UNET_PREFIX + "label_emb.0.0.weight"  # (time dim, adm_in_channels)
SIZE_NUMBERS = {"base": 6, "refiner": 5}  # micro-conditioning numbers embedded to 256 each


def is_refiner_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a single file's keys are the SDXL refiner's (ViT-bigG as the only embedder)."""
    return any(k.startswith(REFINER_BIGG_PREFIX) for k in state_dict) and not any(
        k.startswith("conditioner.embedders.1.") for k in state_dict
    )


def is_sdxl_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether a single file's keys have SDXL's two embedders, or the refiner's one."""
    both = any(k.startswith(CLIP_L_PREFIX) for k in state_dict) and any(
        k.startswith(BIGG_PREFIX) for k in state_dict
    )
    return both or is_refiner_state_dict(state_dict)


def is_refiner_file(path: str | Path) -> bool:
    """Whether a single file is the SDXL refiner's (ViT-bigG as its only embedder)."""
    return is_refiner_state_dict(_keys(Path(path)))


def _adm_in_channels(path: Path) -> int | None:
    """A ``.safetensors`` single file's ``adm_in_channels`` from its header (None: unknown)."""
    from safetensors import safe_open

    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice(ADM_KEY).get_shape()[1]) if ADM_KEY in f.keys() else None
    except Exception:  # noqa: BLE001 - unreadable: the reader names the problem
        return None


def check_refiner_config(path: Any, cfg: Any, state: Mapping[str, Tensor] | None = None) -> None:
    """Refuses an SDXL refiner file given the base's config and a base file given the
    refiner's, from the file's ``adm_in_channels`` (pooled width + 5 or 6 numbers × 256).

    Args:
        path: The file.
        cfg: The config it is loaded with.
        state: Its tensors (None: its keys and header are read).

    Raises:
        CheckpointError: One line naming the file, both layouts and the config to use.
    """
    state = _keys(Path(path)) if state is None else state
    tensor = state.get(ADM_KEY)
    file_adm = int(tensor.shape[1]) if tensor is not None else _adm_in_channels(Path(path))
    if file_adm is None or cfg.model.unet.adm_in_channels is None:
        return
    cfg_adm = int(cfg.model.unet.adm_in_channels)
    kind = "refiner" if is_refiner_state_dict(state) else "base"
    other = "base" if kind == "refiner" else "refiner"
    pooled = file_adm - SIZE_NUMBERS[kind] * 256
    if file_adm != cfg_adm and cfg_adm == pooled + SIZE_NUMBERS[other] * 256:
        config = "sdxl-refiner.yaml" if kind == "refiner" else "sdxl.yaml"
        raise CheckpointError(
            f"{path} is an SDXL {kind} file (adm_in_channels {file_adm}) but the config is the "
            f"SDXL {other}'s (adm_in_channels {cfg_adm}): use -c configs/ldm/{config}"
        )


def _keys(path: Path) -> dict[str, None]:
    """A single file's keys (only the header of a ``.safetensors``); {} when unreadable, so
    that the regular reader names the problem."""
    if not path.is_file():
        return {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return dict.fromkeys(f.keys())
        except Exception:  # noqa: BLE001 - any unreadable file
            return {}
    try:
        return dict.fromkeys(read_state_dict(path))
    except CheckpointError:
        return {}


def is_sdxl_file(path: str | Path) -> bool:
    """Whether a single file is SDXL's (its two embedders' keys)."""
    return is_sdxl_state_dict(_keys(Path(path)))


def check_not_sd_file_for_sdxl_config(path: str | Path, cfg: Any) -> None:
    """Refuses an SD 1.x/2.x single file (``cond_stage_model.*``) given an SDXL config (one
    whose U-Net takes a vector ``y``: SD 1.x/2.x U-Nets have no ``adm_in_channels``).

    Raises:
        CheckpointError: One line naming both and the fix.
    """
    if cfg.model.unet.adm_in_channels is None:
        return
    if any(k.startswith("cond_stage_model.") for k in _keys(Path(path))):
        raise CheckpointError(
            f"{path} is an SD 1.x/2.x file (cond_stage_model.*) but the config is SDXL's; "
            "use -c configs/ldm/sd1.yaml or sd2.yaml for it"
        )


def encoder_states(
    state: Mapping[str, Tensor], conditioner: SDXLConditioner
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An SDXL single file's two encoders' weights, keyed for ``conditioner.text_encoder``
    (CLIP ViT-L, transformers' names; {} for the refiner, which has none) and
    ``conditioner.text_encoder_2`` (OpenCLIP ViT-bigG converted to
    ``CLIPTextModelWithProjection``; the refiner's ``conditioner.embedders.0.model.*``)."""
    refiner = is_refiner_state_dict(state)
    first = {}
    if not refiner:
        first = keys_for_model(extract_sd1_clip(state, CLIP_L_PREFIX), conditioner.text_encoder)
    prefix = REFINER_BIGG_PREFIX if refiner else BIGG_PREFIX
    second = keys_for_model(convert_open_clip_to_hf_clip(state, prefix, include_projection=True),
                            conditioner.text_encoder_2)  # fmt: skip
    return first, second


def load_sdxl_single_file(
    path: str | Path, cfg: Any, encoders: str | Path, use_ema: bool = True
) -> SDXLLatentDiffusion:
    """An :class:`SDXLLatentDiffusion` (eval mode) from an SDXL single file; every part loads
    with ``strict=True``.

    Args:
        path: The ``.safetensors`` (or ``.ckpt``, read with ``weights_only=True``) file.
        cfg: Our config with ``model.unet``, ``model.autoencoder`` (its ``scale_factor``: SDXL's
            0.13025) and ``model.diffusion`` (e.g. ``configs/ldm/sdxl.yaml``).
        encoders: A diffusers SDXL folder giving the encoders' configs and tokenizers.
        use_ema: Use ``model_ema.*`` U-Net weights when present.

    Raises:
        CheckpointError: Not an SDXL file (e.g. SD1/SD2), or weights that do not fit the config.
        FileNotFoundError: ``path`` or an encoder folder is missing.
    """
    from ldm.config import to_container

    state = read_state_dict(path)
    if not is_sdxl_state_dict(state):
        raise CheckpointError(
            f"{path} is not an SDXL file (no {CLIP_L_PREFIX}* and {BIGG_PREFIX}* keys, nor the "
            f"refiner's {REFINER_BIGG_PREFIX}* alone); for SD 1.x/2.x files use "
            "-c configs/ldm/sd1.yaml or sd2.yaml"
        )
    check_refiner_config(path, cfg, state)
    m = cfg.model
    unet = UNetModel(**to_container(m.unet))
    autoencoder = AutoencoderKL(**to_container(m.autoencoder))
    conditioner = SDXLConditioner.from_diffusers_folder(encoders, weights=False)
    if is_refiner_state_dict(state) and conditioner.text_encoder is not None:  # a base folder
        c = conditioner
        conditioner = SDXLConditioner(None, None, c.text_encoder_2, c.tokenizer_2, c.max_length)
    first, second = conditioner.text_encoder, conditioner.text_encoder_2
    unet_sd, _ = unet_state_dict(state, unet, use_ema=use_ema)
    parts = [
        ("U-Net", unet, lambda: unet_sd),
        ("VAE", autoencoder, lambda: strip_first_stage_prefix(
            state, VAE_PREFIX, scale_factor=m.autoencoder.scale_factor)),
        ("CLIP ViT-L", first, lambda: encoder_states(state, conditioner)[0]),
        ("OpenCLIP ViT-bigG", second, lambda: encoder_states(state, conditioner)[1]),
    ]  # fmt: skip
    parts = [part for part in parts if part[1] is not None]  # the refiner: no ViT-L
    for what, module, weights in parts:
        try:
            module.load_state_dict(weights(), strict=True)
        except (KeyError, RuntimeError) as e:
            first_line = str(e).strip().splitlines()[0][:300]
            raise CheckpointError(f"{path}: the {what} weights do not fit the config "
                                  f"({first_line})") from None  # fmt: skip
    d = m.diffusion
    schedule = NoiseSchedule(schedule=d.schedule, num_timesteps=d.num_timesteps,
                             beta_start=d.beta_start, beta_end=d.beta_end,
                             zero_terminal_snr=d.zero_terminal_snr)  # fmt: skip
    model = SDXLLatentDiffusion(unet, autoencoder, conditioner, schedule, d.prediction)
    model.zero_empty_prompts = bool(m.sdxl.zero_empty_prompt)  # the refiner's config: false
    return model.eval()


def sdxl_single_file_state_dict(model: SDXLLatentDiffusion) -> dict[str, Tensor]:
    """Our SDXL model's weights in the generative-models single-file layout."""
    from ldm.checkpoint.text_keys import _canonical

    out = {COMPVIS_UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in model.autoencoder.state_dict().items()
                if k != "scale_factor"})  # fmt: skip
    c = model.text_encoder
    if c.text_encoder is not None:  # the refiner has ViT-bigG alone, as embedders.0
        out.update({CLIP_L_PREFIX + _canonical(k): v
                    for k, v in c.text_encoder.state_dict().items()
                    if not k.endswith("position_ids")})  # fmt: skip
    prefix = BIGG_PREFIX if c.text_encoder is not None else REFINER_BIGG_PREFIX
    out.update(convert_hf_clip_to_open_clip(c.text_encoder_2.state_dict(), prefix))
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_sdxl_single_file(model: SDXLLatentDiffusion, path: str | Path) -> Path:
    """Writes :func:`sdxl_single_file_state_dict` to a ``.safetensors`` file (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sdxl_single_file_state_dict(model), str(tmp))
    tmp.replace(path)
    return path
