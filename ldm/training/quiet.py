"""Silence the messages a run prints by design, keep every other warning.

- "Found N module(s) in eval mode": the frozen autoencoder and text encoder stay in eval mode
  on purpose (DESIGN.md, convention 9);
- Lightning's "Tip: try installing litlogger/litmodels" advertisements;
- torch's ``LeafSpec`` deprecation, raised inside Lightning's own pytree use, not ours;
- "Total length of `list` across ranks is zero": a run without ``data.val_shards`` has no
  validation by design.
"""

from __future__ import annotations

import logging
import warnings

_MESSAGES = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r"Total length of `list` across ranks is zero.*",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip: For seamless cloud" not in record.getMessage()


def quiet_expected_warnings() -> None:
    """Install the filters (idempotent)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name in (
        "pytorch_lightning.utilities.rank_zero",
        "lightning_fabric.utilities.rank_zero",
        "lightning.pytorch.utilities.rank_zero",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
