"""Benchmark our KL autoencoder against diffusers' ``AutoencoderKL`` (same config, same weights,
same process): encode+decode (no grad) and one training step (forward + backward of an L1
reconstruction loss), interleaved call by call (medians).

For each *setting* (autocast dtype × memory format, given to both alike; both attend with
PyTorch SDPA, diffusers through its default ``AttnProcessor2_0``) it prints the ratio
diffusers/ours (> 1: ours faster), then our fastest setting against diffusers' defaults (fp32,
NCHW), with achieved GFLOP/s against the machine's matmul rate measured at the start of the run.

    .venv/bin/python bench/autoencoder.py                  # CPU defaults, a few minutes
    .venv/bin/python bench/autoencoder.py --configs kl-f8 --size 128 --settings fp32,bf16
    python bench/autoencoder.py --device cuda --settings bf16,bf16-cl --size 256 --batch 8
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from ldm.checkpoint.vae_keys import vae_config_ldm_to_diffusers, vae_ldm_to_diffusers
from ldm.models.autoencoder import AutoencoderKL

_spec = importlib.util.spec_from_file_location("bench_fair", Path(__file__).with_name("fair.py"))
fair = sys.modules.setdefault("bench_fair", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fair)  # bench/fair.py, without bench/ on sys.path

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "autoencoder"
DEFAULT_SHAPES = {"kl-f8": (64, 1), "kl-tiny": (32, 4)}  # (image size, batch) per config


def build_pair(name: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours (from ``configs/autoencoder/<name>.yaml``) and diffusers' with the same weights."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.models.attention_processor import AttnProcessor2_0

    kwargs = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]["autoencoder"]
    torch.manual_seed(0)
    ours = AutoencoderKL(**kwargs)
    theirs = DiffusersAutoencoderKL(**vae_config_ldm_to_diffusers(**kwargs))
    theirs.load_state_dict(vae_ldm_to_diffusers(ours.state_dict()), strict=True)
    theirs.set_attn_processor(AttnProcessor2_0())  # diffusers' default with SDPA, made explicit
    return ours.to(device), theirs.to(device)


def make_step(
    model: torch.nn.Module, ours: bool, x: torch.Tensor, train: bool, setting: fair.Setting
) -> Callable[[], object]:
    """Encode+decode (no grad), or a training step of an L1 loss on a posterior sample."""

    def infer() -> object:
        with torch.no_grad():
            if ours:
                return model.decode(model.encode(x).mode())
            return model.decode(model.encode(x).latent_dist.mode()).sample

    def step() -> object:
        model.zero_grad(set_to_none=True)
        gen = torch.Generator(x.device).manual_seed(0)
        if ours:
            rec = model(x, generator=gen)[0]
        else:
            rec = model(x, sample_posterior=True, generator=gen).sample
        loss = (rec.float() - x.float()).abs().mean()
        loss.backward()
        return loss

    def run() -> object:
        with fair.autocast(x.device, setting):
            return step() if train else infer()

    return run


def compare(
    name: str, size: int, batch: int, args: argparse.Namespace, settings: list, peaks: dict
) -> None:
    """Print per-task medians and ratios for every setting, then ours-best vs the default."""
    device = torch.device(args.device)
    ours, theirs = build_pair(name, args.device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.clamp(-1, 1).to(device)
    print(f"\n{name} {size}x{size} batch {batch}, median of {args.repeats} interleaved calls "
          "after 1 warm-up")  # fmt: skip
    print(fair.TABLE_HEAD)
    default = fair.Setting()  # diffusers out of the box: fp32, NCHW
    for task in ("enc+dec", "train"):
        train = task == "train"
        ours.train(train)
        theirs.train(train)
        gflop = fair.count_gflop(make_step(ours, True, x, train, default))
        medians = {}
        for setting in settings:
            times = measure(ours, theirs, x, train, (setting, setting), args.repeats)
            medians[setting] = statistics.median(times[0])
            print(fair.row(f"same: {setting.name}", task, *times, gflop, peaks[setting.dtype]),
                  flush=True)  # fmt: skip
        best = min(settings, key=medians.__getitem__)
        times = measure(ours, theirs, x, train, (best, default), args.repeats)
        print(fair.row(f"ours {best.name} vs diffusers default", task, *times, gflop,
                       peaks[best.dtype]), flush=True)  # fmt: skip


def measure(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    x: torch.Tensor,
    train: bool,
    pair: tuple,
    repeats: int,
) -> list[list[float]]:
    """Interleaved call times of ours under ``pair[0]`` and diffusers' under ``pair[1]``."""
    ours.to(memory_format=pair[0].memory_format)
    theirs.to(memory_format=pair[1].memory_format)
    xo = x.contiguous(memory_format=pair[0].memory_format)
    xt = x.contiguous(memory_format=pair[1].memory_format)
    steps = [make_step(ours, True, xo, train, pair[0]),
             make_step(theirs, False, xt, train, pair[1])]  # fmt: skip
    return fair.time_interleaved(steps, 1, repeats, x.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=["kl-f8", "kl-tiny"])
    parser.add_argument("--size", type=int, default=None, help="image size (default per config)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default per config)")
    parser.add_argument("--repeats", type=int, default=5)
    fair.add_common_args(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = fair.apply_common_args(args)
    dtypes = sorted({s.dtype for s in settings} | {"fp32"})
    peaks = {d: fair.matmul_peak_gflops(device, fair.DTYPES[d]) for d in dtypes}
    fair.print_header(device, peaks, "KL autoencoder")
    for name in args.configs:
        size, batch = DEFAULT_SHAPES.get(name, (64, 2))
        compare(name, args.size or size, args.batch or batch, args, settings, peaks)


if __name__ == "__main__":
    main()
