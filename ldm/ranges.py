"""Per-key value ranges, checked when a config is loaded (``ldm.config.load``).

The schema checks types and choices; this file checks that each value lies in the range its key
means (a count is at least one, a probability lies in [0, 1], a list has the length its key
needs), so a value that cannot work fails at load time in one line that names the key, the value
and what is allowed, before anything is built or written. Checks that relate several sections
(context width vs encoder, sizes vs factors) live in :mod:`ldm.consistency`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Range:
    """One key's rule: ``ok(value)`` says whether a (non-null) value is allowed."""

    key: str
    ok: Callable[[Any], bool]
    allowed: str


def _int_at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and v >= n


def _number_in(
    lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> Callable[[Any], bool]:
    def ok(v: Any) -> bool:
        if not isinstance(v, int | float) or not math.isfinite(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def _non_negative(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v >= 0


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


def _ints_at_least(n: int, nonempty: bool) -> Callable[[Any], bool]:
    return lambda v: (not nonempty or len(v) > 0) and all(isinstance(x, int) and x >= n for x in v)


def _devices(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v == -1 or v > 0
    if isinstance(v, str):
        text = v.strip()
        if text in ("auto", "-1"):
            return True
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(p.isdigit() for p in parts):
            return False
        return "," in text or int(parts[0]) > 0  # "0,1" lists ids; "2" counts devices
    return len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _betas(v: Any) -> bool:
    return len(v) == 2 and all(_number_in(0.0, 1.0, hi_open=True)(b) for b in v)


def _heads(v: Any) -> bool:
    return isinstance(v, int) and (v == -1 or v > 0)


def _batches_limit(v: Any) -> bool:  # an int count of batches or a fraction in [0, 1]
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    return isinstance(v, float) and 0.0 <= v <= 1.0


COUNT = "an integer >= 1"
LIMIT = "a batch count >= 0 or a fraction in [0, 1]"
RANGES: tuple[Range, ...] = (
    Range("data.image_size", _int_at_least(8), "an integer >= 8 (pixels)"),
    Range("data.batch_size", _int_at_least(1), COUNT),
    Range("data.val_batch_size", _int_at_least(1), COUNT + " or null"),
    Range("data.num_workers", _int_at_least(0), "an integer >= 0"),
    Range("data.shuffle_buffer", _int_at_least(0), "an integer >= 0"),
    Range("data.epoch_samples", _int_at_least(1), COUNT + " or null"),
    Range("data.min_size", _int_at_least(0), "an integer >= 0"),
    Range("data.max_aspect", lambda v: _number_in(1.0, math.inf)(v), "a number >= 1 or null"),
    Range("optim.lr", _non_negative, "a finite number >= 0"),
    Range("optim.disc_lr", _non_negative, "a finite number >= 0 or null"),
    Range("optim.betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.999]"),
    Range("optim.weight_decay", _non_negative, "a finite number >= 0"),
    Range("optim.eps", _positive, "a finite number > 0"),
    Range("optim.warmup_steps", _int_at_least(0), "an integer >= 0"),
    Range("optim.min_lr_ratio", _number_in(0.0, 1.0), "a number in [0, 1]"),
    Range("trainer.devices", _devices, "auto, -1 (all), a count >= 1 or a list of device ids"),
    Range("trainer.num_nodes", _int_at_least(1), COUNT),
    Range(
        "trainer.max_steps",
        lambda v: isinstance(v, int) and (v == -1 or v >= 1),
        "-1 (use trainer.max_epochs) or an integer >= 1",
    ),
    Range(
        "trainer.max_epochs",
        lambda v: isinstance(v, int) and (v == -1 or v >= 1),
        "-1, an integer >= 1 or null",
    ),
    Range("trainer.accumulate_grad_batches", _int_at_least(1), COUNT),
    Range("trainer.gradient_clip_val", _positive, "a finite number > 0 or null"),
    Range("trainer.log_every_n_steps", _int_at_least(1), COUNT),
    Range("trainer.check_val_every_n_epoch", _int_at_least(1), COUNT + " or null"),
    Range("trainer.limit_val_batches", _batches_limit, LIMIT),
    Range("trainer.limit_train_batches", _batches_limit, LIMIT),
    Range(
        "trainer.num_sanity_val_steps",
        lambda v: isinstance(v, int) and v >= -1,
        "-1 (all) or an integer >= 0",
    ),
    Range("trainer.ckpt_every_n_steps", _int_at_least(0), "an integer >= 0 (0: only at the end)"),
    Range("trainer.keep_last_k", _int_at_least(0), "an integer >= 0 (0: keep all)"),
    Range("model.p_uncond", _number_in(0.0, 1.0), "a probability in [0, 1]"),
    Range("model.autoencoder.ch", _int_at_least(1), COUNT),
    Range(
        "model.autoencoder.ch_mult",
        _ints_at_least(1, nonempty=True),
        "a non-empty list of integers >= 1",
    ),
    Range("model.autoencoder.num_res_blocks", _int_at_least(1), COUNT),
    Range("model.autoencoder.z_channels", _int_at_least(1), COUNT),
    Range("model.autoencoder.embed_dim", _int_at_least(1), COUNT),
    Range("model.autoencoder.dropout", _number_in(0.0, 1.0, hi_open=True), "a number in [0, 1)"),
    Range("model.unet.model_channels", _int_at_least(1), COUNT),
    Range(
        "model.unet.channel_mult",
        _ints_at_least(1, nonempty=True),
        "a non-empty list of integers >= 1",
    ),
    Range("model.unet.num_res_blocks", _int_at_least(1), COUNT),
    Range("model.unet.num_heads", _heads, "an integer >= 1, or -1 with num_head_channels set"),
    Range("model.unet.num_head_channels", _heads, "an integer >= 1, or -1 with num_heads set"),
    Range("model.unet.context_dim", _int_at_least(1), COUNT + " or null"),
    Range("model.unet.dropout", _number_in(0.0, 1.0, hi_open=True), "a number in [0, 1)"),
    Range("model.diffusion.num_timesteps", _int_at_least(2), "an integer >= 2"),
    Range(
        "model.diffusion.beta_start",
        _number_in(0.0, 1.0, lo_open=True, hi_open=True),
        "a number in (0, 1)",
    ),
    Range(
        "model.diffusion.beta_end",
        _number_in(0.0, 1.0, lo_open=True, hi_open=True),
        "a number in (0, 1)",
    ),
    Range("model.text_encoder.max_length", _int_at_least(1), COUNT),
    Range("model.ema.decay", _number_in(0.0, 1.0), "a number in [0, 1]"),
    Range("model.ema.update_every", _int_at_least(1), COUNT),
    Range("logging.image_every_n_steps", _int_at_least(0), "an integer >= 0 (0: off)"),
    Range("logging.num_images", _int_at_least(1), COUNT),
    Range("sampling.steps", _int_at_least(1), COUNT),
    Range("sampling.guidance", lambda v: _number_in(-math.inf, math.inf)(v), "a finite number"),
    Range("sampling.guidance_rescale", _number_in(0.0, 1.0), "a number in [0, 1]"),
    Range("sampling.eta", _non_negative, "a finite number >= 0"),
)


def out_of_range(cfg: DictConfig) -> str | None:
    """The first key whose value lies outside its range, as a one-line message; else None."""
    for rule in RANGES:
        value = OmegaConf.select(cfg, rule.key)
        if value is None:
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        if not rule.ok(value):
            return f"config key '{rule.key}' got {value!r}; allowed: {rule.allowed}"
    heads = OmegaConf.select(cfg, "model.unet.num_heads")
    head_channels = OmegaConf.select(cfg, "model.unet.num_head_channels")
    if heads == -1 and head_channels == -1:
        return (
            "config keys 'model.unet.num_heads' and 'model.unet.num_head_channels' are both "
            "-1; set one of them (e.g. model.unet.num_heads=8)"
        )
    return None
