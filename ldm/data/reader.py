"""The shard reading pipeline: an IterableDataset that yields ready batches.

Per DataLoader worker: shard URLs (exact split, or resampled) → raw tar samples
(:mod:`ldm.data.tarstream`) → shuffle buffer over the *encoded* samples (cheap to hold) →
decode + filter + augment (:mod:`ldm.data.transforms`, or :mod:`ldm.data.cached` with
``cached=True``) → batches. Batching happens inside the worker (use
``DataLoader(dataset, batch_size=None)``), as webdataset recommends, so each worker knows exactly
how many samples it owes in resampled mode.

Bad input never raises: each problem is counted per reason in a :class:`SkipCounter` shared with
the main process (``dataset.counter.counts()``) and logged.

Randomness is a pure function of ``(seed, epoch, step, rank, worker)``; ``epoch`` and ``step``
live in a shared-memory tensor set from the main process (:meth:`ShardDataset.set_position`), so
persistent workers see new epochs too.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ldm.data.bucket_batcher import BucketBatcher, image_bucket_key
from ldm.data.buckets import BucketSet, collate_bucketed, image_to_bucket, size_tensors
from ldm.data.cached import check_cached_shapes, collate_cached, decode_cached_sample
from ldm.data.counters import SkipCounter, SkipSample
from ldm.data.shards import (
    ShardSpec,
    assign_shards,
    check_shards_exist,
    expand_shards,
    make_rng,
    resolve_rank,
    worker_info,
)
from ldm.data.tarstream import RawSample, iter_tar_samples
from ldm.data.transforms import IMAGE_EXTS, ImageSpec, image_to_tensor

logger = logging.getLogger("ldm.data")


class NoUsableDataError(ValueError):
    """The data source delivers no usable sample (a misconfiguration, not bad input)."""


def parse_caption_key(caption_key: str) -> tuple[str, str | None]:
    """``"txt"`` → ``("txt", None)``; ``"json:caption"`` → ``("json", "caption")``.

    ``"json"`` alone means ``"json:caption"``. Any other extension is read as UTF-8 text.
    """
    ext, _, field = caption_key.partition(":")
    if ext == "json":
        return "json", field or "caption"
    if field:
        raise ValueError(f"caption_key {caption_key!r}: only json members take a :field")
    return ext, None


def extract_caption(raw: RawSample, caption_key: str) -> str:
    """The caption of a raw sample (see :func:`parse_caption_key`).

    Raises:
        SkipSample: ``missing_caption``, ``empty_member`` or ``corrupt_caption``.
    """
    ext, field = parse_caption_key(caption_key)
    data = raw.get(ext)
    if data is None:
        raise SkipSample("missing_caption", f"no .{ext} member")
    if not data:
        raise SkipSample("empty_member", f"zero-byte .{ext}")
    try:
        text = data.decode("utf-8")
        if field is not None:
            value = json.loads(text)
            text = value.get(field) if isinstance(value, dict) else None
            if not isinstance(text, str):
                raise SkipSample("missing_caption", f"json has no string field {field!r}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SkipSample("corrupt_caption", str(exc)) from exc
    except RecursionError as exc:  # e.g. 100k nested arrays
        raise SkipSample("corrupt_caption", "json nested too deeply") from exc
    text = text.strip()
    if not text:
        raise SkipSample("missing_caption", "blank caption")
    return text


def decode_image_sample(
    raw: RawSample,
    spec: ImageSpec,
    caption_key: str,
    rng: random.Random,
    buckets: BucketSet | None = None,
) -> dict[str, Any]:
    """Raw sample → ``{"image": (3, S, S) in [-1, 1], "caption": str, "key": str}``.

    With ``buckets``: the image is its bucket's ``(3, bh, bw)`` uint8 crop, and the sample also
    carries ``original_size``, ``crop_top_left`` and ``target_size``
    (:func:`ldm.data.buckets.image_to_bucket`; :func:`ldm.data.buckets.collate_bucketed`).

    Raises:
        SkipSample: For any problem (see :data:`ldm.data.counters.REASONS`).
    """
    if "__bad__" in raw:
        raise SkipSample(*raw["__bad__"])
    caption = extract_caption(raw, caption_key)
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise SkipSample("missing_image", f"members {members}")
    if buckets is not None:
        return {
            **image_to_bucket(raw[ext], spec, buckets, rng),
            "caption": caption,
            "key": raw["__key__"],
        }
    image = image_to_tensor(raw[ext], spec, rng)
    return {"image": image, "caption": caption, "key": raw["__key__"]}


def collate_images(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded image samples: ``{"image": B×3×S×S, "caption": [...], "key": [...]}``."""
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }


