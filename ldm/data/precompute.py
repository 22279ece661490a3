"""Caching autoencoder latents and text embeddings into new shards (see :mod:`ldm.data.cached`).

``precompute`` reads image shards once, runs the given encoder callables, and writes one cached
shard per input shard (same basename, same sample keys) into ``output_dir``. Every rank does its
share of the shards (``urls[rank::world_size]``, the same split as training), and within a rank
DataLoader workers decode whole shards in parallel while the main process runs the encoders. An
output shard that already exists is skipped unless ``overwrite``, so a killed job can be rerun
(shards are renamed into place only when complete). Rank 0 also writes ``empty_prompt.safetensors``
and ``manifest.json``. This module imports no model code: the encoders are passed in.
"""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ldm.console import progress as show_progress
from ldm.data.buckets import BucketSet, collate_bucketed
from ldm.data.cached import SIZE_KEYS, encode_cached_sample, parse_dtype, save_empty_prompt
from ldm.data.counters import SkipCounter, SkipSample
from ldm.data.reader import collate_images, decode_image_sample
from ldm.data.shard_writer import ShardWriter
from ldm.data.shards import (
    ShardSpec,
    assign_shards,
    check_shards_exist,
    defer_stop_signals,
    resolve_rank,
    worker_info,
)
from ldm.data.tarstream import iter_tar_samples
from ldm.data.transforms import ImageSpec

ImageEncoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
TextEncoder = Callable[[list[str]], tuple[torch.Tensor, ...]]
"""``captions -> (context B×L×D, mask B×L)``, or ``(context, mask, pooled B×P)`` (SDXL)."""
MANIFEST_FILE = "manifest.json"


@dataclass
class PrecomputeSummary:
    """What one rank cached: output shards, samples, skips per reason, shards left as they were,
    and how many captions went through the text encoder (fewer than samples when they repeat)."""

    shards: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    existing: list[str] = field(default_factory=list)
    captions_encoded: int = 0


def output_name(url: str) -> str:
    """Basename of a shard URL (query strings and ``pipe:`` commands stripped)."""
    name = url.split("?", 1)[0].rstrip("/").split("/")[-1].split()[-1]
    return name if name.endswith(".tar") else f"{name}.tar"


class _ShardBatches(IterableDataset):
    """Per worker: whole shards decoded into batches, each tagged with its shard URL."""

    def __init__(
        self,
        urls: list[str],
        spec: ImageSpec,
        caption_key: str,
        batch_size: int,
        slots: int,
        buckets: BucketSet | None = None,
    ) -> None:
        super().__init__()
        self.buckets = buckets
        self.urls = urls
        self.spec = spec
        self.caption_key = caption_key
        self.batch_size = batch_size
        self.counter = SkipCounter(num_slots=slots, name="precompute")

    def _flush(self, url: str, samples: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        collate = collate_images if self.buckets is None else collate_bucketed
        batch = collate(samples) if samples else None
        if batch is not None:
            batch["json"] = [s["json"] for s in samples]
            self.counter.ok(len(samples))
        return {"url": url, "batch": batch, "done": done}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_info()
        rng = random.Random(0)  # center crop, no flip: rng unused but required
        for url in self.urls[worker::num_workers]:
            pending: dict[Any, list[dict[str, Any]]] = {}  # per bucket (one key if square)
            for raw in iter_tar_samples(url, self.counter):
                try:
                    sample = decode_image_sample(
                        raw, self.spec, self.caption_key, rng, self.buckets
                    )
                except SkipSample as skip:
                    self.counter.skip(skip.reason, url=url, key=raw["__key__"], detail=skip.detail)
                    continue
                sample["json"] = raw.get("json")
                bucket = pending.setdefault(sample.get("target_size"), [])
                bucket.append(sample)
                if len(bucket) == self.batch_size:
                    yield self._flush(url, bucket, done=False)
                    bucket.clear()
            rest = [b for b in pending.values() if b]
            for bucket in rest[:-1]:
                yield self._flush(url, bucket, done=False)
            yield self._flush(url, rest[-1] if rest else [], done=True)


class CaptionMemo:
    """Wraps a text encoder so that each distinct caption is encoded once.

    Captioned datasets often repeat captions (templated or synthetic data, alt-text); the memo
    keeps the most recent ``max_entries`` results (least recently used are evicted) and sends only
    unseen captions of a batch to the encoder. Results are identical to encoding every caption, up
    to the float rounding of a different batch composition. Requires an encoder whose output rows
    do not depend on the other prompts of the batch (fixed-length padding with a mask, as every
    ``ldm`` text encoder does).
    """

    def __init__(self, encode_texts: TextEncoder, max_entries: int = 8192) -> None:
        self.encode_texts = encode_texts
        self.max_entries = max_entries
        self.entries: OrderedDict[str, tuple[torch.Tensor, ...]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        new = list(dict.fromkeys(c for c in captions if c not in self.entries))
        if new:
            encoded = self.encode_texts(new)
            for i, caption in enumerate(new):
                self.entries[caption] = tuple(t[i].clone() for t in encoded)
        self.misses += len(new)
        self.hits += len(captions) - len(new)
        rows = [self.entries[c] for c in captions]
        for caption in captions:
            self.entries.move_to_end(caption)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows, strict=True))


