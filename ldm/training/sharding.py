"""Reading parameters of a model that FSDP shards (no Lightning imports).

Between steps FSDP keeps only this rank's shard of each parameter, under names with
``_fsdp_wrapped_module.`` inserted. Code that reads whole weights outside forward/backward (the
EMA update, checkpoint export) gathers them with :func:`full_parameters` and names them with
:func:`~ldm.nn.wrappers.unwrapped_name`; for unsharded modules both are no-ops, so the same code
runs on one CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ldm.nn.wrappers import unwrapped_name


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP manages (part of) ``module``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def outermost_module(pl_module: nn.Module) -> nn.Module:
    """What the strategy wrapped around a LightningModule (the FSDP root under FSDP), or the
    module itself when it is not attached to a trainer yet."""
    trainer = getattr(pl_module, "_trainer", None)
    wrapped = trainer.strategy.model if trainer is not None else None
    return wrapped if wrapped is not None else pl_module


@contextmanager
def full_parameters(root: nn.Module) -> Iterator[None]:
    """Inside, every FSDP-managed parameter under ``root`` is whole (read-only: changes are not
    written back). A no-op for unsharded modules. Collective under FSDP: all ranks must enter.

    Args:
        root: The outermost module (``trainer.strategy.model``), so that parameters FSDP placed
            in the root unit are gathered too.
    """
    if not is_sharded(root):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, writeback=False):
        yield


def full_state_dict(module: nn.Module, root: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with whole tensors and unwrapped names, also under FSDP.

    Args:
        module: The module to export (e.g. the U-Net).
        root: The outermost (possibly FSDP-wrapped) module; default ``module``. Collective when
            it is sharded: all ranks must call.
    """
    root = module if root is None else root
    if not is_sharded(root):
        return {unwrapped_name(k): v for k, v in module.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    with full_parameters(root):
        for prefix, sub in module.named_modules():
            prefix = f"{prefix}." if prefix else ""
            for name, param in sub.named_parameters(recurse=False):
                state[unwrapped_name(prefix + name)] = param.detach().clone()
            for name, buf in sub.named_buffers(recurse=False):
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    state[unwrapped_name(prefix + name)] = buf.detach().clone()
    return state
