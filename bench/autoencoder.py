"""Benchmark our KL autoencoder against diffusers' ``AutoencoderKL`` (same config, same weights,
same process): encode+decode throughput and one training step (forward + backward of an L1
reconstruction loss). Prints ours/theirs speed ratios (> 1 means ours is faster).

    .venv/bin/python bench/autoencoder.py                  # CPU defaults, well under 2 minutes
    .venv/bin/python bench/autoencoder.py --threads 1 --clock cpu   # on a shared, busy machine
    .venv/bin/python bench/autoencoder.py --device cuda --dtype bfloat16 --size 256 --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ldm.checkpoint.vae_keys import vae_config_ldm_to_diffusers, vae_ldm_to_diffusers
from ldm.models.autoencoder import AutoencoderKL

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "autoencoder"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_pair(name: str, device: str, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    """Ours (from ``configs/autoencoder/<name>.yaml``) and diffusers' with the same weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    kwargs = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["autoencoder"]
    torch.manual_seed(0)
    ours = AutoencoderKL(**kwargs)
    theirs = DiffusersAutoencoderKL(**vae_config_ldm_to_diffusers(**kwargs))
    theirs.load_state_dict(vae_ldm_to_diffusers(ours.state_dict()), strict=True)
    return ours.to(device, dtype), theirs.to(device, dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str, clock: Callable[[], float]) -> float:
    _sync(device)
    start = clock()
    fn()
    _sync(device)
    return clock() - start


def _infer(model: torch.nn.Module, ours: bool, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            if ours:
                return model.decode(model.encode(x).mode())
            return model.decode(model.encode(x).latent_dist.mode()).sample

    return run


def _train(model: torch.nn.Module, ours: bool, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(x.device).manual_seed(0)
        if ours:
            rec = model(x, generator=gen)[0]
        else:
            rec = model(x, sample_posterior=True, generator=gen).sample
        loss = (rec.float() - x.float()).abs().mean()
        loss.backward()
        return loss

    return run


def compare(
    name: str,
    size: int,
    batch: int,
    device: str,
    dtype: torch.dtype,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Print per-task times (best of ``repeats``, interleaved) and ours/theirs ratios."""
    ours, theirs = build_pair(name, device, dtype)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.clamp(-1, 1).to(device, dtype)
    for task, make in (("encode+decode", _infer), ("train step", _train)):
        ours.train(task == "train step")
        theirs.train(task == "train step")
        fns = (make(ours, True, x), make(theirs, False, x))
        for fn in fns:  # warm-up
            fn()
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):  # interleave, so machine noise hits both alike
            for fn, acc in zip(fns, times, strict=True):
                acc.append(_timed(fn, device, clock))
        best_ours, best_theirs = min(times[0]), min(times[1])
        median_ratio = statistics.median(t / o for o, t in zip(*times, strict=True))
        print(
            f"{name:8s} {size}x{size} b{batch} {task:14s} ours {best_ours * 1e3:8.1f} ms  "
            f"diffusers {best_theirs * 1e3:8.1f} ms  ratio {best_theirs / best_ours:5.2f} "
            f"(median {median_ratio:4.2f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--configs", nargs="+", default=["kl-f8", "kl-tiny"])
    parser.add_argument("--size", type=int, default=None, help="image size (default per config)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per config)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu = process CPU time: steadier on a busy machine, meaningful with --threads 1",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {"kl-f8": (64, 1), "kl-tiny": (32, 4)}
    print(
        f"torch {torch.__version__}, device {args.device}, dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}, {args.clock} clock; "
        "ratio = diffusers time / ours (> 1: ours faster)"
    )
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for name in args.configs:
        size, batch = defaults.get(name, (64, 2))
        compare(
            name,
            args.size or size,
            args.batch or batch,
            args.device,
            DTYPES[args.dtype],
            args.repeats,
            clock,
        )


if __name__ == "__main__":
    main()
