"""Exponential moving average of model weights, kept in float32.

The average lives in a frozen copy of the model, so its state dict has the model's own parameter
names (it is exported as ``unet_ema`` next to ``unet``), it moves devices with its owner and it
can be used directly for sampling. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after
``n`` updates (the schedule of the original latent-diffusion ``LitEma``), so early averages are
not dominated by the random initialisation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """A float32 moving average of ``model``'s parameters (buffers are copied).

    Args:
        model: The model to average.
        decay: Target decay ``d``.
        update_every: Update once every this many calls of :meth:`step`.
        warmup: Use ``min(d, (1+n)/(10+n))`` instead of ``d``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, update_every: int = 1,
                 warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.update_every = max(1, update_every)
        self.warmup = warmup
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
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
    def step(self, model: nn.Module) -> bool:
        """Count a training step; every ``update_every`` steps fold ``model`` into the average.

        Returns:
            Whether an update happened.
        """
        self.num_calls += 1
        if int(self.num_calls) % self.update_every:
            return False
        self.update(model)
        return True

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``ema ← d·ema + (1−d)·θ`` for every parameter; buffers are copied."""
        decay = self.current_decay()
        ema_params = dict(self.model.named_parameters())
        ema_vals, new_vals = [], []
        for name, param in model.named_parameters():
            ema_vals.append(ema_params[name])
            new_vals.append(param.detach().to(ema_params[name].dtype))
        if ema_vals:
            torch._foreach_lerp_(ema_vals, new_vals, 1.0 - decay)
        ema_buffers = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():
            if name in ema_buffers:
                ema_buffers[name].copy_(buf)
        self.num_updates += 1

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights under the model's own names."""
        return self.model.state_dict()

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averaged ones."""
        for name, param in model.named_parameters():
            param.copy_(dict(self.model.named_parameters())[name].to(param.dtype))

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model`` (restored on exit)."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    param.copy_(backup[name])
