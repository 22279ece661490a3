"""LoRA files in the layouts other tools exchange: diffusers/peft and kohya (SD 1.x/2.x; SDXL's
names in `ldm.checkpoint.lora_sdxl`).

Every layout holds, per adapted layer, ``A`` (r × in, "down") and ``B`` (out × r, "up") of Hu et
al. 2021 and a scale ``alpha / r``; they differ in names and in where alpha lives::

    ldm        <our U-Net layer>.lora_down.weight / .lora_up.weight / .alpha     (lora_keys.py)
               text_encoder.text_model.<module>.lora_down.weight / ...
    diffusers  unet.<diffusers module>.lora_A.weight (A) / .lora_B.weight (B)
               text_encoder.text_model.<module>.lora_A.weight / .lora_B.weight
               alpha: peft's LoraConfig in the header's "lora_adapter_metadata" JSON
               ("unet.lora_alpha", "unet.r", rank/alpha patterns, rslora); none: alpha = r.
    kohya      lora_unet_<diffusers module, dots as underscores>.lora_down.weight / .lora_up.weight
               / .alpha, lora_te_text_model_<module>... (sd-scripts' networks/lora.py for SD1/2)

diffusers files are written with ``alpha / r`` folded into ``B`` and no adapter metadata, so
every reader (diffusers, ComfyUI, peft) computes the same update ``B A``. Our U-Net names map to
diffusers' through the same table as the full U-Net (`ldm.checkpoint.unet_keys`); kohya's flat
names are matched against the flattened names of the layers the model has, so an ambiguous
underscore never guesses. Text-encoder names are transformers' CLIP names below ``text_model.``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.unet_keys import unet_ldm_to_diffusers

#: layer -> (A: r × in[, 1, 1], B: out × r[, 1, 1], alpha); the update is (alpha / r) · B A
Adapters = dict[str, tuple[torch.Tensor, torch.Tensor, float]]
#: "unet" / "text_encoder" (/ "text_encoder_2", SDXL) -> its adapters
LoRAParts = dict[str, Adapters]
#: (part, layer) -> a file key of that layer (for messages)
FileKeys = dict[tuple[str, str], str]
#: (channel_mult, num_res_blocks, attention_resolutions) of the U-Net
Layout = tuple[Sequence[int], int, Sequence[int]]

FORMATS = ("ldm", "diffusers", "kohya")
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
TEXT_PREFIX = "text_model."
TEXT_PARTS = ("text_encoder", "text_encoder_2")
_DIFFUSERS_PART = {
    "unet": "unet.",
    "text_encoder": "text_encoder.",
    "text_encoder_2": "text_encoder_2.",
}
_KOHYA_PART = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
#: sd-scripts' prefixes for SDXL (networks/lora.py LORA_PREFIX_TEXT_ENCODER1/2)
KOHYA_SDXL_PART = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_SUFFIX = re.compile(r"\.lora_([AB])\.weight$")
_KOHYA_SUFFIX = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha)$")


@dataclass(frozen=True)
class LayerNames:
    """Our name of each layer a LoRA may adapt -> the name diffusers (and kohya, flattened) use.

    Attributes:
        unet: Our U-Net layer -> diffusers ``UNet2DConditionModel`` module.
        text_encoder: The layer's name in our text encoder's transformers model ->
            ``text_model.<module>`` (transformers 5 drops the ``text_model.`` level in names).
        text_encoder_2: SDXL's second encoder, likewise (``text_projection`` stays as is).
        kohya_unet: Our U-Net layer -> kohya's module name (None: diffusers'; SDXL: ours, the
            original SGM names sd-scripts trains SDXL under).
    """

    unet: dict[str, str]
    text_encoder: dict[str, str]
    text_encoder_2: dict[str, str] = field(default_factory=dict)
    kohya_unet: dict[str, str] | None = None

    @property
    def sdxl(self) -> bool:
        """Whether these are SDXL names (kohya's ``lora_te1_``/``lora_te2_``, SGM U-Net)."""
        return self.kohya_unet is not None

    def part(self, part: str) -> dict[str, str]:
        """The map of ``part`` ("unet", "text_encoder" or "text_encoder_2")."""
        return getattr(self, part)

    def kohya(self, part: str) -> dict[str, str]:
        """The map of ``part`` to kohya's module names (before dots become underscores)."""
        return (
            self.kohya_unet if part == "unet" and self.kohya_unet is not None else self.part(part)
        )

    def kohya_prefixes(self) -> dict[str, str]:
        """kohya's key prefix of each part."""
        return KOHYA_SDXL_PART if self.sdxl else _KOHYA_PART


def unet_layer_names(layers: Iterable[str], layout: Layout) -> dict[str, str]:
    """Our U-Net layer names -> diffusers module names (layers without a counterpart left out).

    Args:
        layers: Module names in our U-Net (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``).
        layout: The U-Net's ``channel_mult``, ``num_res_blocks``, ``attention_resolutions``.
    """
    out: dict[str, str] = {}
    for layer in layers:
        try:
            (theirs,) = unet_ldm_to_diffusers({layer + ".weight": torch.empty(0)}, *layout)
        except KeyError:
            continue
        out[layer] = theirs.removesuffix(".weight")
    return out


def text_layer_names(layers: Iterable[str]) -> dict[str, str]:
    """A transformers text model's module names -> ``text_model.<module>`` (``text_projection``
    of a ``CLIPTextModelWithProjection`` stays outside ``text_model.``)."""
    return {
        layer: layer if layer.startswith((TEXT_PREFIX, "text_projection")) else TEXT_PREFIX + layer
        for layer in layers
    }


def adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The linear and 1×1/k×k conv layers of ``module`` (not the adapters' own), by name."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and ".lora_" not in f".{name}"
    }


def model_layer_names(
    unet: nn.Module, layout: Layout, text_model: nn.Module | None = None
) -> LayerNames:
    """:class:`LayerNames` of every layer of a live U-Net (and text encoder) a LoRA may adapt."""
    return LayerNames(
        unet_layer_names(adaptable_layers(unet), layout),
        text_layer_names(adaptable_layers(text_model)) if text_model else {},
    )


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _folded(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    return up.float() * (alpha / down.shape[0])


def to_diffusers(
    parts: LoRAParts, names: LayerNames
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a diffusers/peft LoRA file (``alpha / r`` folded into ``B``)."""
    tensors: dict[str, torch.Tensor] = {}
    for part, adapters in parts.items():
        table = names.part(part)
        for layer, (down, up, alpha) in adapters.items():
            key = _DIFFUSERS_PART[part] + _exported_name(table, part, layer)
            tensors[key + ".lora_A.weight"] = down.float()
            tensors[key + ".lora_B.weight"] = _folded(down, up, alpha)
    return tensors, {"format": "pt"}


def to_kohya(parts: LoRAParts, names: LayerNames) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a kohya (sd-scripts) LoRA file."""
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    prefixes = names.kohya_prefixes()
    for part, adapters in parts.items():
        table = names.kohya(part)
        for layer, (down, up, alpha) in adapters.items():
            key = prefixes[part] + _exported_name(table, part, layer).replace(".", "_")
            tensors[key + ".lora_down.weight"] = down.float()
            tensors[key + ".lora_up.weight"] = up.float()
            tensors[key + ".alpha"] = torch.tensor(float(alpha))
            ranks.add(down.shape[0])
            alphas.add(float(alpha))
    meta = {"ss_network_module": "networks.lora"}
    if len(ranks) == 1 and len(alphas) == 1:
        meta.update(ss_network_dim=str(ranks.pop()), ss_network_alpha=f"{alphas.pop():g}")
    return tensors, meta


def _exported_name(table: Mapping[str, str], part: str, layer: str) -> str:
    if layer not in table:
        raise CheckpointError(
            f"{part} layer {layer} has no diffusers counterpart (only the "
            "ldm format can hold this LoRA)"
        )
    return table[layer]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def detect_format(keys: Iterable[str], metadata: Mapping[str, str], path: Any) -> str:
    """ "ldm", "diffusers" or "kohya", from a LoRA file's keys and header metadata.

    Raises:
        CheckpointError: Keys of none of the three layouts (the first such key named).
    """
    keys = list(keys)
    if not keys:
        raise CheckpointError(f"{path} holds no tensors")
    if metadata.get("format") == "ldm-lora":
        return "ldm"
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(_PEFT_SUFFIX.search(k) for k in keys):
        return "diffusers"
    if all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys):
        return "ldm"
    raise CheckpointError(
        f"{path}: key {keys[0]!r} is in no LoRA layout we read (ldm: <layer>.lora_down.weight; "
        "diffusers/peft: unet.<module>.lora_A.weight; kohya: lora_unet_<module>.lora_down.weight)"
    )


def unmatched_error(path: Any, unmatched: Sequence[tuple[str, str]], sdxl: bool) -> CheckpointError:
    """One line naming how many keys match no layer of the model, and the first three."""
    parts = sorted({part for _, part in unmatched})
    what = " or ".join("U-Net" if p == "unet" else p.replace("_", " ") for p in parts)
    family = "SDXL" if sdxl else "SD 1.x/2.x"
    shown = ", ".join(repr(k) for k, _ in unmatched[:3])
    more = f" (and {len(unmatched) - 3} more)" if len(unmatched) > 3 else ""
    return CheckpointError(
        f"{path}: {len(unmatched)} key(s) name no layer of this {family} model's {what}: "
        f"{shown}{more} (a LoRA for another base model or layout?)"
    )


def _pair(path: Any, found: dict[str, dict[str, Any]]) -> Adapters:
    adapters: Adapters = {}
    for layer, entry in found.items():
        if "down" not in entry or "up" not in entry:
            missing = "down (lora_A)" if "down" not in entry else "up (lora_B)"
            raise CheckpointError(f"{path}: key {entry['key']!r} has no matching {missing} weight")
        adapters[layer] = (
            entry["down"],
            entry["up"],
            entry.get("alpha", float(entry["down"].shape[0])),
        )
    return adapters


def file_keys(found: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> FileKeys:
    """(part, layer) -> the first file key seen for it."""
    return {
        (part, layer): entry["key"]
        for part, entries in found.items()
        for layer, entry in entries.items()
    }


def from_kohya(
    tensors: Mapping[str, torch.Tensor], names: LayerNames, path: Any
) -> tuple[LoRAParts, FileKeys]:
    """Adapters of a kohya file under our layer names, and a file key of each layer.

    Raises:
        CheckpointError: A key outside the layout or naming no layer of the model.
    """
    prefixes = names.kohya_prefixes()
    inverse = {
        part: {
            prefix + theirs.replace(".", "_"): ours for ours, theirs in names.kohya(part).items()
        }
        for part, prefix in prefixes.items()
    }
    if names.sdxl:  # SDXL files converted from diffusers name the U-Net as diffusers does
        inverse["unet"].update(
            {"lora_unet_" + t.replace(".", "_"): o for o, t in names.unet.items()}
        )
    found: dict[str, dict[str, dict[str, Any]]] = {part: {} for part in prefixes}
    unmatched: list[tuple[str, str]] = []
    for key, value in tensors.items():
        match = _KOHYA_SUFFIX.search(key)
        part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), "text_encoder")
        if match is None:
            raise CheckpointError(
                f"{path}: key {key!r} is not a kohya LoRA weight (expected "
                "<module>.lora_down.weight / .lora_up.weight / .alpha)"
            )
        layer = inverse[part].get(key[: match.start()])
        if layer is None:
            unmatched.append((key, part))
            continue
        entry = found[part].setdefault(layer, {"key": key})
        what = match.group(1)
        if what == "alpha":
            entry["alpha"] = float(value)
        else:
            entry["down" if what.startswith("lora_down") else "up"] = value
    if unmatched:
        raise unmatched_error(path, unmatched, names.sdxl)
    return {part: _pair(path, f) for part, f in found.items() if f}, file_keys(found)


def _peft_config(metadata: Mapping[str, str], part: str) -> dict[str, Any]:
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return {}
    prefix = _DIFFUSERS_PART[part]
    return {k[len(prefix) :]: v for k, v in json.loads(raw).items() if k.startswith(prefix)}


def _peft_alpha(config: Mapping[str, Any], module: str, rank: int, path: Any, key: str) -> float:
    """The alpha giving peft's scale for ``module``: ``lora_alpha / r`` (rslora: ``/ √r``)."""
    if not config:
        return float(rank)  # no LoraConfig: diffusers' convention, W + B A
    if config.get("use_dora"):
        raise CheckpointError(
            f"{path}: key {key!r} is a DoRA adapter (use_dora), which we do not read"
        )
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def from_diffusers(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], names: LayerNames, path: Any
) -> tuple[LoRAParts, FileKeys]:
    """Adapters of a diffusers/peft file under our layer names (alpha from its LoraConfig), and
    a file key of each layer.

    Raises:
        CheckpointError: A key outside ``unet.`` / ``text_encoder.`` ``*.lora_A/B.weight``
            (e.g. DoRA magnitudes, lora_B biases), or one naming no layer of the model.
    """
    inverse = {
        part: {theirs: ours for ours, theirs in names.part(part).items()}
        for part in _DIFFUSERS_PART
    }
    for part in TEXT_PARTS:  # files from transformers 5 may drop the text_model. level
        inverse[part].update(
            {theirs.removeprefix(TEXT_PREFIX): ours for ours, theirs in names.part(part).items()}
        )
    found: dict[str, dict[str, dict[str, Any]]] = {part: {} for part in _DIFFUSERS_PART}
    modules: dict[tuple[str, str], str] = {}
    unmatched: list[tuple[str, str]] = []
    alphas: dict[tuple[str, str], float] = {}
    for key, value in tensors.items():
        part = next((p for p, prefix in _DIFFUSERS_PART.items() if key.startswith(prefix)), None)
        match = _PEFT_SUFFIX.search(key)
        is_alpha = part is not None and key.endswith(".alpha")  # older files' network alphas
        if part is None or (match is None and not is_alpha):
            raise CheckpointError(
                f"{path}: key {key!r} is not a diffusers LoRA weight "
                "(expected unet.<module>.lora_A.weight / .lora_B.weight, or "
                "text_encoder.… / text_encoder_2.…)"
            )
        module = key[len(_DIFFUSERS_PART[part]) : -len(".alpha") if is_alpha else match.start()]
        layer = inverse[part].get(module)
        if layer is None:
            unmatched.append((key, part))
            continue
        if is_alpha:
            alphas[part, layer] = float(value)
            continue
        entry = found[part].setdefault(layer, {"key": key})
        entry["down" if match.group(1) == "A" else "up"] = value
        modules[part, layer] = module
    if unmatched:
        raise unmatched_error(path, unmatched, names.sdxl)
    for part, entries in found.items():
        config = _peft_config(metadata, part)
        for layer, entry in entries.items():
            if (part, layer) in alphas:
                entry["alpha"] = alphas[part, layer]
            elif "down" in entry:
                entry["alpha"] = _peft_alpha(
                    config, modules[part, layer], entry["down"].shape[0], path, entry["key"]
                )
    return {part: _pair(path, f) for part, f in found.items() if f}, file_keys(found)
