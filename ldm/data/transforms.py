"""Image decoding and augmentation: PIL in, float tensor C×H×W in [-1, 1] out.

The resize-shorter-side-then-crop of the usual pipelines is done in one PIL call: we pick the
square crop window in source pixels (side = the shorter side) and resize just that window to
``size × size`` (``Image.resize(box=...)``), which is the same result as resizing first and
cropping second, with less work. For JPEGs, ``Image.draft`` first lets libjpeg decode at a
reduced DCT scale that is still at least ``size`` on the shorter side.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.data.counters import SkipSample

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class ImageSpec:
    """How raw image bytes become a training tensor.

    Attributes:
        size: Output side length (square).
        random_crop: Random square crop along the longer side instead of a center crop.
        hflip: Flip horizontally with probability 0.5.
        min_size: Drop images whose shorter side is below this (``too_small``); 0 disables.
        max_aspect: Drop images with ``long/short`` above this (``bad_aspect``); None disables.
    """

    size: int = 256
    random_crop: bool = False
    hflip: bool = False
    min_size: int = 0
    max_aspect: float | None = None


def open_image(data: bytes, spec: ImageSpec) -> Image.Image:
    """Open image bytes, apply the size filters on the header, and decode to RGB.

    Raises:
        SkipSample: ``empty_member``, ``corrupt_image``, ``truncated_image``, ``too_small`` or
            ``bad_aspect``.
    """
    return decode_rgb(read_header(data, spec), spec.size)


def read_header(data: bytes, spec: ImageSpec) -> Image.Image:
    """Open image bytes lazily (header only: ``.size`` is known, no pixel is decoded yet) and
    apply the size filters of ``spec``.

    Raises:
        SkipSample: ``empty_member``, ``corrupt_image``, ``too_small`` or ``bad_aspect``.
    """
    if not data:
        raise SkipSample("empty_member", "zero-byte image")
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
    except Image.DecompressionBombError as exc:  # more than twice MAX_IMAGE_PIXELS
        raise SkipSample("too_large", str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SkipSample("corrupt_image", str(exc)) from exc
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:  # PIL would only warn, then decode it
        raise SkipSample(
            "too_large", f"{width}x{height} pixels > PIL.Image.MAX_IMAGE_PIXELS ({limit})"
        )
    short, long = min(width, height), max(width, height)
    if short < max(spec.min_size, 1):
        raise SkipSample("too_small", f"{width}x{height} < {spec.min_size}")
    if spec.max_aspect is not None and long / short > spec.max_aspect:
        raise SkipSample("bad_aspect", f"{width}x{height} > {spec.max_aspect}")
    return img


def decode_rgb(img: Image.Image, draft: int) -> Image.Image:
    """Decode an image from :func:`read_header` to RGB; a JPEG at the smallest DCT scale whose
    sides are still at least ``draft`` pixels (``Image.draft``).

    Raises:
        SkipSample: ``corrupt_image`` or ``truncated_image``.
    """
    try:
        if img.format == "JPEG":
            img.draft("RGB", (draft, draft))
        img.load()
        if img.mode != "RGB":
            img = _to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise SkipSample(reason, str(exc)) from exc
    return img


#: Modes of 16-bit greyscale images (PIL's ``convert("RGB")`` clips them to white).
_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert to RGB, compositing transparent images over white; 16-bit greyscale is scaled
    to 8 bits (``v / 257``, so 65535 stays white and 0 black)."""
    if img.mode in _WIDE_GREY:
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # (H, W) uint8 is mode L
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def crop_box(
    width: int, height: int, random_crop: bool, rng: random.Random | None = None
) -> tuple[int, int, int, int]:
    """Square crop window ``(left, top, right, bottom)`` whose side is the shorter side.

    Args:
        width: Source width.
        height: Source height.
        random_crop: Uniform random offset along the longer side; else centered.
        rng: Random source for the offset (``random`` module if None).
    """
    side = min(width, height)
    if random_crop:
        rng = rng or random.Random()
        left = rng.randint(0, width - side)
        top = rng.randint(0, height - side)
    else:
        left = (width - side) // 2
        top = (height - side) // 2
    return left, top, left + side, top + side


def resize_crop(
    img: Image.Image, size: int, random_crop: bool = False, rng: random.Random | None = None
) -> Image.Image:
    """Resize the shorter side to ``size`` and crop ``size × size`` (center or random)."""
    box = crop_box(img.width, img.height, random_crop, rng)
    if box == (0, 0, size, size) and img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor ``(3, H, W)`` in [-1, 1]."""
    array = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)
    return tensor.float().div_(127.5).sub_(1.0)


def image_to_tensor(data: bytes, spec: ImageSpec, rng: random.Random | None = None) -> torch.Tensor:
    """Decode, filter, resize/crop, maybe flip: image bytes → ``(3, size, size)`` in [-1, 1].

    Args:
        data: Encoded image (JPEG, PNG, WebP...).
        spec: Size, crop, flip and filter settings.
        rng: Random source for crop offset and flip (seeded per worker for reproducibility).

    Raises:
        SkipSample: See :func:`open_image`.
    """
    rng = rng or random.Random()
    img = resize_crop(open_image(data, spec), spec.size, spec.random_crop, rng)
    if spec.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)
