"""The one non-finite guard both Lightning modules use: skip a step whose loss is NaN/inf (on
every rank together), stop after too many in a row, and never write non-finite weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ADVICE = (
    "lower optim.lr, use trainer.precision=bf16-mixed or 32 instead of 16-mixed, or "
    "enable trainer.gradient_clip_val"
)


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses too many steps in a row."""


def all_finite(*values: torch.Tensor) -> bool:
    """Whether every value is finite on every rank (the flag is all-reduced, so all ranks agree
    and skip the same steps)."""
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all()
    flag = finite.float().reshape(1)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def non_finite_tensors(modules: Mapping[str, Mapping[str, torch.Tensor]]) -> list[str]:
    """Names (``module.key``) of the floating-point tensors holding a NaN or an infinity."""
    return [
        f"{name}.{key}"
        for name, state in modules.items()
        for key, t in state.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


class NonFiniteGuard:
    """Counts non-finite losses; :meth:`check` says whether to take the step.

    Args:
        max_bad_steps: Consecutive non-finite losses tolerated before :class:`NonFiniteLossError`.
    """

    def __init__(self, max_bad_steps: int = 20) -> None:
        self.max_bad_steps = max_bad_steps
        self.bad_steps = 0
        self.skipped_steps = 0

    def check(self, step: int, *losses: torch.Tensor) -> bool:
        """True when every loss is finite (on all ranks); otherwise count a skipped step.

        Raises:
            NonFiniteLossError: ``max_bad_steps`` non-finite losses in a row.
        """
        if all_finite(*losses):
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        self.skipped_steps += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", step, self.bad_steps)
        if self.bad_steps >= self.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_steps} consecutive non-finite losses at step {step}: {ADVICE}; the "
                "run's last finite checkpoint is kept (resume it with --resume and new settings)"
            )
        return False
