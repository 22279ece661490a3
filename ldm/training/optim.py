"""AdamW with a linear warm-up followed by a constant or cosine learning rate."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch


def lr_lambda(step: int, warmup_steps: int, schedule: str, total_steps: int, floor: float) -> float:
    """Multiplier of the base learning rate at ``step``.

    Linear warm-up from ~0 to 1 over ``warmup_steps``; then 1 (``constant``) or a half-cosine
    from 1 to ``floor`` over the remaining steps (``cosine``; Loshchilov & Hutter 2017, eq. 5
    without restarts).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule '{schedule}'; expected constant or cosine")


def build_optimizer(
    param_groups: Sequence[dict[str, Any]] | Iterable[torch.nn.Parameter],
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters (frozen ones are skipped)."""
    groups = list(param_groups)
    if groups and isinstance(groups[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    else:
        groups = [p for p in groups if p.requires_grad]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    schedule: str,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` implementing :func:`lr_lambda`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_lambda(step, warmup_steps, schedule, total_steps, min_lr_ratio),
    )
