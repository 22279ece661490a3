"""Benchmark our U-Net against diffusers' UNet2DConditionModel (same config, same weights).

Measures forward (no grad) and training-step (forward + backward) time of both models in one
process, interleaved call by call (medians), and prints for each *setting* (autocast dtype ×
memory format, given to both models alike; both use PyTorch SDPA attention, diffusers through
its default ``AttnProcessor2_0``) the ratio diffusers/ours (> 1: ours faster), then the
out-of-the-box ratio: our fastest setting against diffusers' defaults (fp32, NCHW). Each line
also gives the achieved GFLOP/s (FLOPs counted by ``torch.utils.flop_counter``) against the
machine's matmul rate, measured at the start of the run (a timed 2048³ GEMM per dtype).

    .venv/bin/python bench/unet.py                          # tiny + SD1 @ 16x16, CPU, ~10 min
    .venv/bin/python bench/unet.py --sizes sd1 --latent 32 --settings fp32,bf16 --iters 3
    python bench/unet.py --device cuda --settings bf16,bf16-cl --sizes sd1 --batch 32 [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from omegaconf import OmegaConf

from ldm.checkpoint.unet_keys import unet_kwargs_to_diffusers_config, unet_ldm_to_diffusers
from ldm.models.unet import UNetModel

_spec = importlib.util.spec_from_file_location("bench_fair", Path(__file__).with_name("fair.py"))
fair = sys.modules.setdefault("bench_fair", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fair)  # bench/fair.py, without bench/ on sys.path

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "ldm"
# (warmup, timed iterations) per size on CPU unless --warmup/--iters are given.
DEFAULT_ITERS = {"tiny": (2, 10)}
LARGE_ITERS = (1, 5)
CUDA_ITERS = (5, 20)


def build_pair(size: str, device: torch.device) -> tuple[UNetModel, UNet2DConditionModel, dict]:
    """Our U-Net from ``configs/ldm/unet-<size>.yaml`` and diffusers' with the same weights."""
    kwargs = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"unet-{size}.yaml"))["model"]["unet"]
    ours = UNetModel(**kwargs)
    with torch.no_grad():
        for p in ours.parameters():  # non-zero everywhere (SD zero-inits some output convs)
            p.normal_(0.0, 0.02)
    theirs = UNet2DConditionModel(**unet_kwargs_to_diffusers_config(kwargs))
    mapped = unet_ldm_to_diffusers(
        ours.state_dict(), kwargs["channel_mult"], kwargs["num_res_blocks"],
        kwargs["attention_resolutions"],
    )  # fmt: skip
    theirs.load_state_dict(mapped, strict=True)
    theirs.set_attn_processor(AttnProcessor2_0())  # diffusers' default with SDPA, made explicit
    return ours.to(device), theirs.to(device), kwargs


def make_step(
    model: torch.nn.Module,
    call: Callable[[], torch.Tensor],
    backward: bool,
    setting: fair.Setting,
    device: torch.device,
) -> Callable[[], None]:
    """One forward (no grad) or forward+backward call of ``model`` under ``setting``."""

    def step() -> None:
        with fair.autocast(device, setting):
            if backward:
                model.zero_grad(set_to_none=True)
                call().float().square().mean().backward()
            else:
                with torch.no_grad():
                    call()

    return step


def measure(
    ours: UNetModel,
    theirs: UNet2DConditionModel,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backward: bool,
    pair: tuple[fair.Setting, fair.Setting],
    device: torch.device,
    warmup: int,
    iters: int,
) -> list[list[float]]:
    """Interleaved call times of ours under ``pair[0]`` and diffusers' under ``pair[1]``."""
    x, t, ctx = inputs
    ours.to(memory_format=pair[0].memory_format)
    theirs.to(memory_format=pair[1].memory_format)
    xo = x.contiguous(memory_format=pair[0].memory_format)
    xt = x.contiguous(memory_format=pair[1].memory_format)
    steps = [
        make_step(ours, lambda: ours(xo, t, ctx), backward, pair[0], device),
        make_step(theirs, lambda: theirs(xt, t, ctx).sample, backward, pair[1], device),
    ]
    return fair.time_interleaved(steps, warmup, iters, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,sd1", help="comma list of unet-<size>.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--context-len", type=int, default=77)
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 tiny, 1 larger")
    parser.add_argument("--iters", type=int, default=None, help="default: 10 tiny, 5 larger")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    fair.add_common_args(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = fair.apply_common_args(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtypes = sorted({s.dtype for s in settings} | {"fp32"})
    peaks = {d: fair.matmul_peak_gflops(device, fair.DTYPES[d]) for d in dtypes}
    fair.print_header(device, peaks, f"U-Net, batch {args.batch}, {args.latent}x{args.latent} "
                      f"latents, {args.context_len} context tokens")  # fmt: skip
    for size in args.sizes.split(","):
        run_size(size, args, device, settings, peaks)


def run_size(
    size: str,
    args: argparse.Namespace,
    device: torch.device,
    settings: list[fair.Setting],
    peaks: dict[str, float],
) -> None:
    """Every setting and mode for one U-Net size; prints one table."""
    torch.manual_seed(0)
    ours, theirs, kw = build_pair(size, device)
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    x = torch.randn(args.batch, kw["in_channels"], args.latent, args.latent, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device).float()
    ctx = torch.randn(args.batch, args.context_len, kw["context_dim"], device=device)
    warmup, iters = CUDA_ITERS if device.type == "cuda" else DEFAULT_ITERS.get(size, LARGE_ITERS)
    warmup = warmup if args.warmup is None else args.warmup
    iters = iters if args.iters is None else args.iters
    print(f"\n{size} ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters), "
          f"median of {iters} interleaved calls after {warmup} warm-up")  # fmt: skip
    print(fair.TABLE_HEAD)
    default = fair.Setting()  # diffusers out of the box: fp32, NCHW
    for mode in args.modes.split(","):
        backward = mode == "fwd+bwd"
        ours.train(backward)
        theirs.train(backward)
        gflop = fair.count_gflop(make_step(ours, lambda: ours(x, t, ctx), backward, default,
                                           device))  # fmt: skip
        medians: dict[fair.Setting, float] = {}

        for setting in settings:
            times = measure(
                ours, theirs, (x, t, ctx), backward, (setting, setting), device, warmup, iters
            )
            medians[setting] = statistics.median(times[0])
            print(fair.row(f"same: {setting.name}", mode, *times, gflop, peaks[setting.dtype]),
                  flush=True)  # fmt: skip
        best = min(settings, key=medians.__getitem__)
        times = measure(ours, theirs, (x, t, ctx), backward, (best, default), device, warmup, iters)
        print(fair.row(f"ours {best.name} vs diffusers default", mode, *times, gflop,
                       peaks[best.dtype]), flush=True)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
