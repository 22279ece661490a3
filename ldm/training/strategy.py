"""How training executes: the distributed strategy and per-run model execution options.

``trainer.strategy`` is a string; :func:`build_strategy` turns it into what
``pytorch_lightning.Trainer(strategy=...)`` takes:

- ``ddp``: ``DDPStrategy(find_unused_parameters=...)``. The frozen autoencoder and text encoder
  have ``requires_grad=False``, so DDP never registers them for gradient all-reduce and
  ``find_unused_parameters=False`` (the default) is safe: every trainable parameter is in the
  U-Net and receives a gradient each step.
- ``fsdp``: :class:`FrozenAwareFSDPStrategy`, which auto-wraps every U-Net block
  (``TimestepEmbedSequential`` and the ``ResBlock`` / ``SpatialTransformer`` inside it) and every
  autoencoder ``ResnetBlock`` / ``AttnBlock`` in its own FSDP unit, and passes the frozen modules
  (text encoder, frozen autoencoder, the EMA copy, LPIPS) to FSDP as ``ignored_modules``.
  Why ignored rather than skipped by the wrap policy: a policy only decides which modules get
  their *own* unit; whatever it skips is flattened into the root unit and sharded anyway. Frozen
  weights never change, so sharding them only costs an all-gather every forward and puts
  ``requires_grad=False`` tensors into a flat parameter next to trainable ones. Ignored modules
  stay whole on every rank (moved to the rank's device here, which FSDP does not do for them).
  Between steps FSDP keeps only this rank's shard of each parameter, under names with
  ``_fsdp_wrapped_module.`` inserted; the EMA update and ``export_modules`` therefore read the
  U-Net inside :func:`ldm.training.sharding.full_parameters` (a collective
  ``summon_full_params``, entered by every rank) and name weights with ``unwrapped_name``, so
  the EMA stays identical on all ranks and checkpoints look exactly like single-process ones
  (tested with 2 CPU ranks over gloo).
- ``deepspeed*``: passed through to Lightning when the ``deepspeed`` package is installed;
  otherwise a one-line :class:`~ldm.config.ConfigError`.
- anything else (``auto``, ``ddp_spawn``, ``single_device``...): passed through unchanged.

Multi-node runs need nothing from us: Lightning detects torchrun (``TorchElasticEnvironment``)
and SLURM (``SLURMEnvironment``) from their environment variables when no cluster environment
is forced, and ``trainer.num_nodes`` is passed through.

:class:`ExecutionOptions` applies ``trainer.compile``, ``trainer.gradient_checkpointing`` and
``trainer.vae_precision`` to the LightningModule in its ``setup`` hook (before the strategy wraps
it), so they apply to any run built by :func:`ldm.build.build_trainer` without changing how
modules are built.
"""

from __future__ import annotations

import importlib.util

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy, Strategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ldm.config import ConfigError
from ldm.models.autoencoder import AttnBlock, ResnetBlock
from ldm.models.unet import TimestepEmbedSequential
from ldm.nn.attention import SpatialTransformer
from ldm.nn.resnet import ResBlock

#: Module classes that get their own FSDP unit (U-Net blocks and autoencoder blocks).
FSDP_WRAP_CLASSES: frozenset[type[nn.Module]] = frozenset(
    {TimestepEmbedSequential, ResBlock, SpatialTransformer, ResnetBlock, AttnBlock}
)

