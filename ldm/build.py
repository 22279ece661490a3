"""The one place where a config becomes objects.

Model sections are passed to constructors as keyword arguments (the schemas in ``ldm.config``
mirror them one to one). Lightning is imported only by the functions that build training
objects, so ``sample.py`` can build models without it.
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig

from ldm.checkpoint.format import Checkpoint, CheckpointError, assign_weights
from ldm.config import to_container
from ldm.run_dir import RunDirError, prepare_run_dir, run_dir  # noqa: F401 (build's API)
from ldm.text_tuning import load_text_encoder_weights, trainable_text_encoder

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from ldm.diffusion import DiffusionLoss, NoiseSchedule, Sampler
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.models.latent_diffusion import LatentDiffusion

log = logging.getLogger(__name__)


def kwargs(section: Any) -> dict[str, Any]:
    """A config section as plain keyword arguments."""
    if isinstance(section, DictConfig):
        return to_container(section)
    return dict(section)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_autoencoder(section: Any) -> AutoencoderKL:
    """``model.autoencoder`` → ``AutoencoderKL``."""
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(**kwargs(section))


def build_autoencoder_loss(section: Any) -> torch.nn.Module:
    """``model.loss`` → ``AutoencoderLoss`` (with its discriminator)."""
    from ldm.models.autoencoder_loss import AutoencoderLoss

    return AutoencoderLoss(**kwargs(section))


def load_autoencoder(path: str | Path, section: Any | None = None) -> AutoencoderKL:
    """An autoencoder with weights: from one of our checkpoints (autoencoder or ldm kind), a
    diffusers ``vae/`` or pipeline folder, or an SD single file (which needs ``section``, the
    resolved ``model.autoencoder``); see :func:`ldm.pretrained.load_autoencoder`."""
    from ldm import pretrained

    return pretrained.load_autoencoder(  # type: ignore[return-value]
        path, None if section is None else kwargs(section)
    )


def autoencoder_from_checkpoint(ckpt: Checkpoint) -> AutoencoderKL:
    """Rebuild the autoencoder a checkpoint's config describes and load its weights strictly."""
    section = ckpt.config.get("model", {}).get("autoencoder", {})
    from ldm.config import load

    cfg = load(base={"model": {"autoencoder": section}})
    with torch.device("meta"):  # no random init: every weight loads next
        model = build_autoencoder(cfg.model.autoencoder)
    load_weights(model, ckpt.module_state("autoencoder"), "autoencoder", assign=True)
    return model


def load_weights(
    module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False
) -> None:
    """``module.load_state_dict(state, strict=True)`` (or `assign_weights`), a mismatch in one line.

    Raises:
        CheckpointError: Missing, unexpected or wrongly shaped tensors (the first few named).
    """
    try:
        _ = assign_weights(module, state) if assign else module.load_state_dict(state)
    except RuntimeError as e:
        details = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        shown = "; ".join(details)[:300]
        raise CheckpointError(
            f"the checkpoint's {what} weights do not fit the {what} its config builds "
            f"({shown}): use the checkpoint with the config it was trained with"
        ) from None


def build_unet(section: Any) -> torch.nn.Module:
    """``model.unet`` → ``UNetModel``."""
    from ldm.models.unet import UNetModel

    return UNetModel(**kwargs(section))


def build_text_encoder(section: Any) -> torch.nn.Module:
    """``model.text_encoder`` → a frozen ``TextEncoder`` of the configured kind (``sdxl``: the
    two-encoder ``SDXLConditioner``, :mod:`ldm.build_sdxl`)."""
    from ldm.models.text_encoders import build_text_encoder as build

    args = kwargs(section)
    if args["kind"] == "sdxl":
        from ldm.build_sdxl import build_conditioner

        return build_conditioner(args)
    return build(args.pop("kind"), **args)


def build_schedule(section: Any) -> NoiseSchedule:
    """``model.diffusion`` → the ``NoiseSchedule``."""
    from ldm.diffusion import NoiseSchedule

    d = kwargs(section)
    if d.get("objective", "ddpm") == "flow":
        from ldm.diffusion.flow import FlowSchedule

        return FlowSchedule(
            num_timesteps=d["num_timesteps"],
            shift=d["flow_shift"],
            shift_base_size=d["flow_shift_base_size"],
        )
    return NoiseSchedule(
        schedule=d["schedule"],
        num_timesteps=d["num_timesteps"],
        beta_start=d["beta_start"],
        beta_end=d["beta_end"],
        zero_terminal_snr=d["zero_terminal_snr"],
    )