def _write_batch(
    writer: ShardWriter,
    batch: dict[str, Any],
    encode_images: ImageEncoder,
    encode_texts: TextEncoder,
    dtype: torch.dtype,
) -> tuple[int, dict[str, Any]]:
    """Encode one batch and write its samples; returns the count and tensor shapes."""
    with torch.no_grad():
        mean, std = encode_images(batch["image"])
        context, mask, *pooled = encode_texts(batch["caption"])
    for i, key in enumerate(batch["key"]):
        sizes = {k: batch[k][i].tolist() for k in SIZE_KEYS if k in batch}
        sample: dict[str, Any] = {
            "__key__": key,
            "safetensors": encode_cached_sample(
                mean[i],
                std[i],
                context[i],
                mask[i],
                dtype,
                sizes,
                pooled=pooled[0][i] if pooled else None,
            ),
            "txt": batch["caption"][i],
        }
        if batch["json"][i] is not None:
            sample["json"] = batch["json"][i]
        writer.write(sample)
    shapes = {"latent": list(mean.shape[1:]), "context": list(context.shape[1:])}
    return len(batch["key"]), shapes


def precompute(
    shards: ShardSpec,
    output_dir: str,
    encode_images: ImageEncoder,
    encode_texts: TextEncoder,
    *,
    image_size: int = 256,
    batch_size: int = 32,
    caption_key: str = "txt",
    dtype: str = "float16",
    min_size: int = 0,
    max_aspect: float | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    memo_captions: int = 8192,
    buckets: BucketSet | None = None,
) -> PrecomputeSummary:
    """Cache latents and text embeddings for this rank's share of ``shards``.

    Args:
        shards: Input image shard spec.
        output_dir: Directory for the cached shards, ``empty_prompt.safetensors`` and
            ``manifest.json``.
        encode_images: ``images (B×3×H×W in [-1, 1]) -> (mean, std)``, each B×C×h×w: the frozen
            autoencoder's posterior, so that ``z = mean + std·ε`` stays exact.
        encode_texts: ``captions -> (context B×L×D, mask B×L)``, or with a third tensor,
            the pooled text embedding (B×P, SDXL), stored as ``pooled``.
        image_size: Center-crop size the images are encoded at.
        batch_size: Encoder batch size.
        caption_key: ``"txt"`` or ``"json:<field>"``.
        dtype: Storage dtype: ``float16``, ``bfloat16`` or ``float32``.
        min_size: Skip images with a smaller shorter side.
        max_aspect: Skip images with a larger aspect ratio.
        rank: This rank (default: torch.distributed / env / 0).
        world_size: Number of ranks.
        num_workers: DataLoader workers decoding shards for this rank.
        overwrite: Recompute shards whose output already exists.
        progress: Show a progress bar.
        memo_captions: Encode each distinct caption once, remembering the last this many
            (:class:`CaptionMemo`); 0 encodes every caption.
        buckets: Aspect-ratio buckets (:mod:`ldm.data.buckets`, centre crops): each image is
            encoded at its bucket's size (latent shapes then vary by sample, and each sample
            stores its ``original_size``, ``crop_top_left`` and ``target_size``);
            ``image_size`` is unused. Train on the result with the same ``data.buckets``.

    Returns:
        This rank's summary.
    """
    storage = parse_dtype(dtype)
    if memo_captions > 0:
        encode_texts = CaptionMemo(encode_texts, memo_captions)
    urls = check_shards_exist(shards)
    names = [output_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct basenames to map 1:1 to cached shards")
    rank, world_size = resolve_rank(rank, world_size)
    mine = assign_shards(
        urls,
        epoch=0,
        seed=0,
        shuffle=False,
        rank=rank,
        world_size=world_size,
        worker=0,
        num_workers=1,
    )
    os.makedirs(output_dir, exist_ok=True)
    summary = PrecomputeSummary()
    todo = []
    for url in mine:
        target = os.path.join(output_dir, output_name(url))
        if os.path.exists(target) and not overwrite:
            summary.existing.append(target)
        else:
            todo.append(url)
    spec = ImageSpec(image_size, False, False, min_size, max_aspect)
    dataset = _ShardBatches(todo, spec, caption_key, batch_size, num_workers + 1, buckets)
    loader = DataLoader(
        dataset, batch_size=None, num_workers=num_workers, worker_init_fn=defer_stop_signals
    )
    writers: dict[str, ShardWriter] = {}
    shapes: dict[str, Any] = {}
    for item in show_progress(loader, f"cache rank {rank}", enabled=progress):
        url = item["url"]
        if url not in writers:
            target = os.path.join(output_dir, output_name(url))
            writers[url] = ShardWriter(target.replace("%", "%%"), max_samples=None, mtime=0)
        if item["batch"] is not None:
            count, shapes = _write_batch(
                writers[url], item["batch"], encode_images, encode_texts, storage
            )
            summary.samples += count
        if item["done"]:
            writer = writers.pop(url)
            writer.close(allow_empty=True)
            summary.shards.extend(writer.shards)
    summary.captions_encoded = (
        encode_texts.misses if isinstance(encode_texts, CaptionMemo) else summary.samples
    )
    summary.skipped = {k: v for k, v in dataset.counter.counts().items() if v and k != "ok"}
    dataset.counter.log_summary(what="while caching")
    if rank == 0:
        with torch.no_grad():
            context, mask, *pooled = encode_texts([""])
        save_empty_prompt(output_dir, context[0], mask[0], pooled[0][0] if pooled else None)
        manifest = {
            "source": [str(s) for s in ([shards] if isinstance(shards, str) else shards)],
            "num_shards": len(urls),
            "image_size": image_size,
            "caption_key": caption_key,
            "dtype": dtype,
            "shapes": shapes,
            "buckets": [list(s) for s in buckets.sizes] if buckets is not None else None,
            "empty_prompt": "empty_prompt.safetensors",
        }
        with open(os.path.join(output_dir, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    return summary
