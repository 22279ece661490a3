"""Data-loading throughput per CPU core: raw JPEG shards vs cached-latent shards, and aspect
buckets vs square crops (with the bucket batcher's memory).

Builds, in a temp dir, (1) JPEG shards from scikit-image's sample photos (random crops resized to
``--source-size`` on the shorter side, quality 90, like a filtered LAION subset) and (2) cached
shards with SD-sized tensors (latent mean+std 4×32×32 and CLIP-L context 77×768 + mask, fp16).
Then reads each with ``ShardDataset`` in the main process on one thread (= one core) and prints
images/s, beside webdataset's reference pipeline (``WebDataset().decode("pil")`` + the same crop)
and the rate a GPU consumes samples. The JPEGs are half portrait, half landscape (aspect 1-1.5),
so the same shards also read through aspect-ratio buckets of ``--size``² pixels (step 64, aspect
cap 2), reporting the batcher's peak buffered samples and bytes.

GPU assumption: SD1-size U-Net training at 256 px on one A100 ≈ 140 images/s (MosaicML, "Training
Stable Diffusion from scratch for <$50k", 2023, 256 px phase); with raw images the autoencoder
and text encoder also run on the GPU, with cached latents only the U-Net.

    .venv/bin/python bench/data.py                       # defaults, < 1 min
    .venv/bin/python bench/data.py --rounds 5 --source-size 768
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from ldm.data.buckets import bucket_set
from ldm.data.cached import encode_cached_sample
from ldm.data.reader import ShardDataset
from ldm.data.shard_writer import ShardWriter
from ldm.data.transforms import ImageSpec, resize_crop, to_tensor

GPU_IMAGES_PER_S = 140.0  # SD1 U-Net training @256 px per A100 (MosaicML)


def sample_photos() -> list[np.ndarray]:
    """RGB sample photos bundled with scikit-image."""
    import skimage.data as data

    names = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry"]
    names += ["retina", "rocket", "colorwheel"]
    return [getattr(data, n)() for n in names]


def make_jpeg_shards(root: str, count: int, source_size: int, seed: int = 0) -> str:
    """``count`` JPEGs: random crops of the photos, shorter side ``source_size``."""
    rng = random.Random(seed)
    photos = [Image.fromarray(p) for p in sample_photos()]
    with ShardWriter(os.path.join(root, "jpg-%06d.tar"), max_samples=250) as writer:
        for i in range(count):
            photo = photos[i % len(photos)]
            aspect = rng.uniform(1.0, 1.5)
            w = min(photo.width, int(min(photo.height * aspect, photo.width)))
            h = min(photo.height, int(w / aspect))
            left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
            crop = photo.crop((left, top, left + w, top + h))
            scale = source_size / min(w, h)
            crop = crop.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.ROTATE_90)
            buffer = io.BytesIO()
            crop.save(buffer, format="JPEG", quality=90)
            writer.write({"__key__": f"{i:08d}", "jpg": buffer.getvalue(), "txt": f"photo {i}"})
    return os.path.join(root, f"jpg-{{000000..{len(writer.shards) - 1:06d}}}.tar")


def make_cached_shards(root: str, count: int) -> str:
    """``count`` cached samples: 4×32×32 latent mean/std, 77×768 fp16 context, mask."""
    gen = torch.Generator().manual_seed(0)
    payloads = [
        encode_cached_sample(
            torch.randn(4, 32, 32, generator=gen),
            torch.rand(4, 32, 32, generator=gen),
            torch.randn(77, 768, generator=gen),
            torch.arange(77) < 12,
            torch.float16,
        )
        for _ in range(16)
    ]  # content does not change the reading cost; 16 distinct payloads, cycled
    with ShardWriter(os.path.join(root, "cached-%06d.tar"), max_samples=500) as writer:
        for i in range(count):
            payload = payloads[i % len(payloads)]
            writer.write({"__key__": f"{i:08d}", "safetensors": payload, "txt": f"photo {i}"})
    return os.path.join(root, f"cached-{{000000..{len(writer.shards) - 1:06d}}}.tar")


def pass_rate(make_iter: Callable[[], Iterable[int]]) -> float:
    """Samples/s of one full pass."""
    start = time.perf_counter()
    done = sum(make_iter())
    return done / (time.perf_counter() - start)


def ours(
    spec: str, batch: int, cached: bool, size: int, bucketed: bool = False
) -> tuple[Callable[[], Iterable[int]], ShardDataset]:
    buckets = {"enabled": True, "resolutions": [size], "step": 64, "max_aspect": 2.0}
    ds = ShardDataset(
        spec, batch_size=batch, image_size=size, random_crop=True, hflip=True, cached=cached,
        shuffle_buffer=100, buckets=bucket_set(buckets) if bucketed else None,
    )  # fmt: skip
    key = "latent_mean" if cached else "image"
    return (lambda: (b[key].shape[0] for b in ds)), ds


def reference(spec: str, batch: int, size: int) -> Callable[[], Iterable[int]]:
    """webdataset's own pipeline with the same crop/flip, batched the same way."""
    rng = random.Random(0)
    spec_ = ImageSpec(size, random_crop=True, hflip=True)

    def transform(sample: dict) -> torch.Tensor:
        img = resize_crop(sample["jpg"], spec_.size, True, rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    pipeline = (
        wds.WebDataset(spec, shardshuffle=False, empty_check=False)
        .shuffle(100)
        .decode("pilrgb")
        .map(lambda s: {"image": transform(s), "caption": s["txt"]})
        .to_tuple("image", "caption")
        .batched(batch)
    )
    return lambda: (b[0].shape[0] for b in pipeline)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="JPEG samples to write")
    parser.add_argument("--cached", type=int, default=2000, help="cached samples to write")
    parser.add_argument("--source-size", type=int, default=512, help="JPEG shorter side")
    parser.add_argument("--size", type=int, default=256, help="training resolution")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes per reader")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        jpg = make_jpeg_shards(root, args.images, args.source_size)
        cached = make_cached_shards(root, args.cached)
        print(f"wrote shards in {time.perf_counter() - t0:.1f} s under {root}")
        bucketed, bucketed_ds = ours(jpg, args.batch, False, args.size, bucketed=True)
        readers = {
            "jpeg_ours": ours(jpg, args.batch, False, args.size)[0],
            "jpeg_webdataset": reference(jpg, args.batch, args.size),
            "cached_ours": ours(cached, args.batch, True, args.size)[0],
            "jpeg_bucketed": bucketed,
        }
        for make_iter in readers.values():  # warm-up (page cache, lazy imports)
            pass_rate(make_iter)
        # interleave the readers round by round so that load from other processes hits all
        # alike; report the median pass
        rates: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.rounds):
            for name, make_iter in readers.items():
                rates[name].append(pass_rate(make_iter))
        results = {name: statistics.median(values) for name, values in rates.items()}
        batcher = bucketed_ds.last_batcher
        assert batcher is not None and bucketed_ds.buckets is not None
        largest = max(h * w for h, w in bucketed_ds.buckets.sizes)
        results["batcher_peak_samples"] = batcher.peak
        results["batcher_peak_mib"] = batcher.peak * 3 * largest / 2**20  # uint8, upper bound
        results["batcher_cap_samples"] = bucketed_ds.buckets.buffer_cap(args.batch)
        results["batcher_forced"] = batcher.forced
    gpu = GPU_IMAGES_PER_S
    print(f"\nper CPU core, {args.size}x{args.size} training samples, batch {args.batch}:")
    rows = [
        ("raw JPEG (ours)", results["jpeg_ours"], f"{args.source_size}px source, crop+flip"),
        ("raw JPEG (webdataset ref.)", results["jpeg_webdataset"], "decode('pilrgb') + same"),
        ("cached latents (ours)", results["cached_ours"], "4x32x32 mean+std, 77x768 fp16 ctx"),
    ]
    for name, value, note in rows:
        print(f"  {name:28s} {value:8.1f} img/s/core  ({gpu / value:5.2f} cores per GPU)  {note}")
    print(f"  GPU consumption assumed: {gpu:.0f} img/s (SD1 U-Net @256 px, A100, MosaicML)")
    print(
        f"  cached / raw JPEG (ours):        {results['cached_ours'] / results['jpeg_ours']:6.1f}x"
    )
    print(f"  ours / webdataset ref. (JPEG):   "
          f"{results['jpeg_ours'] / results['jpeg_webdataset']:6.2f}x")  # fmt: skip
    print(f"\naspect buckets ({args.size}^2 px area, step 64, aspect <= 2) vs square crops:")
    print(
        f"  bucketed JPEG (ours)         {results['jpeg_bucketed']:8.1f} img/s/core  "
        f"= {results['jpeg_bucketed'] / results['jpeg_ours']:4.2f}x square"
    )
    print(
        f"  batcher memory per worker: peak {results['batcher_peak_samples']:.0f} samples "
        f"(<= {results['batcher_peak_mib']:.1f} MiB uint8), cap "
        f"{results['batcher_cap_samples']:.0f}, {results['batcher_forced']:.0f} batches "
        "emitted early at the cap"
    )
    return results


if __name__ == "__main__":
    main()