def build_diffusion_loss(section: Any) -> DiffusionLoss:
    """``model.diffusion`` → the configured ``DiffusionLoss``."""
    from ldm.diffusion import DiffusionLoss

    d = kwargs(section)
    if d.get("objective", "ddpm") == "flow":
        from ldm.diffusion.flow_loss import FlowLoss

        return FlowLoss(
            timestep_sampling=d["flow_timestep_sampling"],
            logit_mean=d["flow_logit_mean"],
            logit_std=d["flow_logit_std"],
            mode_scale=d["flow_mode_scale"],
            offset_noise=d["offset_noise"],
        )
    return DiffusionLoss(
        prediction=d["prediction"],
        loss_weighting=d["loss_weighting"],
        min_snr_gamma=d["min_snr_gamma"],
        offset_noise=d["offset_noise"],
        timestep_sampling=d["timestep_sampling"],
    )


def build_sampler(section: Any, disable_progress: bool = False, **override: Any) -> Sampler:
    """``sampling`` (+ overrides such as ``steps=``) → a ``Sampler``."""
    from ldm.diffusion import Sampler

    s = {**kwargs(section), **{k: v for k, v in override.items() if v is not None}}
    return Sampler(
        sampler=s["sampler"],
        steps=s["steps"],
        eta=s["eta"],
        karras=s["karras"],
        timestep_spacing=s["timestep_spacing"],
        steps_offset=s["steps_offset"],
        final_sigma=s["final_sigma"],
        grid=s["grid"],
        set_alpha_to_one=s["set_alpha_to_one"],
        clip_sample=s["clip_sample_range"] if s["clip_sample"] else None,
        disable_progress=disable_progress,
    )


def resolve(cfg: DictConfig) -> DictConfig:
    """Fill what a config takes from elsewhere: an ldm run's autoencoder section comes from
    ``model.autoencoder_ckpt`` (so the saved config rebuilds the same autoencoder), and
    ``model.init_from.fingerprint`` from its source (checked when already set)."""
    if cfg.task == "ldm" and cfg.model.autoencoder_ckpt:
        from ldm import pretrained
        from ldm.config import load

        section, where = pretrained.autoencoder_section(
            cfg.model.autoencoder_ckpt,
            kwargs(cfg.model.autoencoder),
            cfg.model.autoencoder_scale_factor,
        )
        source = load(base={"model": {"autoencoder": section}})
        cfg.model.autoencoder = source.model.autoencoder
        log.warning(
            "model.autoencoder_ckpt %s: scale_factor %.6g from %s",
            cfg.model.autoencoder_ckpt,
            cfg.model.autoencoder.scale_factor,
            where,
        )
    if cfg.task == "ldm" and cfg.model.text_encoder.kind == "sdxl":
        from ldm.build_sdxl import check_encoder_folder

        check_encoder_folder(cfg.model.text_encoder.name_or_path)
    if cfg.task == "ldm" and cfg.model.init_from.path:
        from ldm import pretrained

        pretrained.resolve_init(cfg)
    return cfg


def build_latent_diffusion(
    cfg: DictConfig, autoencoder: torch.nn.Module | None = None, empty_weights: bool = False
) -> LatentDiffusion:
    """``model`` → ``LatentDiffusion``. The autoencoder is, in order: the one given, the one in
    ``model.autoencoder_ckpt``, or a fresh one from ``model.autoencoder``. ``empty_weights``:
    fresh ones on the meta device, unset, for a caller that `assign_weights` them all next."""
    from ldm.models.latent_diffusion import LatentDiffusion

    m = cfg.model
    if autoencoder is None and m.autoencoder_ckpt:
        autoencoder = load_autoencoder(m.autoencoder_ckpt, m.autoencoder)
    with torch.device("meta") if empty_weights else contextlib.nullcontext():
        if autoencoder is None:
            autoencoder = build_autoencoder(m.autoencoder)
        unet = build_unet(m.unet)
    if m.lora.rank > 0:  # the base weights' names stay; adapters add <layer>.lora_{down,up}
        from ldm.models.lora import add_lora

        add_lora(unet, m.lora.rank, m.lora.alpha, m.lora.dropout, list(m.lora.targets))
    if m.text_encoder.kind == "sdxl":  # two encoders, vector conditioning: ldm/build_sdxl.py
        from ldm import build_sdxl

        return build_sdxl.sdxl_latent_diffusion(cfg, unet, autoencoder, build_schedule(m.diffusion))
    return LatentDiffusion(
        unet=unet,
        autoencoder=autoencoder,
        text_encoder=trainable_text_encoder(build_text_encoder(m.text_encoder), m),
        schedule=build_schedule(m.diffusion),
        prediction=m.diffusion.prediction,
        use_context_mask=m.use_context_mask,
    )


