"""Exponential moving average of model weights, kept in float32.

The average lives in a frozen copy of the model, so its state dict has the model's own parameter
names (it is exported as ``unet_ema`` next to ``unet``), it moves devices with its owner and it
can be used directly for sampling. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after
``n`` updates (the schedule of the original latent-diffusion ``LitEma``), so early averages are
not dominated by the random initialisation.

Parameters that do not train (``requires_grad=False`` when the EMA is made: a LoRA run's base
U-Net, ``model.freeze`` patterns) never change, so their average is themselves: the copy shares
those parameter objects with the model instead of duplicating them (float32 ones; others are
copied), and updates skip them. A LoRA run's EMA then costs the adapters' size, not the U-Net's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from ldm.nn.wrappers import unwrapped_name


class EMA(nn.Module):
    """A float32 moving average of ``model``'s parameters (buffers are copied).

    Args:
        model: The model to average.
        decay: Target decay ``d``.
        update_every: Update once every this many calls of :meth:`step`.
        warmup: Use ``min(d, (1+n)/(10+n))`` instead of ``d``.
        share_frozen: Share the model's frozen float32 parameters instead of copying them.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9999,
        update_every: int = 1,
        warmup: bool = True,
        share_frozen: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.update_every = max(1, update_every)
        self.warmup = warmup
        frozen = {
            name: p
            for name, p in model.named_parameters()
            if share_frozen and not p.requires_grad and p.dtype == torch.float32
        }
        #: Names of the parameters shared with the model (never averaged: they never change).
        self.shared: frozenset[str] = frozenset(unwrapped_name(name) for name in frozen)
        memo = {id(p): p for p in frozen.values()}  # deepcopy reuses these objects
        self.model = copy.deepcopy(model, memo).float().eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        """The averaged model always stays in eval mode."""
        super().train(mode)
        self.model.eval()
        return self

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def step(
        self, model: nn.Module, gather: Callable[[], AbstractContextManager[object]] = nullcontext
    ) -> bool:
        """Count a training step; every ``update_every`` steps fold ``model`` into the average.

        Args:
            model: The trained model.
            gather: Context in which ``model``'s parameters are whole, entered only for an
                update (e.g. ``lambda: full_parameters(trainer.strategy.model)`` under FSDP).

        Returns:
            Whether an update happened.
        """
        self.num_calls += 1
        if int(self.num_calls) % self.update_every:
            return False
        with gather():
            self.update(model)
        return True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema ← d·ema + (1−d)·θ`` for every parameter; buffers are copied.

        ``model`` may be wrapped (FSDP units, checkpoint wrappers, ``torch.compile``): names are
        matched after :func:`~ldm.nn.wrappers.unwrapped_name`. Its parameters must be whole
        (under FSDP, call inside :func:`~ldm.training.sharding.full_parameters`).
        """
        decay = self.current_decay()
        ema_params = dict(self.model.named_parameters())  # the copy itself is never wrapped
        ema_vals, new_vals = [], []
        for name, param in model.named_parameters():
            name = unwrapped_name(name)
            if name in self.shared:
                continue
            target = ema_params[name]
            if param.shape != target.shape:
                raise RuntimeError(
                    f"EMA update got a {tuple(param.shape)} shard of {name} "
                    f"{tuple(target.shape)}: update inside full_parameters() under FSDP"
                )
            ema_vals.append(target)
            new_vals.append(param.detach().to(target.dtype))
        if ema_vals:
            torch._foreach_lerp_(ema_vals, new_vals, 1.0 - decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            if (target_buf := ema_buffers.get(unwrapped_name(name))) is not None:
                target_buf.copy_(buf)
        self.num_updates += 1

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names."""
        return self.model.state_dict()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averaged ones."""
        averaged = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            if unwrapped_name(name) not in self.shared:
                param.copy_(averaged[unwrapped_name(name)].to(param.dtype))

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (restored on exit)."""
        backup = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if unwrapped_name(n) not in self.shared
        }
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name in backup:
                        param.copy_(backup[name])
