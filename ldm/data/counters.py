"""Counting bad samples across DataLoader worker processes.

Design: the counts live in one small int64 tensor in shared memory (``share_memory_()``), shaped
``(num_slots, len(COLUMNS))``. Slot 0 belongs to the main process and slot ``1 + worker_id`` to
each DataLoader worker, so every row has a single writer and needs no lock. The tensor is created
in the main process before workers start; forked workers inherit the mapping and spawned workers
receive it through torch's shared-memory pickling, so increments made in a worker are visible in
the main process immediately, including skips that happen after a worker's last batch and across
epochs with or without ``persistent_workers``. The batch format stays untouched.

Each process logs its first ``warn_first`` skips with details (URL, key, error) through the
``ldm.data`` logger, then one summary line per pass over its shards.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("ldm.data")

#: Why a sample (or a whole shard) was skipped.
REASONS: tuple[str, ...] = (
    "open_error",  # the shard could not be opened
    "bad_tar",  # not a tar file / corrupt header
    "truncated_tar",  # the shard ends mid-member or without an end-of-archive marker
    "duplicate_member",  # two members with the same key and extension
    "empty_member",  # a zero-byte image or caption member
    "missing_image",  # no jpg/jpeg/png/webp member
    "corrupt_image",  # PIL cannot decode the image
    "truncated_image",  # image data ends early
    "missing_caption",  # no caption member / field, or a blank caption
    "corrupt_caption",  # caption not UTF-8, or JSON that does not parse
    "too_small",  # shorter side below ``min_size`` (filter)
    "bad_aspect",  # aspect ratio above ``max_aspect`` (filter)
    "too_large",  # more pixels than PIL.Image.MAX_IMAGE_PIXELS (a decompression bomb)
    "missing_latent",  # cached mode: no latent member
    "corrupt_latent",  # cached mode: latent member does not parse / has wrong keys
)
#: Column after the reasons: good samples delivered.
COLUMNS: tuple[str, ...] = (*REASONS, "ok")
_INDEX = {name: i for i, name in enumerate(COLUMNS)}


class SkipSample(Exception):
    """Raised by a decoding step to drop the current sample for ``reason`` (one of REASONS)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in _INDEX:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipCounter:
    """Per-reason skip counts shared between the main process and DataLoader workers.

    Args:
        num_slots: Rows of the shared table: 1 for the main process plus one per worker. Worker
            ids beyond ``num_slots - 1`` wrap around (rows would then have two writers and
            increments could race; keep ``num_slots > num_workers``).
        warn_first: Each process logs its first ``warn_first`` skips individually.
        name: Label used in log lines (e.g. ``"train"``).
    """

    def __init__(self, num_slots: int = 33, warn_first: int = 5, name: str = "data") -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self.table = torch.zeros(num_slots, len(COLUMNS), dtype=torch.int64).share_memory_()
        self.warn_first = warn_first
        self.name = name
        self._warned = 0

    def _slot(self) -> int:
        info = torch.utils.data.get_worker_info()
        if info is None or self.table.shape[0] == 1:
            return 0
        return 1 + info.id % (self.table.shape[0] - 1)

    def skip(self, reason: str, *, url: str = "", key: str = "", detail: str = "") -> None:
        """Count one skip for ``reason`` and log it if this process has warned little so far."""
        self.table[self._slot(), _INDEX[reason]] += 1
        if self._warned < self.warn_first:
            self._warned += 1
            logger.warning(
                "%s: skipped sample %r in %s: %s%s",
                self.name,
                key,
                url,
                reason,
                f" ({detail})" if detail else "",
            )
            if self._warned == self.warn_first:
                logger.warning("%s: further skips are counted and summarised only", self.name)

    def ok(self, n: int = 1) -> None:
        """Count ``n`` good samples delivered."""
        self.table[self._slot(), _INDEX["ok"]] += n

    def slot_counts(self) -> dict[str, int]:
        """Counts of the calling process's own row (used for per-pass summaries)."""
        row = self.table[self._slot()].tolist()
        return dict(zip(COLUMNS, row, strict=True))

    def counts(self) -> dict[str, int]:
        """Totals over all processes: every reason (zeros included) plus ``"ok"``."""
        totals = self.table.sum(dim=0).tolist()
        return dict(zip(COLUMNS, totals, strict=True))

    def reset(self) -> None:
        """Zero all counts (call from the main process while no worker is running)."""
        self.table.zero_()

    def log_summary(self, before: dict[str, int] | None = None, what: str = "so far") -> None:
        """Log one line summarising skips (of this process's row since ``before``, or all)."""
        now = self.counts() if before is None else self.slot_counts()
        if before is not None:
            now = {k: v - before.get(k, 0) for k, v in now.items()}
        skipped = {k: v for k, v in now.items() if k != "ok" and v}
        if skipped:
            total = sum(skipped.values())
            logger.warning(
                "%s: skipped %d (delivered %d) %s: %s",
                self.name,
                total,
                now["ok"],
                what,
                ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())),
            )
