"""SDXL's vector conditioning: pooled text plus size and crop micro-conditioning.

Podell et al. 2023 (SDXL), sec. 2.2: the U-Net is conditioned on the image's original size
``(h, w)``, the crop offset ``(top, left)`` and the target size ``(h, w)``; each number is
embedded with the sinusoidal (Fourier) embedding of the diffusion time (Vaswani et al. 2017,
sec. 3.5; cosines first, as generative-models' ``ConcatTimestepEmbedderND`` and diffusers'
``add_time_proj``), the embeddings are concatenated with the pooled text embedding and added to
the time embedding through the U-Net's ``label_emb`` (our ``adm_in_channels`` input ``y``).
The refiner uses ``(h, w, top, left, aesthetic_score)`` instead of the target size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.nn.embeddings import timestep_embedding

SIZE_EMBED_DIM = 256
"""Width of each micro-conditioning number's embedding (SDXL: 256, six numbers → 1536)."""


def embed_numbers(numbers: Tensor, dim: int = SIZE_EMBED_DIM) -> Tensor:
    """Sinusoidal embedding of each of N numbers per sample, concatenated.

    Args:
        numbers: (B, N) sizes, offsets or scores.
        dim: Width of each number's embedding.

    Returns:
        Float32 (B, N * dim): ``[emb(n_1), …, emb(n_N)]``.
    """
    if numbers.ndim != 2:
        raise ValueError(f"numbers must be (batch, count), got shape {tuple(numbers.shape)}")
    batch, count = numbers.shape
    return timestep_embedding(numbers.reshape(-1), dim).reshape(batch, count * dim)


def size_numbers(
    original_size: Tensor | Sequence[int],
    crop_top_left: Tensor | Sequence[int],
    target_size: Tensor | Sequence[int],
    batch: int | None = None,
) -> Tensor:
    """The six SDXL numbers ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    Each argument is a (B, 2) tensor or one ``(a, b)`` pair shared by the batch (then ``batch``
    gives B). This is the order of diffusers' ``add_time_ids`` and of generative-models'
    conditioner (``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``).

    Returns:
        Float32 (B, 6).
    """
    parts = []
    for name, value in (
        ("original_size", original_size),
        ("crop_top_left", crop_top_left),
        ("target_size", target_size),
    ):
        t = torch.as_tensor(value, dtype=torch.float32)
        if t.ndim == 1:
            t = t[None].expand(batch or 1, -1)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"{name} must be (height, width)-like pairs, got {tuple(t.shape)}")
        parts.append(t)
    sizes = {p.shape[0] for p in parts}
    if len(sizes) != 1:
        raise ValueError(f"original_size, crop_top_left and target_size disagree on batch: {sizes}")
    return torch.cat(parts, dim=1)


def sdxl_vector(pooled: Tensor, numbers: Tensor, dim: int = SIZE_EMBED_DIM) -> Tensor:
    """The U-Net's ``y``: ``[pooled text, emb(number_1), …, emb(number_N)]``.

    Args:
        pooled: (B, P) pooled, projected text embedding (SDXL: OpenCLIP ViT-bigG, P = 1280).
        numbers: (B, N) micro-conditioning numbers (:func:`size_numbers`; N = 6 for the base
            model, 5 for the refiner).
        dim: Width of each number's embedding.

    Returns:
        (B, P + N * dim) in ``pooled``'s dtype (SDXL base: 1280 + 6 × 256 = 2816).
    """
    if pooled.shape[0] != numbers.shape[0]:
        raise ValueError(f"{pooled.shape[0]} pooled embeddings for {numbers.shape[0]} size rows")
    emb = embed_numbers(numbers.to(pooled.device), dim).to(pooled.dtype)
    return torch.cat([pooled, emb], dim=1)


def check_size_numbers(numbers: Tensor) -> Tensor:
    """Refuses micro-conditioning that no image has: sizes must be positive, crop offsets
    non-negative, all finite (pixels).

    Args:
        numbers: (B, 6) :func:`size_numbers`.

    Returns:
        ``numbers``.

    Raises:
        ValueError: One line naming the first bad value.
    """
    names = (
        "original_size",
        "original_size",
        "crop_top_left",
        "crop_top_left",
        "target_size",
        "target_size",
    )
    for col, name in enumerate(names):
        values = numbers[:, col]
        bad = ~torch.isfinite(values) | (values < 0 if name == "crop_top_left" else values <= 0)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            pair = [
                int(v) if float(v).is_integer() else v
                for v in numbers[row, col - col % 2 : col - col % 2 + 2].tolist()
            ]
            raise ValueError(
                f"micro-conditioning {name} {pair} of sample {row}: sizes must be "
                "positive and crop offsets non-negative (pixels)"
            )
    return numbers


def batch_size_numbers(batch: Mapping[str, Any], size: tuple[int, int], count: int) -> Tensor:
    """The (B, 6) micro-conditioning numbers of a training batch.

    Aspect-bucketed batches carry ``original_size``, ``crop_top_left`` and ``target_size``
    (B×2, :mod:`ldm.data.buckets`); a missing one defaults as diffusers' SDXL pipeline and
    training script do: the image ``size`` for both sizes, ``(0, 0)`` for the crop.

    Args:
        batch: The batch.
        size: The batch's image (height, width) in pixels.
        count: B.

    Raises:
        ValueError: A negative crop, a size that is not positive (:func:`check_size_numbers`).
    """
    defaults = {"original_size": size, "crop_top_left": (0, 0), "target_size": size}
    values = {key: batch[key].cpu() if isinstance(batch.get(key), Tensor) else batch.get(key, d)
              for key, d in defaults.items()}  # fmt: skip
    return check_size_numbers(
        size_numbers(
            values["original_size"], values["crop_top_left"], values["target_size"], batch=count
        )
    )
