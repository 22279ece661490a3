"""Seeing through module wrappers (FSDP units, activation checkpointing, ``torch.compile``).

Each wrapper keeps the wrapped module as a child under a fixed attribute and inserts that
attribute into parameter names. Code that dispatches on a module's type or matches weights by
name uses :func:`unwrap` and :func:`unwrapped_name` so it behaves the same wrapped or not.
"""

from __future__ import annotations

from torch import nn

#: Child attributes under which wrappers keep the wrapped module.
WRAPPER_ATTRS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside any wrappers (plain dict lookups: cheap enough for forward passes)."""
    while True:
        children = module._modules
        inner = next((children[a] for a in WRAPPER_ATTRS if a in children), None)
        if inner is None:
            return module
        module = inner


def unwrapped_name(name: str) -> str:
    """A parameter/buffer name as the unwrapped module calls it."""
    for attr in WRAPPER_ATTRS:
        name = name.replace(f"{attr}.", "")
    return name
