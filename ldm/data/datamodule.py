"""The LightningDataModule over webdataset shards (the only ldm.data module importing Lightning).

Batches: ``{"image": B×3×H×W float32 in [-1, 1], "caption": list[str], "key": list[str]}``, or
with ``cached=True`` ``{"latent_mean", "latent_std": B×C×h×w, "context": B×L×D, "context_mask":
B×L bool, "caption", "key"}`` (float32; :func:`ldm.data.cached.sample_latents` draws z).
With aspect-ratio ``buckets`` (:mod:`ldm.data.buckets`) each batch is one bucket's shape and also
carries ``original_size``, ``crop_top_left`` and ``target_size`` (B×2 int64, ``(h, w)`` order).

Data position: each time a train loader is iterated, the dataset's ``(epoch, step)`` is set
from the attached trainer (``current_epoch`` and the number of batches before this epoch), or from
an internal epoch counter without a trainer. Shard order and augmentation seeds depend on
``(seed, epoch)``; resampled mode also on ``step``. A run resumed mid-epoch re-creates the same
stream and skips the batches already consumed, so it continues exactly where it stopped.
``state_dict()`` / ``load_state_dict()`` carry the epoch for use without a trainer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from ldm.data.buckets import BucketSet, bucket_set
from ldm.data.cached import empty_prompt_location, load_empty_prompt
from ldm.data.precompute import MANIFEST_FILE
from ldm.data.reader import NoUsableDataError, ShardDataset
from ldm.data.shards import defer_stop_signals, expand_shards, local_path

logger = logging.getLogger("ldm.data")


class PositionedLoader(DataLoader):
    """A DataLoader that sets its dataset's ``(epoch, step)`` each time it is iterated, and on a
    mid-epoch resume skips the batches the interrupted run already consumed in that epoch."""

    position_fn: Callable[[], tuple[int, int, int]] | None = None

    def __iter__(self) -> Iterator[Any]:
        dataset = self.dataset
        skip = 0
        if isinstance(dataset, ShardDataset):
            dataset.bind_distributed()
            if self.position_fn is not None:
                epoch, step, skip = self.position_fn()
                dataset.set_position(epoch, step)
        iterator = _interruptible(super().__iter__())
        if skip:
            logger.info("resuming mid-epoch: skipping %d consumed batches", skip)
            return _skipped(iterator, skip)
        if self.position_fn is not None and isinstance(dataset, ShardDataset):
            return _watched(iterator, dataset)
        return iterator


_fetch_depth = 0
_stop_pending: str | None = None


class StopRequested(SIGTERMException):
    """A stop signal arrived while the run waited for data, or before it began to: raised there,
    so a wait that may never end (a hanging ``pipe:`` reader) ends now; the run saves and stops
    (with the state of the last trained batch)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__()
        self.signal_name = signal_name


def request_stop(signal_name: str | None) -> None:
    """Called by a stop signal's handler in the main process (None: forget a pending stop):
    raises :class:`StopRequested` if a batch is being waited for, else the next wait raises."""
    global _stop_pending
    _stop_pending = signal_name
    if signal_name and _fetch_depth > 0:
        raise StopRequested(signal_name)


def _interruptible(iterator: Iterator[Any]) -> Iterator[Any]:
    """Mark each wait for a batch, so a stop signal's handler can end a wait that may never
    return (a hanging ``pipe:`` reader) by raising, instead of waiting for the next batch."""
    global _fetch_depth
    while True:
        if _stop_pending:
            raise StopRequested(_stop_pending)
        _fetch_depth += 1
        try:
            batch = next(iterator, _END)
        finally:
            _fetch_depth -= 1
        if batch is _END:
            return
        yield batch


def _watched(iterator: Iterator[Any], dataset: ShardDataset) -> Iterator[Any]:
    """The no-progress watchdog: an epoch that yields no batch at all would repeat forever
    (Lightning starts the next one, which is empty too), so it stops training instead."""
    delivered = False
    for batch in iterator:
        delivered = True
        yield batch
    if not delivered:
        counts = {k: v for k, v in dataset.counter.counts().items() if v}
        raise NoUsableDataError(
            f"a whole pass over data.train_shards ({len(dataset.urls)} shards) gave no usable "
            f"sample (counts: {counts or 'none read'}): check the shards, "
            f"data.caption_key={dataset.caption_key!r} and data.cached={dataset.cached}"
        )


def _skipped(iterator: Iterator[Any], n: int) -> Iterator[Any]:
    for _ in range(n):
        if next(iterator, _END) is _END:
            return
    yield from iterator


