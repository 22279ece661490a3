"""AdamW with a linear warm-up followed by a constant or cosine learning rate.

AdamW (Loshchilov & Hutter 2019, Algorithm 2) runs as PyTorch's *fused* kernel wherever it can
(``optim.implementation=auto``): one pass over each parameter's weight, gradient and two moments
instead of the per-tensor loop PyTorch picks on the CPU (or the multi-pass ``foreach`` one it
picks on GPUs). For SD1's 860M weights on a 2-core CPU that step took 0.40-0.47 s against the
loop's 2.35-2.84 s inside a training step, and 434 against 1473 ms in ``bench/optim.py``
(README, *Benchmarks*): the largest single share of a CPU training step, before.
"""

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


#: ``optim.implementation`` values: ``auto`` (fused where it can run, else PyTorch's choice),
#: or one of PyTorch's three AdamW implementations.
IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
#: Lightning's names of fp16 autocast with loss scaling.
FP16_MIXED = ("16-mixed", "16", "fp16-mixed")
#: Device types PyTorch's fused AdamW kernel runs on.
FUSED_DEVICES = frozenset({"cpu", "cuda", "xpu", "mps"})


def fused_unsupported(params: Iterable[torch.Tensor]) -> str | None:
    """Why the fused AdamW kernel cannot take ``params`` (None: it can): it needs plain
    floating-point tensors (no ``DTensor`` shards) on a device type it has a kernel for."""
    for p in params:
        if not p.is_floating_point():
            return f"a {p.dtype} parameter"
        if p.device.type not in FUSED_DEVICES:
            return f"a parameter on {p.device.type}"
        if _is_dtensor(p):
            return "a DTensor parameter"
    return None


def _is_dtensor(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(p, DTensor)


def implementation_kwargs(
    implementation: str, params: Sequence[torch.Tensor], scaled_clipping: bool = False
) -> dict[str, bool]:
    """``torch.optim.AdamW`` keyword arguments selecting ``implementation``.

    Args:
        implementation: One of :data:`IMPLEMENTATIONS`.
        params: The parameters the optimizer will hold (their devices and dtypes decide
            ``auto``).
        scaled_clipping: Gradients are clipped under fp16 loss scaling (``16-mixed``). The fused
            step unscales gradients itself, so Lightning cannot clip before it: ``auto`` then
            takes PyTorch's default instead, and ``fused`` is refused.

    Raises:
        ValueError: An unknown implementation, or ``fused`` where it cannot run.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown optim.implementation '{implementation}': expected one of "
            + ", ".join(IMPLEMENTATIONS)
        )
    if implementation == "foreach":
        return {"foreach": True}
    if implementation == "for-loop":
        return {"foreach": False}
    why = fused_unsupported(params)
    if why is None and scaled_clipping:
        why = "gradient clipping under trainer.precision=16-mixed (it unscales gradients itself)"
    if why is None:
        return {"fused": True}
    if implementation == "fused":
        raise ValueError(
            f"optim.implementation=fused cannot run with {why}: use optim.implementation=auto "
            "or foreach"
        )
    return {}


def build_optimizer(
    param_groups: Sequence[dict[str, Any]] | Iterable[torch.nn.Parameter],
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    implementation: str = "auto",
    scaled_clipping: bool = False,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters (frozen ones are skipped), as ``implementation``
    (:func:`implementation_kwargs`; ``auto``: fused wherever it can run)."""
    groups = list(param_groups)
    if groups and isinstance(groups[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        params = [p for g in groups for p in g["params"]]
    else:
        groups = [p for p in groups if p.requires_grad]
        params = groups
    flags = implementation_kwargs(implementation, params, scaled_clipping)
    optimizer = torch.optim.AdamW(
        groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **flags
    )
    optimizer.register_load_state_dict_post_hook(_keep_implementation(flags))
    return optimizer


def _keep_implementation(flags: dict[str, bool]) -> Any:
    """A load-state-dict hook that keeps this run's implementation: a loaded state dict carries
    the saving run's ``fused``/``foreach`` flags (a resume of a run saved before ``auto`` chose
    the fused kernel would fall back to the loop), and the fused kernel wants its step counts
    as float32 tensors on the parameter's device, the others on the CPU."""
    fused = bool(flags.get("fused"))

    def hook(optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["fused"] = flags.get("fused")
            group["foreach"] = flags.get("foreach")
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                step = state.get("step")
                if isinstance(step, torch.Tensor):
                    device = p.device if fused else torch.device("cpu")
                    state["step"] = step.to(device=device, dtype=torch.float32)

    return hook


def scaled_clipping(trainer: Any, clip_val: float | None) -> bool:
    """Whether ``trainer`` clips gradients (``clip_val``) under fp16 loss scaling."""
    return bool(clip_val) and str(getattr(trainer, "precision", "")) in FP16_MIXED


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
