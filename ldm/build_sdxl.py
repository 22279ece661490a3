"""SDXL's part of the one place where a config becomes objects (``model.text_encoder.kind:
sdxl``): the two-encoder conditioner and :class:`~ldm.models.sdxl.SDXLLatentDiffusion`, and what
``model.init_from`` reads from SDXL sources (single files, diffusers SDXL folders).

The encoders come from the diffusers SDXL folder ``model.text_encoder.name_or_path`` (weights,
configs, tokenizers); with ``model.init_from.text_encoder`` only its configs and vocabularies
are read and the weights come from ``model.init_from.path`` (a single file's
``conditioner.embedders.0/1``, a folder's ``text_encoder/`` and ``text_encoder_2/``), so that a
run and every checkpoint it writes rebuild the same encoders from the config alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ldm.checkpoint.format import CheckpointError
from ldm.models.conditioner import SDXLConditioner
from ldm.models.sdxl import SDXLLatentDiffusion

log = logging.getLogger(__name__)


def build_conditioner(section: Mapping[str, Any], weights: bool = True) -> SDXLConditioner:
    """``model.text_encoder`` (``kind: sdxl``) → the frozen two-encoder conditioner.

    Args:
        section: ``model.text_encoder`` as plain values.
        weights: Load the folder's encoder weights (False: configs only, weights loaded later).

    Raises:
        FileNotFoundError: ``name_or_path`` is not a folder, or lacks an encoder or tokenizer.
    """
    import torch

    from ldm.models.text_encoder_base import parse_dtype

    root = check_encoder_folder(section["name_or_path"])
    conditioner = SDXLConditioner.from_diffusers_folder(root, section.get("max_length"), weights)
    dtype = parse_dtype(str(section.get("dtype", "float32")))
    return conditioner.to(dtype) if dtype != torch.float32 else conditioner


def check_encoder_folder(name_or_path: str) -> Path:
    """``model.text_encoder.name_or_path`` of ``kind: sdxl`` as an existing folder.

    Raises:
        FileNotFoundError: One line naming the path and what it must hold.
    """
    root = Path(str(name_or_path)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"model.text_encoder.kind=sdxl reads both encoders from a local diffusers SDXL "
            f"folder, and {name_or_path} is not one: set model.text_encoder.name_or_path to it "
            "(text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/)"
        )
    return root


def sdxl_latent_diffusion(
    cfg: Any, unet: nn.Module, autoencoder: nn.Module, schedule: Any
) -> SDXLLatentDiffusion:
    """The SDXL composite of a ``kind: sdxl`` config, with its encoders' weights from the
    folder or from ``model.init_from`` (see the module docstring), unfrozen or given LoRA
    adapters as ``model.train_text_encoder`` / ``model.lora.text_encoder`` say."""
    from ldm.config import to_container

    m = cfg.model
    from_init = bool(m.init_from.path) and bool(m.init_from.text_encoder)
    conditioner = build_conditioner(to_container(m.text_encoder), weights=not from_init)
    if from_init:
        load_text_encoders(conditioner, m.init_from.path)
    from ldm.text_tuning import trainable_text_encoder

    trainable_text_encoder(conditioner, m)  # after loading: adapters add keys, loading freezes
    model = SDXLLatentDiffusion(unet, autoencoder, conditioner, schedule, m.diffusion.prediction)
    model.zero_empty_prompts = bool(m.sdxl.zero_empty_prompt)
    return model


def text_states(
    path: str | Path, conditioner: SDXLConditioner
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """An SDXL source's two encoders' weights, keyed for ``conditioner.text_encoder`` and
    ``conditioner.text_encoder_2``.

    Raises:
        CheckpointError: The source holds no SDXL encoders (an SD file, one of our
            checkpoints, a folder without ``text_encoder_2/``).
    """
    from ldm.pretrained import source_kind

    path = Path(path)
    kind = source_kind(path)
    if kind == "ours":
        raise CheckpointError(
            f"{path} is one of our checkpoints, which keep no text encoders: "
            "set model.init_from.text_encoder=false (the run's "
            "model.text_encoder folder gives them)"
        )
    if kind == "sd":
        from ldm.checkpoint.sdxl_single_file import encoder_states, is_sdxl_state_dict
        from ldm.checkpoint.stable_diffusion import read_state_dict

        state = read_state_dict(path)
        if not is_sdxl_state_dict(state):
            raise CheckpointError(
                f"{path} holds no SDXL text encoders "
                "(conditioner.embedders.0/1): it is not an SDXL file"
            )
        try:
            return encoder_states(state, conditioner)
        except KeyError as e:
            raise CheckpointError(f"{path}: key {e} of the SDXL text encoders is missing") from None
    from safetensors.torch import load_file

    from ldm.checkpoint.text_keys import keys_for_model

    states = []
    for part, module in (
        ("text_encoder", conditioner.text_encoder),
        ("text_encoder_2", conditioner.text_encoder_2),
    ):
        files = sorted((path / part).glob("*.safetensors")) if (path / part).is_dir() else []
        if not files:
            raise CheckpointError(
                f"{path / part} holds no .safetensors weights (an SDXL "
                "folder has text_encoder/ and text_encoder_2/)"
            )
        states.append(keys_for_model({k: v for f in files for k, v in load_file(str(f)).items()},
                                     module))  # fmt: skip
    return states[0], states[1]


def load_text_encoders(conditioner: SDXLConditioner, path: str | Path) -> None:
    """Both encoders' weights from an SDXL source, strictly (one-line errors naming it)."""
    from ldm.pretrained import _load_strict

    first, second = text_states(path, conditioner)
    _load_strict(conditioner.text_encoder, first, Path(path), "first SDXL text encoder")
    _load_strict(conditioner.text_encoder_2, second, Path(path), "second SDXL text encoder")
    conditioner.requires_grad_(False).eval()
    log.warning("model.init_from: both SDXL text encoders from %s", path)