FSDP_SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def frozen_modules(root: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``root`` whose parameters are all frozen.

    A child that owns parameters, none of which requires a gradient, is returned whole (its
    children are not visited); a child with trainable parameters is searched recursively.

    Args:
        root: Usually the LightningModule.

    Returns:
        The frozen subtrees, in module order (e.g. ``model.autoencoder``,
        ``model.text_encoder`` and ``ema`` of a ``DiffusionModule``).
    """
    found: list[nn.Module] = []
    for child in root.children():
        params = list(child.parameters())
        if not params:
            continue
        if not any(p.requires_grad for p in params):
            found.append(child)
        else:
            found.extend(frozen_modules(child))
    return found


class FrozenAwareFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` that leaves frozen modules out of sharding.

    At ``setup`` (the LightningModule is known, not yet wrapped) the modules returned by
    :func:`frozen_modules` are passed to FSDP as ``ignored_modules`` and moved to this rank's
    device. All constructor arguments are those of ``FSDPStrategy``.
    """

    def setup(self, trainer: pl.Trainer) -> None:
        """Mark frozen modules as ignored, then let ``FSDPStrategy`` wrap and shard the rest."""
        module = self.lightning_module
        ignored = frozen_modules(module) if module is not None else []
        if ignored:
            self.kwargs["ignored_modules"] = ignored
            for frozen in ignored:
                frozen.to(self.root_device)
            rank_zero_info(
                f"FSDP: {len(ignored)} frozen module(s) kept whole (not sharded): "
                + ", ".join(type(m).__name__ for m in ignored)
            )
        super().setup(trainer)


def build_strategy(
    name: str,
    find_unused_parameters: bool = False,
    fsdp_sharding: str = "FULL_SHARD",
) -> str | Strategy:
    """The ``strategy`` argument of ``pytorch_lightning.Trainer`` for ``trainer.strategy``.

    Args:
        name: ``auto``, ``ddp``, ``fsdp``, ``deepspeed`` (or a ``deepspeed_stage_*`` name), or
            any other Lightning strategy name (passed through).
        find_unused_parameters: DDP only: let DDP search the graph for parameters without a
            gradient every step.
        fsdp_sharding: FSDP only: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``NO_SHARD`` or
            ``HYBRID_SHARD``.

    Returns:
        A strategy object for ``ddp`` and ``fsdp``, else the name itself.

    Raises:
        ConfigError: ``deepspeed`` without the package, or an unknown FSDP sharding strategy.
    """
    if name == "ddp":
        return DDPStrategy(find_unused_parameters=find_unused_parameters)
    if name == "fsdp":
        if fsdp_sharding not in FSDP_SHARDING:
            raise ConfigError(
                f"trainer.fsdp_sharding '{fsdp_sharding}' is not one of {', '.join(FSDP_SHARDING)}"
            )
        return FrozenAwareFSDPStrategy(
            auto_wrap_policy=set(FSDP_WRAP_CLASSES),
            sharding_strategy=fsdp_sharding,
            use_orig_params=True,  # mixed requires_grad and torch.compile need it
        )
    if name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"trainer.strategy={name} needs the deepspeed package, which is not "
            "installed (pip install deepspeed), or use trainer.strategy=fsdp"
        )
    return name


def trained_network(module: nn.Module) -> nn.Module | None:
    """The network a LightningModule trains: ``model.unet`` (ldm) or ``autoencoder``."""
    model = getattr(module, "model", None)
    unet = getattr(model, "unet", None)
    if isinstance(unet, nn.Module):
        return unet
    autoencoder = getattr(module, "autoencoder", None)
    return autoencoder if isinstance(autoencoder, nn.Module) else None


def set_gradient_checkpointing(network: nn.Module, enabled: bool = True) -> int:
    """Set every ``use_checkpoint`` flag inside ``network``; returns how many were set."""
    count = 0
    for sub in network.modules():
        if hasattr(sub, "use_checkpoint"):
            sub.use_checkpoint = enabled
            count += 1
    return count


def apply_execution_options(
    module: nn.Module,
    compile: bool = False,
    gradient_checkpointing: bool = False,
    vae_precision: str = "float32",
) -> None:
    """Apply the ``trainer`` options that change how a built module runs (idempotent).

    Args:
        module: A ``DiffusionModule`` or ``AutoencoderModule``.
        compile: ``torch.compile`` the U-Net in place (``nn.Module.compile``: parameter names and
            checkpoints are unchanged). Ignored, with a warning, when there is no U-Net.
        gradient_checkpointing: Turn on gradient checkpointing of the trained network. Only
            ever turns it on, so ``model.unet.use_checkpoint=true`` keeps working.
        vae_precision: ``LatentDiffusion.vae_precision`` (the VAE encode's precision).
    """
    network = trained_network(module)
    if gradient_checkpointing and network is not None:
        set_gradient_checkpointing(network, True)
    model = getattr(module, "model", None)
    if model is not None and hasattr(model, "vae_precision"):
        model.vae_precision = vae_precision
    if compile:
        unet = getattr(model, "unet", None)
        if unet is None:
            rank_zero_warn("trainer.compile compiles the U-Net only; this task has none")
        elif getattr(unet, "_compiled_call_impl", None) is None:
            unet.compile()


class ExecutionOptions(pl.Callback):
    """Applies :func:`apply_execution_options` when training/validation is set up (before the
    strategy wraps the module, on every rank)."""

    def __init__(
        self,
        compile: bool = False,
        gradient_checkpointing: bool = False,
        vae_precision: str = "float32",
    ) -> None:
        self.compile = compile
        self.gradient_checkpointing = gradient_checkpointing
        self.vae_precision = vae_precision

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        apply_execution_options(
            pl_module, self.compile, self.gradient_checkpointing, self.vae_precision
        )
