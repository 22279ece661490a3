"""Atomic, rotating webdataset tar writers: the library half of shard writing.

Each shard is written under ``<name>.tmp-<pid>`` and renamed when complete, so a killed writer
never leaves a half shard under a final name. Member values are bytes, ``str`` (UTF-8) or
``dict``/``list`` (JSON). ``ldm.data.write_shards`` builds on this to turn folders and tables of
images into shards; ``ldm.data.precompute`` writes latent shards with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from webdataset import TarWriter

_TAR_BLOCK = 512


def _member_bytes(sample: dict[str, Any]) -> int:
    """Tar bytes a sample takes: a 512-byte header plus padded data per member."""
    total = 0
    for key, value in sample.items():
        if key.startswith("__"):
            continue
        total += _TAR_BLOCK + -(-len(value) // _TAR_BLOCK) * _TAR_BLOCK
    return total


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Encode member values to bytes: ``str`` → UTF-8, ``dict``/``list`` → JSON."""
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if key.startswith("__"):
            out[key] = value
        elif isinstance(value, str):
            out[key] = value.encode("utf-8")
        elif isinstance(value, dict | list):
            out[key] = json.dumps(value, sort_keys=True).encode("utf-8")
        else:
            out[key] = bytes(value)
    return out


class ShardWriter:
    """Rotating, atomic tar shard writer (webdataset format).

    Args:
        pattern: Output path with a ``%d``-style field for the shard index,
            e.g. ``"out/train-%06d.tar"``.
        max_samples: Start a new shard after this many samples (None: no limit).
        max_bytes: Start a new shard before exceeding this many tar bytes (None: no limit).
        start_index: Index of the first shard.
        mtime: Fixed member mtime for byte-reproducible shards (None: current time).
    """

    def __init__(
        self,
        pattern: str,
        max_samples: int | None = 10_000,
        max_bytes: float | None = None,
        start_index: int = 0,
        mtime: float | None = None,
    ) -> None:
        if max_samples is not None and max_samples < 1:
            raise ValueError("max_samples must be >= 1")
        self.pattern = pattern
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.start_index = start_index
        self.index = start_index
        self.mtime = mtime
        self.shards: list[str] = []
        self._tar: TarWriter | None = None
        self._file: Any = None
        self._path = ""
        self._count = 0
        self._size = 0

    def _name(self, index: int) -> str:
        try:
            return self.pattern % index
        except TypeError:  # no %d field: a single fixed name (``%%`` escapes a literal %)
            if index == self.start_index:
                return self.pattern % ()
            raise ValueError(f"pattern {self.pattern!r} has no %d field to rotate") from None

    def _open(self) -> None:
        self._path = self._name(self.index)
        self.index += 1
        os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
        self._file = open(f"{self._path}.tmp-{os.getpid()}", "wb")
        self._tar = TarWriter(self._file, encoder=False, mtime=self.mtime)
        self._count = 0
        self._size = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        os.replace(self._file.name, self._path)
        self.shards.append(self._path)
        self._tar = None

    def write(self, sample: dict[str, Any]) -> None:
        """Write one sample ``{"__key__": str, ext: bytes | str | dict, ...}``."""
        sample = encode_sample(sample)
        size = _member_bytes(sample)
        if self._tar is not None and (
            (self.max_samples is not None and self._count >= self.max_samples)
            or (self.max_bytes is not None and self._size + size > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open()
        self._tar.write(sample)  # type: ignore[union-attr]
        self._count += 1
        self._size += size

    def close(self, allow_empty: bool = False) -> None:
        """Finish the current shard (rename it to its final name).

        Args:
            allow_empty: Write a valid empty shard if no sample was written at all.
        """
        if allow_empty and self._tar is None and not self.shards:
            self._open()
        self._finish()

    def abort(self) -> None:
        """Drop the shard in progress (its temp file is removed; finished shards stay)."""
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            os.remove(self._file.name)
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shard(path: str, samples: Iterable[dict[str, Any]], mtime: float | None = None) -> int:
    """Write all ``samples`` into the single shard ``path`` (atomically); returns the count."""
    count = 0
    with ShardWriter(path.replace("%", "%%"), max_samples=None, mtime=mtime) as writer:
        for sample in samples:
            writer.write(sample)
            count += 1
    return count
