"""Shard URLs: expansion, existence checks, opening, and splitting across ranks and workers.

A shard spec is a brace pattern (``data/train-{000000..000127}.tar``), a local path, a list of
those, or any URL that webdataset's ``gopen`` (``pipe:``, ``http(s)``, ``gs``, ``hf``...) or
fsspec (``s3://``, ``az://``...) can open.

Splitting (non-resampled mode) is a pure function of ``(urls, seed, epoch, rank, world_size,
worker, num_workers)``: every process shuffles the full list with the same ``(seed, epoch)``
seed, rank ``r`` takes ``urls[r::world_size]`` and worker ``w`` of that rank takes
``rank_urls[w::num_workers]``. So within an epoch the shards are partitioned exactly: none is
read twice and none is skipped.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
from collections.abc import Sequence
from typing import IO
from urllib.parse import urlparse

import torch
from webdataset import utils as wds_utils
from webdataset.gopen import Pipe as WdsPipe
from webdataset.gopen import gopen as wds_gopen
from webdataset.gopen import gopen_schemes as wds_gopen_schemes
from webdataset.shardlists import expand_urls as wds_expand_urls

from ldm.data.pipe import WatchedPipe, request_stop

ShardSpec = str | Sequence[str]


class MissingShardError(FileNotFoundError):
    """A local shard named by the spec does not exist (one-line message)."""


def expand_shards(spec: ShardSpec) -> list[str]:
    """Expand a shard spec into a flat list of URLs.

    Args:
        spec: A brace pattern / path / URL, or a list of them. ``::`` separates several
            patterns in one string (webdataset convention).

    Returns:
        The expanded URLs, in order.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        urls.extend(wds_expand_urls(str(item)))
    return urls


def local_path(url: str) -> str | None:
    """Return the filesystem path of a local URL (plain path or ``file:``), else None."""
    if url.startswith("pipe:"):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return parsed.path
    if len(parsed.scheme) == 1:  # Windows drive letter
        return url
    return None


def check_shards_exist(spec: ShardSpec) -> list[str]:
    """Expand ``spec`` and fail fast, in one line, if a local shard is missing.

    Args:
        spec: Shard spec (see :func:`expand_shards`).

    Returns:
        The expanded URLs.

    Raises:
        MissingShardError: Naming the first missing shard and how many of the spec exist.
        ValueError: If the spec expands to no URL at all.
    """
    urls = expand_shards(spec)
    if not urls:
        raise ValueError(f"shard spec {spec!r} expands to no shards")
    local = [(url, local_path(url)) for url in urls]
    local = [(url, path) for url, path in local if path is not None]
    missing = [url for url, path in local if not os.path.isfile(path)]
    if missing:
        present = len(local) - len(missing)
        shown = spec if isinstance(spec, str) else ", ".join(map(str, spec))
        raise MissingShardError(
            f"shard not found: {missing[0]} ({present} of {len(local)} local shards of "
            f"{shown} exist, {len(missing)} missing)"
        )
    return urls


def open_url(url: str, read_timeout_s: float = 0.0) -> IO[bytes]:
    """Open a shard for binary reading.

    Local paths, ``pipe:`` and the schemes webdataset knows go through ``webdataset.gopen``;
    other schemes go through fsspec when it is installed. A shard read from a subprocess
    (``pipe:``, and webdataset's curl/gsutil schemes) is a :class:`ldm.data.pipe.WatchedPipe`:
    it kills a command that produces no bytes for ``read_timeout_s`` seconds (0: never).
    """
    scheme = urlparse(url).scheme
    if url.startswith("pipe:") and not wds_utils.enforce_security:
        return WatchedPipe.command(url, read_timeout_s)  # type: ignore[return-value]
    if url.startswith("pipe:") or scheme in ("", "file") or scheme in wds_gopen_schemes:
        stream = wds_gopen(url, "rb")
        if isinstance(stream, WdsPipe):
            return WatchedPipe(stream, url, read_timeout_s)  # type: ignore[return-value]
        return stream
    try:
        import fsspec
    except ImportError:  # pragma: no cover - fsspec ships with our deps
        return wds_gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def make_seed(*parts: int) -> int:
    """Mix integers into one 63-bit seed (stable across processes and Python runs)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(parts)}q", *parts), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_rng(*parts: int) -> random.Random:
    """A ``random.Random`` seeded deterministically from integers."""
    return random.Random(make_seed(*parts))


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Return ``(rank, world_size)``: explicit arguments win, then torch.distributed, then env.

    Args:
        rank: Explicit rank (tests, or callers that know better).
        world_size: Explicit world size.

    Returns:
        ``(rank, world_size)``.
    """
    if rank is not None and world_size is not None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def worker_info() -> tuple[int, int]:
    """Return ``(worker_id, num_workers)`` of the current DataLoader worker (``(0, 1)`` if none)."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def assign_shards(
    urls: Sequence[str],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[str]:
    """The shards one worker of one rank reads in one epoch (exact partition of ``urls``).

    Args:
        urls: All shard URLs.
        epoch: Epoch number (changes the shuffle).
        seed: Base seed, identical on all ranks.
        shuffle: Shuffle the shard order (seeded by ``(seed, epoch)``) before splitting.
        rank: This process's rank.
        world_size: Number of ranks.
        worker: DataLoader worker id within the rank.
        num_workers: DataLoader workers per rank (1 when loading in the main process).

    Returns:
        This worker's shard URLs, in reading order.
    """
    order = list(urls)
    if shuffle:
        make_rng(seed, epoch).shuffle(order)
    return order[rank::world_size][worker::num_workers]


def defer_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGINT do not kill a worker; they only end the
    shard read it may be blocked in (:func:`ldm.data.pipe.request_stop`).

    ``timeout``, SLURM, Kubernetes and Ctrl+C signal the whole process group. A worker that dies
    of the signal makes the main process fail at its next fetch ("DataLoader worker ... is killed
    by signal") before it can save; surviving it lets the main process handle it (save, stop),
    after which it shuts its workers down as usual, and a worker stuck on a hanging ``pipe:``
    command is free to exit. Workers also exit by themselves when the main process is gone
    (PyTorch's parent watchdog).
    """
    import signal

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
