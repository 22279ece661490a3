"""Where a sampling run's settings came from: the one ``settings:`` line `sample.py` prints.

Precedence (DESIGN.md, "Config becomes objects in one place"): defaults, then what the weights
source says (our checkpoint's config, a diffusers folder's sections), then each ``-c`` file,
then ``key=value`` overrides; a diffusers folder's weights still fix its U-Net, autoencoder and
text encoder (`ldm.checkpoint.diffusers_layout.WEIGHT_KEYS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

# the keys that change a sample (the training-only ones, e.g. the loss weighting, stay out)
SAMPLING_MODEL_KEYS = {
    f"model.diffusion.{k}"
    for k in (
        "num_timesteps",
        "schedule",
        "beta_start",
        "beta_end",
        "zero_terminal_snr",
        "prediction",
    )
}
SAMPLING_MODEL_KEYS.add("model.text_encoder.layer")


def config_sources(
    path: str | Path,
    cfg: DictConfig,
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
) -> str:
    """One line saying where the sampling settings of ``cfg`` came from.

    Lists each ``sampling.*``, ``model.diffusion.*`` and ``model.text_encoder.layer`` value that
    the checkpoint or folder, a ``-c`` file or an override set, with the last source that set it
    (precedence: overrides, then ``-c`` files in order, then the checkpoint/folder, then the
    defaults); also the caller's values that did not apply: for folders what its weights fix,
    for our checkpoints any ``model.*`` key (the model is rebuilt from the checkpoint's own).
    """
    from omegaconf import OmegaConf

    from ldm.checkpoint.format import FORMAT, read_metadata

    def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {
                k: v for key, sub in node.items() for k, v in leaves(sub, f"{prefix}{key}.").items()
            }
        return {prefix[:-1]: node}

    path = Path(path)
    layers: list[tuple[str, dict[str, Any]]] = []
    ignored: list[str] = []
    if path.is_dir():
        from ldm.checkpoint.sdxl_layout import is_sdxl_folder

        if is_sdxl_folder(path):  # its sections come from sdxl_folder_config, which the loader
            return "settings: SDXL folder: its own unet/vae/text encoders and scheduler"  # used
        from ldm.checkpoint.diffusers_layout import diffusers_folder_config

        layers.append(("folder", leaves(diffusers_folder_config(path))))
    ours: dict[str, Any] | None = None
    if (
        not path.is_dir()
        and path.suffix == ".safetensors"
        and read_metadata(path).get("format") == FORMAT
    ):
        config = OmegaConf.create(read_metadata(path).get("config", "{}"))
        ours = leaves(OmegaConf.to_container(config, resolve=True))
        layers.append(("checkpoint", ours))
    for file in config_files:
        layers.append((Path(file).name, leaves(OmegaConf.to_container(OmegaConf.load(file)))))
    if overrides:
        dotlist = [o[2:] if o.startswith("--") else o for o in overrides]
        layers.append(("override", leaves(OmegaConf.to_container(OmegaConf.from_dotlist(dotlist)))))
    fixer = "the folder's weights fix"
    if path.is_dir():  # the caller's values that the folder's weights replaced in cfg
        from ldm.checkpoint.diffusers_layout import WEIGHT_KEYS

        mine = {k: v for _, values in layers[1:] for k, v in values.items()}  # last one wins
        ignored = sorted(
            k
            for k, v in mine.items()
            if OmegaConf.select(cfg, k) != v
            and any(k == w or k.startswith(w + ".") for w in WEIGHT_KEYS)
        )
    if ours is not None:  # our checkpoints rebuild their model from their own model section
        fixer = "the checkpoint's model fixes"
        mine = {k for _, values in layers[1:] for k in values if k.startswith("model.")}
        ignored = sorted(k for k in mine if ours.get(k) != OmegaConf.select(cfg, k))
    origin: dict[str, str] = {}
    for name, values in layers:
        origin.update(
            {
                k: name
                for k in values
                if k in SAMPLING_MODEL_KEYS
                or (k.startswith("sampling.") and k != "sampling.prompts")
            }
        )
    parts = [
        f"{k}={OmegaConf.select(cfg, k)} ({origin[k]})"
        for k in sorted(origin)
        if OmegaConf.select(cfg, k, default=None) is not None and k not in ignored
    ]
    line = "settings: " + (", ".join(parts) or "all defaults")
    if ignored:
        line += f"; {fixer} {', '.join(ignored)} (yours ignored)"
    return line