def unet_state(path: Path, unet_kwargs: Mapping[str, Any]) -> dict[str, Tensor]:
    """A diffusers SDXL folder's U-Net weights in our names."""
    from ldm.checkpoint.diffusers_layout import read_weights
    from ldm.checkpoint.sdxl_keys import sdxl_unet_diffusers_to_ldm

    try:
        return sdxl_unet_diffusers_to_ldm(read_weights(path / "unet"), unet_kwargs)
    except KeyError as e:
        raise CheckpointError(
            f"{path / 'unet'}: key {e} is outside the SDXL U-Net key map "
            "(not a U-Net of the configured shape?)"
        ) from None


def check_source_family(path: str | Path, cfg: Any) -> None:
    """Refuses an SD 1.x/2.x source for an SDXL config and an SDXL source for an SD config.

    Raises:
        CheckpointError: One line naming the source, the config's family and the fix.
    """
    from ldm.checkpoint.sdxl_layout import is_sdxl_folder
    from ldm.checkpoint.sdxl_single_file import check_not_sd_file_for_sdxl_config, is_sdxl_file
    from ldm.pretrained import source_kind

    path = Path(path)
    kind = source_kind(path)
    sdxl_config = cfg.model.unet.adm_in_channels is not None
    if kind == "sd":
        check_not_sd_file_for_sdxl_config(path, cfg)
        sdxl_source = is_sdxl_file(path)
    elif kind == "diffusers" and (path / "unet").is_dir():
        sdxl_source = is_sdxl_folder(path)
        if sdxl_config and not sdxl_source:
            raise CheckpointError(
                f"{path} is an SD 1.x/2.x diffusers folder but the config is "
                "SDXL's; use -c configs/ldm/sd1.yaml or sd2.yaml for it"
            )
    else:
        return
    if sdxl_source and not sdxl_config:
        raise CheckpointError(
            f"{path} is an SDXL source but the config's U-Net is not SDXL's "
            "(no adm_in_channels): use -c configs/ldm/sdxl.yaml"
        )
    if sdxl_source and is_refiner_source(path, kind):  # the config is the base's: the
        how = "-c configs/ldm/sdxl-refiner.yaml " if kind == "sd" else ""  # refiner's refused
        raise CheckpointError(  # at load (ldm.consistency), the reverse of this
            f"{path} is the SDXL refiner (second text encoder only, aesthetic-score "
            f"conditioning) but the config is the SDXL base's: the refiner samples (sample.py "
            f"--ckpt {path} {how}--aesthetic-score 6) but does not train here; start "
            "configs/ldm/sdxl.yaml from an SDXL base file or folder"
        )


def is_refiner_source(path: Path, kind: str) -> bool:
    """Whether an SDXL single file (``kind`` "sd") or diffusers folder is the refiner's: its
    only embedder is ViT-bigG (a folder's ``model_index.json`` has no ``text_encoder``)."""
    if kind == "sd":
        from ldm.checkpoint.sdxl_single_file import is_refiner_file

        return is_refiner_file(path)
    index = path / "model_index.json"
    return index.is_file() and not any(json.loads(index.read_text()).get("text_encoder") or [None])
