"""The cached-latent sample format, shared by the precompute writer and the reader.

A cached shard is a plain webdataset tar. Each sample has:

- ``<key>.safetensors``: tensors ``latent_mean`` (C×h×w), ``latent_std`` (C×h×w), ``context``
  (L×D) in the storage dtype (float16 / bfloat16 / float32) and ``context_mask`` (L, bool);
  when cached from aspect buckets also ``original_size``, ``crop_top_left`` and ``target_size``
  (2, int64; see :mod:`ldm.data.buckets`), and h×w then differ between samples; for SDXL
  also ``pooled`` (P), the second encoder's pooled projection (``context`` then holds both
  encoders' states side by side);
- ``<key>.txt``: the caption; ``<key>.json``: copied from the source sample when it had one.

Keys are the source sample keys. The empty-prompt embedding (for classifier-free guidance
dropout) is stored once per cache directory, next to the shards, as
``empty_prompt.safetensors`` with ``context`` (L×D) and ``context_mask`` (L,) (and ``pooled``,
P, for SDXL; the encoded ``""``, whatever the model conditions empty prompts on).
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections.abc import Sequence
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ldm.data.counters import SkipSample
from ldm.data.shards import local_path, open_url

CACHE_EXT = "safetensors"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
TENSOR_KEYS: tuple[str, ...] = ("latent_mean", "latent_std", "context", "context_mask")
SIZE_KEYS: tuple[str, ...] = ("original_size", "crop_top_left", "target_size")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ST_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
}


def parse_dtype(name: str) -> torch.dtype:
    """Storage dtype from its name: ``float16``, ``bfloat16`` or ``float32``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def encode_cached_sample(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    sizes: dict[str, Sequence[int]] | None = None,
    pooled: torch.Tensor | None = None,
) -> bytes:
    """Serialise one sample's tensors (unbatched) to safetensors bytes (``sizes``: the bucket
    metadata of :data:`SIZE_KEYS`, stored as int64 pairs; ``pooled``: SDXL's pooled text
    embedding, P, in ``dtype``)."""
    tensors = {
        "latent_mean": latent_mean.detach().to("cpu", dtype).contiguous(),
        "latent_std": latent_std.detach().to("cpu", dtype).contiguous(),
        "context": context.detach().to("cpu", dtype).contiguous(),
        "context_mask": context_mask.detach().to("cpu", torch.bool).contiguous(),
    }
    for key, value in (sizes or {}).items():
        tensors[key] = torch.tensor(list(value), dtype=torch.int64)
    if pooled is not None:
        tensors["pooled"] = pooled.detach().to("cpu", dtype).contiguous()
    return st_save(tensors)


