"""The streaming bucket batcher: one-shape batches from a stream of samples of many shapes.

Per DataLoader worker, one buffer per bucket (a sample's image or latent spatial shape); a bucket
is emitted as a batch when it holds ``batch_size`` samples. Memory is bounded by
``max_buffered`` samples across buckets: at the cap, the fullest bucket (the first seen among
equals) is emitted as a smaller batch; with ``max_buffered >= (batch_size - 1) * buckets + 1``
that never happens (pigeonhole). Leftover policy at the end of an exact pass: each non-empty
bucket is emitted as one partial batch, in the order the buckets were first seen, or dropped
with ``drop_last``; nothing carries over into the next epoch, so an epoch's batches stay a pure
function of the worker's sample stream and a mid-epoch resume that skips consumed batches is
exact. In resampled mode the stream is infinite and the batch sizes are given
(:meth:`ldm.data.reader.ShardDataset._worker_batch_sizes`); leftovers are discarded at the end.
See :mod:`ldm.data.buckets` for the bucket sizes and the per-sample transform.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any


def image_bucket_key(sample: Mapping[str, Any]) -> Hashable:
    """The bucket of a decoded sample: the spatial shape of its image or latent."""
    tensor = sample["image"] if "image" in sample else sample["latent_mean"]
    return tuple(tensor.shape[-2:])


class BucketBatcher:
    """Per-bucket buffers that turn one worker's sample stream into one-shape batches.

    Args:
        batch_size: Samples per batch.
        max_buffered: Cap on samples held across all buckets (>= ``batch_size``). When reached,
            the fullest bucket (the first seen among equals) is emitted as a smaller batch.
        drop_last: At the end of an exact pass, drop the leftover partial batches instead of
            emitting one per non-empty bucket.
        key: Bucket of a sample (default: its image/latent spatial shape).

    Attributes:
        peak: The most samples held at once so far (for tests and ``bench/data.py``).
        forced: Batches emitted smaller because the cap was reached.
    """

    def __init__(
        self,
        batch_size: int,
        max_buffered: int,
        drop_last: bool = False,
        key: Callable[[Mapping[str, Any]], Hashable] = image_bucket_key,
    ) -> None:
        if max_buffered < batch_size:
            raise ValueError(
                f"data.buckets.max_buffered={max_buffered} is below the batch size {batch_size}"
            )
        self.batch_size = batch_size
        self.max_buffered = max_buffered
        self.drop_last = drop_last
        self.key = key
        self.peak = 0
        self.forced = 0

    def batches(
        self, samples: Iterable[dict[str, Any]], sizes: Iterator[int] | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Group ``samples`` into one-bucket lists.

        Args:
            samples: The worker's decoded samples.
            sizes: Resampled mode: the size of each batch to emit (the stream is infinite and
                the epoch ends after the last size; leftovers are discarded). None: an exact
                pass, with ``batch_size`` batches and the leftover policy of the class.
        """
        exact = sizes is None
        wanted = iter(sizes) if sizes is not None else _repeat(self.batch_size)
        source = iter(samples)
        buffers: dict[Hashable, list[dict[str, Any]]] = {}
        held = 0
        for size in wanted:
            batch = _take_full(buffers, size)
            while batch is None:
                sample = next(source, None)
                if sample is None:
                    if exact and not self.drop_last:
                        yield from (b for b in buffers.values() if b)
                    return
                bucket = buffers.setdefault(self.key(sample), [])
                bucket.append(sample)
                held += 1
                self.peak = max(self.peak, held)
                if len(bucket) >= size:
                    batch = _take(buffers, self.key(sample), size)
                elif held >= self.max_buffered:
                    fullest = max(buffers, key=lambda k: len(buffers[k]))
                    batch = _take(buffers, fullest, size)
                    self.forced += 1
            held -= len(batch)
            yield batch


def _repeat(value: int) -> Iterator[int]:
    while True:
        yield value


def _take(buffers: dict[Hashable, list], key: Hashable, size: int) -> list:
    batch, buffers[key] = buffers[key][:size], buffers[key][size:]
    return batch


def _take_full(buffers: dict[Hashable, list], size: int) -> list | None:
    for key, bucket in buffers.items():
        if len(bucket) >= size:
            return _take(buffers, key, size)
    return None
