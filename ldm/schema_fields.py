"""Documented dataclass fields for the config schemas (:mod:`ldm.schema`, :mod:`ldm.schema_model`).

Every field carries a ``help`` text (and, where it has them, its ``choices``) in its metadata, which
:mod:`ldm.config` uses for validation messages and the README's generated reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A documented dataclass field; lists and dicts get a default factory."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    """A nested schema section."""
    return field(default_factory=cls, metadata={"help": help})
