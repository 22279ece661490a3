"""Low-rank adapters (LoRA, Hu et al. 2021) on the U-Net's linear projections.

A adapted layer computes ``y = W x + b + (alpha / r) · B A dropout(x)`` (Hu et al. 2021, eq. 3)
with ``A`` (``lora_down``, r × in) drawn like a Linear's weight and ``B`` (``lora_up``, out × r)
zero, so training starts exactly at the base model. :class:`LoRALinear` is an ``nn.Linear``
keeping the base's ``weight`` and ``bias`` names, so a LoRA'd U-Net's state dict is the base's
plus ``<layer>.lora_down.weight`` / ``<layer>.lora_up.weight``; base checkpoints still load into
it key for key.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Attention projections of every transformer block (``attn1``: self, ``attn2``: cross).
DEFAULT_TARGETS: tuple[str, ...] = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")
LORA_MARKER = ".lora_"


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` plus a rank-``r`` update ``(alpha / r) · B A``.

    Args:
        base: The layer to adapt (its weight and bias are shared, not copied).
        rank: ``r``.
        alpha: Scale numerator (``alpha / r`` multiplies the update; Hu et al. 2021, §4.1).
        dropout: Dropout on the adapter's input.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self.lora_down = nn.Linear(
            self.in_features, rank, bias=False, device=base.weight.device, dtype=base.weight.dtype
        )
        self.lora_up = nn.Linear(
            rank, self.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype
        )
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_up(self.lora_down(self.dropout(x))) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + (alpha / r) · B A`` folded in."""
        layer = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        delta = (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale
        layer.weight.copy_(self.weight.float() + delta)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def add_lora(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Replace the ``nn.Linear`` layers whose names match a pattern with :class:`LoRALinear`,
    and freeze everything but the adapters.

    Args:
        module: E.g. the U-Net.
        rank: Adapter rank ``r``.
        alpha: Scale numerator (None: ``r``, a scale of 1).
        dropout: Adapter input dropout.
        targets: fnmatch patterns of module names.

    Returns:
        The adapted layers' names.

    Raises:
        ValueError: A pattern matches no linear layer.
    """
    linear = {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
    }
    for pattern in targets:
        if not fnmatch.filter(linear, pattern):
            raise ValueError(
                f"model.lora.targets: pattern {pattern!r} matches no linear layer "
                "(names look like 'input_blocks.1.1.transformer_blocks.0.attn1.to_q')"
            )
    chosen = [name for name in linear if any(fnmatch.fnmatchcase(name, p) for p in targets)]
    module.requires_grad_(False)
    for name in chosen:
        _set(
            module, name, LoRALinear(linear[name], rank, rank if alpha is None else alpha, dropout)
        )
    return chosen


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights only (``<layer>.lora_down.weight``, ``<layer>.lora_up.weight``)."""
    return {k: v for k, v in module.state_dict().items() if LORA_MARKER in k}


def merge_lora(module: nn.Module) -> int:
    """Fold every adapter into its base weight (in place); returns how many were merged."""
    names = [name for name, m in module.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        _set(module, name, module.get_submodule(name).merged())  # type: ignore[operator]
    return len(names)


@torch.no_grad()
def merge_adapters(
    module: nn.Module,
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    scale: float = 1.0,
) -> None:
    """``W ← W + scale · (alpha / r) · B A`` for each ``layer -> (A, B, alpha)`` (a LoRA file).

    Layers are linear, or 1×1 convolutions with ``(r, in, 1, 1)`` / ``(out, r, 1, 1)`` adapters
    (SD1's ``proj_in``/``proj_out``, which kohya's LoRAs adapt).

    Raises:
        ValueError: A layer that is neither, or shapes that differ.
    """
    for layer, (down, up, alpha) in adapters.items():
        try:
            target = module.get_submodule(layer)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear | nn.Conv2d):
            raise ValueError(f"LoRA layer {layer} is not a linear or conv layer of the model")
        weight = target.weight
        if (
            down.dim() != weight.dim()
            or down.shape[1] != weight.shape[1]
            or up.shape[0] != weight.shape[0]
            or weight[0, 0].numel() != 1
        ):
            raise ValueError(
                f"LoRA layer {layer}: adapter {tuple(up.shape)}x{tuple(down.shape)} "
                f"does not fit the layer's {tuple(weight.shape)}"
            )
        delta = (up.flatten(1).float() @ down.flatten(1).float()) * (scale * alpha / down.shape[0])
        weight.add_(delta.reshape(weight.shape).to(weight))