def safetensors_views(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into read-only tensor *views* of ``data`` (no copy).

    Same result as ``safetensors.torch.load`` minus its copy of every tensor, which mattered
    for reading speed (a 77×768 context is 118 KB per sample). Format: an 8-byte little-endian
    header length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the data.
    The views are only read (copied into a new batch tensor), never written. Pass a writable
    ``bytearray`` (what :mod:`ldm.data.tarstream` yields) to avoid torch's one-time warning
    about non-writable buffers.
    """
    header_len = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + header_len > len(data):
        raise ValueError("safetensors header out of bounds")
    header = json.loads(data[8 : 8 + header_len])
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if base + end > len(data) or count != math.prod(info["shape"]):
            raise ValueError(f"tensor {name!r} out of bounds or of the wrong size")
        if count:
            flat = torch.frombuffer(data, dtype=dtype, count=count, offset=base + start)
        else:
            flat = torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    return tensors


def decode_cached_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw cached sample → tensors (storage dtype; :func:`collate_cached` makes them float32).

    Raises:
        SkipSample: ``missing_latent``, ``empty_member`` or ``corrupt_latent``.
    """
    data = raw.get(CACHE_EXT)
    if data is None:
        raise SkipSample("missing_latent", f"no .{CACHE_EXT} member")
    if not data:
        raise SkipSample("empty_member", f"zero-byte .{CACHE_EXT}")
    try:
        tensors = safetensors_views(data)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise SkipSample("corrupt_latent", str(exc)) from exc
    if any(k not in tensors for k in TENSOR_KEYS):
        raise SkipSample("corrupt_latent", f"keys {sorted(tensors)} lack one of {TENSOR_KEYS}")
    mean, std, context, mask = (tensors[k] for k in TENSOR_KEYS)
    if (
        mean.dim() != 3
        or std.shape != mean.shape
        or context.dim() != 2
        or mask.shape != (context.shape[0],)
    ):
        raise SkipSample(
            "corrupt_latent",
            f"inconsistent shapes: latent_mean "
            f"{tuple(mean.shape)}, latent_std {tuple(std.shape)}, context "
            f"{tuple(context.shape)}, context_mask {tuple(mask.shape)}",
        )
    caption = raw.get("txt", b"")
    sizes = {k: tuple(int(v) for v in tensors[k].tolist()) for k in SIZE_KEYS if k in tensors}
    pooled = {"pooled": tensors["pooled"]} if "pooled" in tensors else {}  # SDXL
    return {
        **sizes,
        **pooled,
        "latent_mean": tensors["latent_mean"],
        "latent_std": tensors["latent_std"],
        "context": tensors["context"],
        "context_mask": tensors["context_mask"].bool(),
        "caption": caption.decode("utf-8", errors="replace") if caption else "",
        "key": raw["__key__"],
    }


SampleShapes = tuple[tuple[int, ...], tuple[int, ...]]


def check_cached_shapes(sample: dict[str, Any], reference: SampleShapes | None) -> SampleShapes:
    """The sample's ``(latent shape, context shape)``, after checking it equals ``reference``
    (the first sample's): one odd sample is counted, never a crash when batches are stacked.

    Raises:
        SkipSample: ``corrupt_latent`` for a latent or context shape unlike the reference.
    """
    shapes = (tuple(sample["latent_mean"].shape), tuple(sample["context"].shape))
    if reference is not None and shapes != reference:
        raise SkipSample(
            "corrupt_latent",
            f"latent {shapes[0]} / context {shapes[1]} differ "
            f"from the other samples' {reference[0]} / {reference[1]}",
        )
    return shapes


def collate_cached(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack decoded cached samples into a batch dict (float32 tensors, bool mask).

    Each sample is converted from its storage dtype straight into a preallocated float32 batch
    (one pass over memory instead of stack-then-convert; reading is memory-bound).
    """
    batch: dict[str, Any] = {"context_mask": torch.stack([s["context_mask"] for s in samples])}
    keys = ("latent_mean", "latent_std", "context") + (
        ("pooled",) if all("pooled" in s for s in samples) else ()
    )
    for key in keys:
        out = torch.empty((len(samples), *samples[0][key].shape), dtype=torch.float32)
        for i, sample in enumerate(samples):
            if sample[key].shape != out.shape[1:]:  # copy_ would broadcast silently
                raise ValueError(f"{key} of {sample['key']!r} has shape {tuple(sample[key].shape)}")
            out[i].copy_(sample[key])
        batch[key] = out
    batch["caption"] = [s["caption"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    return batch


def sample_latents(
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``z = mean + std · ε`` from the cached diagonal-Gaussian posterior.

    Reparameterisation of the autoencoder posterior q(z|x) = N(μ, σ²)
    (Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Eq. 10). The result is not
    multiplied by the autoencoder's ``scale_factor``; that stays the training module's job.

    Args:
        latent_mean: Posterior mean, e.g. ``batch["latent_mean"]`` (B×C×h×w).
        latent_std: Posterior standard deviation, same shape.
        generator: Optional RNG for ε.
    """
    noise = torch.randn(
        latent_mean.shape,
        generator=generator,
        device=latent_mean.device,
        dtype=latent_mean.dtype,
    )
    return latent_mean + latent_std * noise


def save_empty_prompt(
    directory: str,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    pooled: torch.Tensor | None = None,
) -> str:
    """Write the empty-prompt embedding (L×D, L; SDXL: also the pooled P) next to the cached
    shards; returns the path."""
    path = os.path.join(directory, EMPTY_PROMPT_FILE)
    tensors = {
        "context": context.detach().to("cpu", torch.float32).contiguous(),
        "context_mask": context_mask.detach().to("cpu", torch.bool).contiguous(),
    }
    if pooled is not None:
        tensors["pooled"] = pooled.detach().to("cpu", torch.float32).contiguous()
    data = st_save(tensors)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def empty_prompt_location(shard_url: str) -> str:
    """Where :func:`save_empty_prompt` put the embedding for a cache containing ``shard_url``."""
    path = local_path(shard_url)
    if path is not None:
        return os.path.join(os.path.dirname(path), EMPTY_PROMPT_FILE)
    if shard_url.startswith("pipe:"):
        raise ValueError(f"cannot locate {EMPTY_PROMPT_FILE} for {shard_url}; pass its path")
    return posixpath.join(posixpath.dirname(shard_url), EMPTY_PROMPT_FILE)


def load_empty_prompt(location: str) -> dict[str, torch.Tensor]:
    """Load ``{"context": L×D float32, "context_mask": L bool}`` (SDXL: and ``"pooled"``, P)
    from a path or URL."""
    with open_url(location) as f:
        tensors = st_load(f.read())
    out = {"context": tensors["context"].float(), "context_mask": tensors["context_mask"].bool()}
    if "pooled" in tensors:
        out["pooled"] = tensors["pooled"].float()
    return out