def load_latent_diffusion(ckpt: Checkpoint, use_ema: bool = True) -> LatentDiffusion:
    """Rebuild a ``LatentDiffusion`` from one of our ldm checkpoints (EMA U-Net by default)."""
    from ldm.config import load

    if ckpt.kind != "ldm":
        raise CheckpointError(f"a '{ckpt.kind}' checkpoint holds no diffusion model")
    cfg = load(base=ckpt.config)
    empty = cfg.model.lora.rank == 0  # a LoRA U-Net's adapters are built on its weights
    model = build_latent_diffusion(
        cfg, autoencoder=autoencoder_from_checkpoint(ckpt), empty_weights=empty
    )
    unet_key = (
        "unet_ema" if use_ema and any(k.startswith("unet_ema.") for k in ckpt.tensors) else "unet"
    )
    load_weights(model.unet, ckpt.module_state(unet_key), "U-Net", assign=empty)
    if cfg.model.init_from.path and cfg.model.init_from.text_encoder:  # the run's base encoder
        from ldm import pretrained

        pretrained.apply_text_init(model, cfg.model.init_from)
    load_text_encoder_weights(model, ckpt)
    return model


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """``data`` → the webdataset ``ShardDataModule``."""
    from ldm.data.datamodule import ShardDataModule

    return ShardDataModule(**kwargs(cfg.data), seed=cfg.run.seed)


def learning_rate(cfg: DictConfig) -> float:
    """``optim.lr``, times the global batch size only when ``optim.scale_lr`` is on (logged)."""
    lr = float(cfg.optim.lr)
    if not cfg.optim.scale_lr:
        return lr
    t = cfg.trainer
    devices = t.devices  # an int, a list of ids, or a string ("auto" counts as one device)
    if isinstance(devices, str):
        devices = int(devices) if devices.isdigit() else 1
    elif not isinstance(devices, int):
        devices = len(devices)
    global_batch = cfg.data.batch_size * max(devices, 1) * t.num_nodes * t.accumulate_grad_batches
    log.warning(
        "optim.scale_lr: lr %.3g x global batch %d = %.3g", lr, global_batch, lr * global_batch
    )
    return lr * global_batch


def build_module(cfg: DictConfig, datamodule: Any | None = None) -> pl.LightningModule:
    """The LightningModule for ``cfg.task``.

    Raises:
        ConfigError: ``data.image_size`` is not a multiple of the autoencoder's factor.
    """
    if cfg.task == "autoencoder":
        from ldm.training.autoencoder_module import AutoencoderModule

        return AutoencoderModule(
            autoencoder=build_autoencoder(cfg.model.autoencoder),
            loss=build_autoencoder_loss(cfg.model.loss),
            lr=learning_rate(cfg),
            disc_lr=cfg.optim.disc_lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
            eps=cfg.optim.eps,
            optim_implementation=cfg.optim.implementation,
            warmup_steps=cfg.optim.warmup_steps,
            lr_schedule=cfg.optim.schedule,
            min_lr_ratio=cfg.optim.min_lr_ratio,
            total_steps=max(cfg.trainer.max_steps, 0),
            gradient_clip_val=cfg.trainer.gradient_clip_val,
        )
    from ldm.training.diffusion_module import DiffusionModule

    prompt = datamodule.empty_prompt() if cfg.data.cached and datamodule is not None else {}
    empty = (prompt["context"], prompt["context_mask"]) if prompt else None
    ema = cfg.model.ema
    model = build_latent_diffusion(cfg)
    if cfg.model.init_from.path:  # before the module copies the U-Net into its EMA
        from ldm import pretrained

        pretrained.apply_init(model, cfg.model.init_from, kwargs(cfg.model.unet))
    return DiffusionModule(
        model=model,
        loss=build_diffusion_loss(cfg.model.diffusion),
        p_uncond=cfg.model.p_uncond,
        lr=learning_rate(cfg),
        text_encoder_lr=cfg.optim.text_encoder_lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
        optim_implementation=cfg.optim.implementation,
        warmup_steps=cfg.optim.warmup_steps,
        lr_schedule=cfg.optim.schedule,
        min_lr_ratio=cfg.optim.min_lr_ratio,
        total_steps=max(cfg.trainer.max_steps, 0),
        ema_decay=ema.decay if ema.enabled else None,
        ema_every=ema.update_every,
        sampler=build_sampler(cfg.sampling, disable_progress=True),
        sample_prompts=list(cfg.sampling.prompts),
        guidance=cfg.sampling.guidance,
        negative_prompt=cfg.sampling.negative_prompt,
        sample_seed=cfg.sampling.seed,
        empty_context=empty,
        empty_pooled=prompt.get("pooled"),
        sdxl_uncond=cfg.model.sdxl.uncond,
        freeze=list(cfg.model.freeze),
        omit_frozen_unet=bool(cfg.model.init_from.path),
    )


# The Lightning side (trainer, callbacks, precision checks) lives in ldm/trainer.py; it is part
# of this module's API, so callers (and tests that substitute it) use build.build_trainer.
from ldm.trainer import (  # noqa: E402, F401
    build_quality_monitor,
    build_trainer,
    check_precision,
)