_END = object()


def _check_cache_buckets(train_shards: list[str], buckets: BucketSet | None) -> None:
    """Refuse bucketed latent caches (``manifest.json`` lists buckets) without ``data.buckets``:
    their latents differ in shape and cannot make square batches."""
    urls = expand_shards(train_shards)
    path = local_path(urls[0]) if urls else None
    manifest = os.path.join(os.path.dirname(path), MANIFEST_FILE) if path else None
    if buckets is not None or manifest is None or not os.path.isfile(manifest):
        return
    with open(manifest, encoding="utf-8") as f:
        cached_buckets = json.load(f).get("buckets")
    if cached_buckets:
        raise ValueError(
            f"{manifest} says the cache holds aspect-bucketed latents of {len(cached_buckets)} "
            "sizes; train on it with data.buckets.enabled=true (the buckets it was cached with)"
        )


class ShardDataModule(pl.LightningDataModule):
    """Train/val DataModule over image–caption (or cached-latent) webdataset shards.

    Args:
        train_shards: Train shard specs (brace patterns, paths, URLs).
        val_shards: Validation shard specs; empty disables validation data.
        batch_size: Train batch size per rank.
        val_batch_size: Validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers per rank (0 loads in the main process).
        image_size: Square training resolution.
        random_crop: Random crop along the longer side (train only; val is center-cropped).
        hflip: Random horizontal flip (train only).
        caption_key: ``"txt"`` or ``"json:<field>"`` (``"json"`` means ``"json:caption"``).
        shuffle_buffer: Per-worker sample shuffle buffer (train only).
        shard_shuffle: Shuffle the shard order per epoch (train only).
        resampled: Sample shards with replacement (train only; use for multi-node).
        epoch_samples: Resampled mode: samples per epoch per rank (None: infinite; then train
            with ``max_steps``).
        min_size: Drop images with a smaller shorter side.
        max_aspect: Drop images with a larger long/short ratio.
        cached: Read precomputed latent shards (see :mod:`ldm.data.precompute`); the image
            settings (size, crop, flip, size filters) were applied when caching and are ignored.
        seed: Base seed for shard order, shuffle buffer and augmentation.
        drop_last: Drop each worker's last partial train batch.
        persistent_workers: Keep workers alive between epochs.
        empty_prompt_path: Cached mode: path/URL of ``empty_prompt.safetensors`` (default: next
            to the first train shard).
        buckets: Aspect-ratio buckets: the ``data.buckets`` options (a mapping, see
            :func:`ldm.data.buckets.bucket_set`) or a :class:`BucketSet`; None or
            ``enabled: false`` trains on ``image_size`` squares.
        read_timeout_s: Kill a ``pipe:`` (or curl...) shard reader that gives no bytes for
            this many seconds, with a one-line error naming the shard (0: wait forever).
        rank: Rank override (default: torch.distributed at loader creation).
        world_size: World size override.
    """

    def __init__(
        self,
        train_shards: list[str],
        val_shards: list[str] | None = None,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
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
        persistent_workers: bool = False,
        empty_prompt_path: str | None = None,
        buckets: BucketSet | dict[str, Any] | None = None,
        read_timeout_s: float = 300.0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.cached = cached
        self.empty_prompt_path = empty_prompt_path
        self._epoch = 0
        self._resumed: bool | None = None  # None until the first train iteration
        self._empty_prompt: dict[str, torch.Tensor] | None = None
        if buckets is not None and not isinstance(buckets, BucketSet):
            buckets = bucket_set(buckets)
        self.buckets = buckets
        if cached:
            _check_cache_buckets(list(train_shards), buckets)
        common: dict[str, Any] = dict(
            image_size=image_size,
            caption_key=caption_key,
            min_size=min_size,
            max_aspect=max_aspect,
            cached=cached,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_slots=num_workers + 1,
            buckets=buckets,
            read_timeout_s=read_timeout_s,
        )
        self.train_dataset = ShardDataset(
            list(train_shards),
            batch_size=batch_size,
            random_crop=random_crop,
            hflip=hflip,
            shuffle_buffer=shuffle_buffer,
            shard_shuffle=shard_shuffle,
            resampled=resampled,
            epoch_samples=epoch_samples,
            drop_last=drop_last,
            name="train",
            **common,
        )
        self.val_dataset: ShardDataset | None = None
        if val_shards:
            self.val_dataset = ShardDataset(
                list(val_shards),
                batch_size=val_batch_size or batch_size,
                shuffle_buffer=0,
                shard_shuffle=False,
                name="val",
                **common,
            )

    # -- loaders ---------------------------------------------------------------------------
    def _position(self) -> tuple[int, int, int]:
        """``(epoch, batches before this epoch, batches of this epoch already consumed)``.

        The stream of an epoch is seeded from its first two values, which a resumed run
        recovers from Lightning's restored loop progress; the third is non-zero only when
        resuming mid-epoch, and that many batches are skipped, so the resumed run sees exactly
        the batches the uninterrupted run would have seen.
        """
        trainer = self.trainer
        if trainer is not None:
            epoch_loop = trainer.fit_loop.epoch_loop
            progress = epoch_loop.batch_progress
            epochs = trainer.fit_loop.epoch_progress.current
            epoch = trainer.current_epoch
            resumed, self._resumed = self._resumed, False
            if resumed is None:
                resumed = trainer.ckpt_path is not None  # this is the first iteration
            if resumed and epochs.completed == epochs.processed - 1:
                # Restored from a checkpoint written at an epoch's end (the callbacks defer a
                # save due at an epoch's last batch to there): the loader is iterated before
                # Lightning moves ``current_epoch`` on, and this iterator serves the next epoch.
                return epochs.processed, progress.total.completed, 0
            if epoch_loop.restarting:
                # Restored from a checkpoint, before Lightning's own restart bookkeeping:
                # ``processed`` counts the batches this epoch had consumed when it was saved.
                done = progress.current.processed
                return epoch, progress.total.processed - done, done
            return epoch, progress.total.completed, 0
        epoch, self._epoch = self._epoch, self._epoch + 1
        return epoch, 0, 0

    def _loader(self, dataset: ShardDataset, train: bool) -> PositionedLoader:
        loader = PositionedLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            worker_init_fn=defer_stop_signals,  # the main process handles SIGTERM/SIGINT
            # Its own generator: creating an iterator then draws no number from the global RNG,
            # which would shift the training noise of a resumed run.
            generator=torch.Generator().manual_seed(dataset.seed),
        )
        if train:
            loader.position_fn = self._position
        return loader

    def train_dataloader(self) -> PositionedLoader:
        """Train loader (batches are formed in the workers; ``batch_size=None`` here)."""
        self._warn_uneven_split(self.train_dataset)
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> PositionedLoader | list:
        """Validation loader, or ``[]`` (no validation) without ``val_shards``."""
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, train=False)

    def _warn_uneven_split(self, dataset: ShardDataset) -> None:
        rank, world = dataset.bind_distributed()
        if dataset.resampled or rank != 0:
            return
        workers = max(1, self.num_workers)
        if world > 1 and len(dataset.urls) % world:
            logger.warning(
                "%d shards do not split evenly over %d ranks: ranks will see different numbers "
                "of batches per epoch (DDP can stall); prefer resampled=True with epoch_samples",
                len(dataset.urls),
                world,
            )
        if len(dataset.urls) < world * workers:
            logger.warning(
                "%d shards for %d ranks x %d workers: some workers will be idle",
                len(dataset.urls),
                world,
                workers,
            )

    # -- skips, empty prompt, state --------------------------------------------------------
    def skipped_counts(self, split: str = "train") -> dict[str, int]:
        """Skipped samples per reason (plus delivered ``"ok"``) on this rank since the start."""
        dataset = self.train_dataset if split == "train" else self.val_dataset
        return dataset.counter.counts() if dataset is not None else {}

    def log_skip_summary(self) -> None:
        """Log one summary line per split with any skips."""
        for dataset in (self.train_dataset, self.val_dataset):
            if dataset is not None:
                dataset.counter.log_summary(what="since start")

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """Cached mode: ``{"context": L×D, "context_mask": L}`` of the empty caption."""
        if not self.cached:
            raise RuntimeError("empty_prompt() is only available with cached=True")
        if self._empty_prompt is None:
            location = self.empty_prompt_path or empty_prompt_location(self.train_dataset.urls[0])
            self._empty_prompt = load_empty_prompt(location)
        return self._empty_prompt

    def teardown(self, stage: str) -> None:
        """Log the skip summary at the end of a run."""
        self.log_skip_summary()

    def state_dict(self) -> dict[str, Any]:
        """Data position for resume: the next epoch (without a trainer) and the seed."""
        return {"epoch": self._epoch, "seed": self.train_dataset.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning restores the epoch itself via the trainer)."""
        self._epoch = int(state_dict.get("epoch", 0))
