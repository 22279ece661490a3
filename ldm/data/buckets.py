"""Aspect-ratio buckets: bucket sizes and resize-to-cover + crop (batching: bucket_batcher.py).

Images are not square. Instead of centre-cropping every image to one square, each sample goes to
the bucket (a ``height × width`` of about the target pixel area, both multiples of a step the
models need) whose aspect ratio is nearest its own, is resized to *cover* that bucket and
cropped to it (NovelAI's aspect-ratio bucketing, 2022; SDXL, Podell et al. 2023, sec. 2.3, with
several target areas for multi-resolution training). The original size, the crop offsets and
the bucket travel with the sample (SDXL's micro-conditioning inputs, sec. 2.2:
``original_size (h, w)``, ``crop_top_left (top, left)``, ``target_size (h, w)``).

Batches must be of one shape, and the data is a stream:
:class:`ldm.data.bucket_batcher.BucketBatcher` keeps one buffer
per bucket on each DataLoader worker and emits a bucket's buffer as a batch when it fills.
Memory is bounded by ``max_buffered`` samples across buckets: when the buffers hold that many,
the fullest bucket is emitted as a (smaller) batch. Leftover policy at the end of an exact pass:
each non-empty bucket is emitted as one partial batch (in the order the buckets were first
seen), or dropped with ``drop_last``; nothing carries over into the next epoch, so an epoch is
still a pure function of ``(seed, epoch, rank, worker)`` and a mid-epoch resume that skips the
consumed batches stays exact. Resampled streams never end; their leftovers are discarded when a
worker has emitted its batches of the epoch.

This module imports no models (DESIGN.md); it is pure Python + PIL + torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.data.counters import SkipSample
from ldm.data.transforms import ImageSpec, decode_rgb, read_header

Size = tuple[int, int]  # (height, width) in pixels


# ---------------------------------------------------------------------------------------------
# Bucket sizes
# ---------------------------------------------------------------------------------------------


def area_buckets(side: int, step: int, max_aspect: float) -> list[Size]:
    """Buckets of at most ``side²`` pixels, both sides multiples of ``step``, aspect ≤ cap.

    For each short side ``s ≤ side`` (a multiple of ``step``) the long side is the largest
    multiple of ``step`` with ``s · l ≤ side²``; both orientations are kept, and sizes whose
    long/short ratio exceeds ``max_aspect`` are dropped (kohya's sd-scripts make them alike).

    Returns:
        Distinct ``(height, width)`` sizes, sorted by aspect ratio ``h / w`` (portrait last).
    """
    area = side * side
    sizes: set[Size] = set()
    for short in range(step, side + 1, step):
        long = (area // short) // step * step
        if long >= short and long / short <= max_aspect + 1e-9:
            sizes.update({(short, long), (long, short)})
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


@dataclass(frozen=True)
class BucketSet:
    """The buckets of a run, grouped by target area (largest first).

    Attributes:
        groups: Per target area, its ``(height, width)`` buckets; an explicit list is one group.
        max_upscale: A sample whose bucket needs a larger resize factor than this is skipped
            (``too_small``); 1.0 never upscales.
        max_buffered: Cap on samples buffered across buckets per DataLoader worker (0: the
            least that never forces a partial batch mid-epoch, ``(batch - 1) · buckets + 1``).
    """

    groups: tuple[tuple[Size, ...], ...]
    max_upscale: float = 1.0
    max_buffered: int = 0

    @property
    def sizes(self) -> list[Size]:
        """All buckets, each once."""
        return sorted({s for group in self.groups for s in group})

    def buffer_cap(self, batch_size: int) -> int:
        """Samples one worker may hold across its bucket buffers (see ``max_buffered``)."""
        if self.max_buffered:
            return self.max_buffered
        return (batch_size - 1) * len(self.sizes) + 1

    def assign(self, height: int, width: int) -> Size | None:
        """The bucket of an image: nearest aspect ratio (``|log(h/w) − log(bh/bw)|``) within the
        largest target area the image covers at most ``max_upscale``× enlarged; None if none."""
        ratio = math.log(height / width)
        for group in self.groups:
            bucket = min(group, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), s))
            if cover_scale(height, width, bucket) <= self.max_upscale + 1e-9:
                return bucket
        return None


def cover_scale(height: int, width: int, bucket: Size) -> float:
    """The resize factor at which an image just covers ``bucket`` (both sides ≥ the bucket's)."""
    return max(bucket[0] / height, bucket[1] / width)


def bucket_set(options: Mapping[str, Any]) -> BucketSet | None:
    """``data.buckets`` (see :class:`ldm.schema.BucketConfig`) → a :class:`BucketSet`, or None
    when bucketing is off.

    Raises:
        ValueError: One line naming the bad key: a step below 1, an aspect cap below 1, an
            explicit size that is not a positive multiple of ``step``, or no bucket at all.
    """
    if not options.get("enabled", False):
        return None
    step = int(options.get("step", 64))
    max_aspect = float(options.get("max_aspect", 2.0))
    max_upscale = float(options.get("max_upscale", 1.0))
    max_buffered = int(options.get("max_buffered", 0))
    if step < 1:
        raise ValueError(f"data.buckets.step must be >= 1, got {step}")
    if max_aspect < 1:
        raise ValueError(
            f"data.buckets.max_aspect must be >= 1 (long side / short side), got {max_aspect}"
        )
    if max_upscale <= 0:
        raise ValueError(f"data.buckets.max_upscale must be > 0, got {max_upscale}")
    if max_buffered < 0:
        raise ValueError(f"data.buckets.max_buffered must be >= 0, got {max_buffered}")
    explicit = [tuple(int(v) for v in size) for size in options.get("sizes") or []]
    if explicit:
        for size in explicit:
            if len(size) != 2 or min(size) < 1 or size[0] % step or size[1] % step:
                raise ValueError(
                    f"data.buckets.sizes entry {list(size)} must be [height, width], both "
                    f"positive multiples of data.buckets.step={step}"
                )
        groups: list[tuple[Size, ...]] = [tuple(sorted(set(explicit)))]  # type: ignore[arg-type]
    else:
        sides = sorted({int(s) for s in options.get("resolutions") or [256]}, reverse=True)
        groups = []
        for side in sides:
            if side < step:
                raise ValueError(
                    f"data.buckets.resolutions entry {side} is below data.buckets.step={step}"
                )
            groups.append(tuple(area_buckets(side, step, max_aspect)))
    return BucketSet(tuple(groups), max_upscale=max_upscale, max_buffered=max_buffered)


def check_model_step(buckets: BucketSet, needed: int, what: str) -> None:
    """Refuse buckets a model cannot take (each side a multiple of ``needed`` pixels).

    Raises:
        ValueError: One line naming the first bad bucket, the step and the fix.
    """
    for height, width in buckets.sizes:
        if height % needed or width % needed:
            raise ValueError(
                f"bucket {height}x{width} is not a multiple of {needed} px, which {what} needs; "
                f"set data.buckets.step to a multiple of {needed}"
            )


def parse_aspect(text: str) -> float:
    """``"3:2"`` (width:height), ``"1.5"`` → width / height.

    Raises:
        ValueError: For anything else, or a non-positive ratio.
    """
    try:
        if ":" in text:
            w, h = text.split(":", 1)
            value = float(Fraction(w.strip())) / float(Fraction(h.strip()))
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--aspect {text!r}: give width:height such as 3:2, or a ratio") from None
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"--aspect {text!r} must be a positive width:height ratio")
    return value


def size_for_aspect(
    aspect: float, area: int, step: int, height: int | None = None, width: int | None = None
) -> Size:
    """``(height, width)``, multiples of ``step``, with ``width / height ≈ aspect``.

    The given side is kept; without one, the size has about ``area`` pixels.
    """

    def snap(x: float) -> int:
        return max(step, round(x / step) * step)

    if height is not None and width is not None:
        return height, width
    if height is not None:
        return height, snap(height * aspect)
    if width is not None:
        return snap(width / aspect), width
    h = math.sqrt(area / aspect)
    return snap(h), snap(h * aspect)


# ---------------------------------------------------------------------------------------------
# Per-sample transform
# ---------------------------------------------------------------------------------------------


def cover_crop_box(
    height: int,
    width: int,
    bucket: Size,
    random_crop: bool,
    rng: random.Random,
    source: Size | None = None,
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Where to cut a bucket out of an image of ``height × width`` resized to cover it.

    Args:
        height: Image height (its header size).
        width: Image width.
        bucket: ``(height, width)`` to cut.
        random_crop: Uniform random offset; else centred.
        rng: Random source for the offset.
        source: Size of the decoded pixels the box refers to, when smaller (a JPEG decoded at a
            reduced DCT scale); default ``(height, width)``.

    Returns:
        The crop window in *source* pixels ``(left, top, right, bottom)`` (what
        ``Image.resize(box=...)`` takes: resizing just the window equals resize-then-crop), and
        the crop offset ``(top, left)`` in the resized image (SDXL's ``crop_top_left``).
    """
    bh, bw = bucket
    scale = cover_scale(height, width, bucket)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    if random_crop:
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    sh, sw = source or (height, width)
    sy, sx = sh / rh, sw / rw  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + bw) * sx, (top + bh) * sy)
    return box, (top, left)


def image_to_bucket(
    data: bytes, spec: ImageSpec, buckets: BucketSet, rng: random.Random
) -> dict[str, Any]:
    """Image bytes → its bucket: ``{"image": (3, bh, bw) uint8, "original_size": (h, w),
    "crop_top_left": (top, left), "target_size": (bh, bw)}``.

    The size filters of ``spec`` apply as for square crops (``spec.size`` is ignored); the image
    is kept as uint8 (a quarter of float32's memory in the bucket buffers) and converted by
    :func:`collate_bucketed`.

    Raises:
        SkipSample: As :func:`ldm.data.transforms.open_image`, or ``too_small`` when the image
            would need more than ``buckets.max_upscale``× enlarging for every bucket.
    """
    img = read_header(data, spec)
    width, height = img.size
    bucket = buckets.assign(height, width)
    if bucket is None:
        smallest = min(buckets.sizes, key=lambda s: s[0] * s[1])
        raise SkipSample(
            "too_small",
            f"{width}x{height} covers no bucket (smallest {smallest[0]}x{smallest[1]} hxw) at "
            f"data.buckets.max_upscale={buckets.max_upscale}",
        )
    # a JPEG decodes at the smallest DCT scale that still covers the bucket
    img = decode_rgb(img, math.ceil(min(height, width) * cover_scale(height, width, bucket)))
    box, (top, left) = cover_crop_box(
        height, width, bucket, spec.random_crop, rng, source=(img.height, img.width)
    )
    if img.size != (bucket[1], bucket[0]):
        img = img.resize(
            (bucket[1], bucket[0]), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0
        )
    if spec.hflip and rng.random() < 0.5:  # after the crop: crop_top_left is the unflipped one
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.uint8)  # (bh, bw, 3)
    return {
        "image": torch.from_numpy(array.copy()).permute(2, 0, 1),  # (3, bh, bw)
        "original_size": (height, width),
        "crop_top_left": (top, left),
        "target_size": bucket,
    }


def collate_bucketed(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack one bucket's samples: ``{"image": B×3×bh×bw float32 in [-1, 1], "caption",
    "key", "original_size", "crop_top_left", "target_size": B×2 int64}``."""
    images = torch.stack([s["image"] for s in samples])  # (B, 3, bh, bw) uint8
    return {
        "image": images.float().div_(127.5).sub_(1.0),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        **size_tensors(samples),
    }


def size_tensors(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The micro-conditioning sizes of samples that carry them, each ``B×2`` int64."""
    out = {}
    for key in ("original_size", "crop_top_left", "target_size"):
        if all(key in s for s in samples):
            out[key] = torch.tensor([list(s[key]) for s in samples], dtype=torch.int64)
    return out