def shuffle_buffer(
    samples: Iterable[RawSample], size: int, rng: random.Random
) -> Iterator[RawSample]:
    """Approximate shuffle with a buffer of ``size`` samples (swap-pop at a random index)."""
    buffer: list[RawSample] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardDataset(IterableDataset):
    """Batches of images+captions (or cached latents) from webdataset tar shards.

    Args:
        shards: Shard spec: brace pattern, path, URL, or a list of them.
        batch_size: Samples per batch (batching happens in the worker).
        image_size: Output side length.
        random_crop: Random instead of center square crop.
        hflip: Random horizontal flip.
        caption_key: ``"txt"`` (or another text member) or ``"json:<field>"``.
        shuffle_buffer: Sample shuffle buffer size per worker; <= 1 disables.
        shard_shuffle: Shuffle the shard order each epoch (seeded by ``(seed, epoch)``).
        resampled: Draw shards with replacement forever (per rank/worker seed) instead of one
            exact pass; for multi-node training.
        epoch_samples: Resampled mode only: samples per epoch per rank (None: infinite).
        min_size: Drop images whose shorter side is smaller (0 disables).
        max_aspect: Drop images with a larger long/short side ratio (None disables).
        cached: Read precomputed latent shards (:mod:`ldm.data.cached`) instead of images.
        seed: Base seed for all shuffles and augmentations.
        drop_last: Drop each worker's last partial batch.
        rank: Rank override (default: torch.distributed, then ``RANK`` env, then 0).
        world_size: World size override.
        check_exists: Fail at construction if a local shard is missing.
        num_slots: Rows of the shared skip counter (> number of workers).
        buckets: Aspect-ratio buckets (:mod:`ldm.data.buckets`): batches of one bucket each,
            from per-bucket buffers on each worker; ``image_size`` is then unused. With
            ``cached=True`` the cached latents are batched by their shape.
        read_timeout_s: A subprocess reader (``pipe:``, curl...) that gives no bytes for this
            long is killed and the read fails with :class:`ldm.data.pipe.ShardReadTimeout`
            (0: wait forever).
        max_consecutive_skips: Resampled mode only, which never ends by itself: raise after
            this many skipped samples in a row (a misconfiguration such as a wrong
            ``caption_key``, not bad input). An exact pass just ends; its summary shows the skips.
        name: Label for log lines.
    """

    def __init__(
        self,
        shards: ShardSpec,
        *,
        batch_size: int = 8,
        image_size: int = 256,
        random_crop: bool = False,
        hflip: bool = False,
        caption_key: str = "txt",
        shuffle_buffer: int = 1000,
        shard_shuffle: bool = True,
        resampled: bool = False,
        epoch_samples: int | None = None,
        min_size: int = 0,
        max_aspect: float | None = None,
        cached: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        check_exists: bool = True,
        num_slots: int = 33,
        buckets: BucketSet | None = None,
        max_consecutive_skips: int = 10_000,
        read_timeout_s: float = 300.0,
        name: str = "data",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if epoch_samples is not None and not resampled:
            raise ValueError("epoch_samples needs resampled=True (an exact pass has its own size)")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError("epoch_samples must be >= 1")
        parse_caption_key(caption_key)
        self.urls = check_shards_exist(shards) if check_exists else expand_shards(shards)
        self.batch_size = batch_size
        self.spec = ImageSpec(image_size, random_crop, hflip, min_size, max_aspect)
        self.caption_key = caption_key
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.resampled = resampled
        self.epoch_samples = epoch_samples
        self.cached = cached
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.buckets = buckets
        self.last_batcher: BucketBatcher | None = None  # this process's latest (peak memory)
        self.max_consecutive_skips = max_consecutive_skips
        self.read_timeout_s = read_timeout_s
        self.counter = SkipCounter(num_slots=num_slots, name=name)
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # (epoch, step)

    # -- position (epoch / step) ---------------------------------------------------------------
    def set_position(self, epoch: int, step: int = 0) -> None:
        """Set the epoch (shard shuffle, seeds) and, for resampled mode, the global step.

        Call from the main process before iterating; persistent workers read it at each
        new iteration. Resampled mode seeds from ``(seed, epoch, step)``, so resuming at a
        global step gives a fresh, reproducible stream.
        """
        self._position[0] = epoch
        self._position[1] = step

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, step)`` the next iteration will use."""
        epoch, step = self._position.tolist()
        return int(epoch), int(step)

    def bind_distributed(self) -> tuple[int, int]:
        """Resolve and freeze ``(rank, world_size)`` (call in the main process, after DDP init)."""
        self.rank, self.world_size = resolve_rank(self.rank, self.world_size)
        return self.rank, self.world_size

    # -- sizes -----------------------------------------------------------------------------
    def _num_batches(self) -> int | None:
        if not self.resampled or self.epoch_samples is None:
            return None
        if self.drop_last:
            return self.epoch_samples // self.batch_size
        return math.ceil(self.epoch_samples / self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch per rank; only defined in resampled mode with ``epoch_samples``."""
        n = self._num_batches()
        if n is None:
            raise TypeError("ShardDataset has no length unless resampled with epoch_samples")
        return n

    def _worker_batch_sizes(self, worker: int, num_workers: int) -> Iterator[int]:
        """Sizes of the batches this worker emits (resampled mode); infinite if no length."""
        total = self._num_batches()
        if total is None:
            while True:
                yield self.batch_size
        for index in range(worker, total, num_workers):
            last = index == total - 1 and not self.drop_last
            remainder = self.epoch_samples - index * self.batch_size  # type: ignore[operator]
            yield min(self.batch_size, remainder) if last else self.batch_size

    # -- pipeline --------------------------------------------------------------------------
    def _worker_urls(self, epoch: int, step: int, rank: int, world: int) -> Iterator[str]:
        worker, num_workers = worker_info()
        if not self.resampled:
            yield from assign_shards(
                self.urls,
                epoch=epoch,
                seed=self.seed,
                shuffle=self.shard_shuffle,
                rank=rank,
                world_size=world,
                worker=worker,
                num_workers=num_workers,
            )
            return
        rng = make_rng(self.seed, epoch, step, rank, worker, 1)
        while True:
            yield rng.choice(self.urls)

    def _raw_samples(self, urls: Iterable[str]) -> Iterator[RawSample]:
        empty_streak = 0
        for url in urls:
            count = 0
            for raw in iter_tar_samples(url, self.counter, self.read_timeout_s):
                count += 1
                yield raw
            empty_streak = 0 if count else empty_streak + 1
            if self.resampled and empty_streak > max(16, 2 * len(self.urls)):
                raise NoUsableDataError(
                    f"{empty_streak} resampled shards in a row held no sample: check "
                    "data.train_shards"
                )

    def _decoded(self, raws: Iterable[RawSample], rng: random.Random) -> Iterator[dict[str, Any]]:
        streak = 0
        shapes = None  # cached mode: every sample's shapes must be the first one's
        for raw in raws:
            try:
                if self.cached:
                    sample = decode_cached_sample(raw)
                    shapes = check_cached_shapes(sample, shapes)
                else:
                    sample = decode_image_sample(
                        raw, self.spec, self.caption_key, rng, self.buckets
                    )
            except SkipSample as skip:
                self.counter.skip(
                    skip.reason, url=raw.get("__url__", ""), key=raw["__key__"], detail=skip.detail
                )
                streak += 1
                if self.resampled and streak >= self.max_consecutive_skips:
                    raise NoUsableDataError(
                        f"{streak} samples in a row were skipped ({self.counter.counts()}); "
                        f"check caption_key={self.caption_key!r}, cached={self.cached} and the data"
                    ) from skip
                continue
            streak = 0
            yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, step = self.position
        rank, world = resolve_rank(self.rank, self.world_size)
        worker, num_workers = worker_info()
        rng = make_rng(self.seed, epoch, step, rank, worker, 0)
        before = self.counter.slot_counts()
        raws = self._raw_samples(self._worker_urls(epoch, step, rank, world))
        if self.shuffle_buffer > 1:
            raws = shuffle_buffer(raws, self.shuffle_buffer, rng)
        samples = self._decoded(raws, rng)
        collate = collate_cached if self.cached else collate_images
        sizes = self._worker_batch_sizes(worker, num_workers) if self.resampled else None
        if self.buckets is not None:
            batcher = BucketBatcher(
                self.batch_size,
                self.buckets.buffer_cap(self.batch_size),
                self.drop_last,
                key=image_bucket_key,
            )
            batches = batcher.batches(samples, sizes)
            self.last_batcher = batcher
            collate = _collate_cached_bucketed if self.cached else collate_bucketed
        else:
            batches = _batches(samples, self.batch_size, sizes, self.drop_last)
        try:
            for batch in batches:
                self.counter.ok(len(batch))
                yield collate(batch)
        finally:
            where = f"in epoch {epoch} (rank {rank}/{world}, worker {worker}/{num_workers})"
            self.counter.log_summary(before, what=where)


def _collate_cached_bucketed(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`collate_cached` plus the samples' sizes (``original_size``...) where cached."""
    return {**collate_cached(samples), **size_tensors(samples)}


def _batches(
    samples: Iterator[dict[str, Any]],
    batch_size: int,
    sizes: Iterator[int] | None,
    drop_last: bool,
) -> Iterator[list[dict[str, Any]]]:
    """Group samples into lists: fixed ``sizes`` (resampled) or ``batch_size`` until exhausted."""
    if sizes is not None:
        for size in sizes:
            batch = [sample for _, sample in zip(range(size), samples, strict=False)]
            if len(batch) < size:
                return  # source exhausted (cannot happen with resampling unless it raised)
            yield batch
        return
    batch: list[dict[str, Any]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch
