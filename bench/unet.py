"""Benchmark our U-Net against diffusers' UNet2DConditionModel (same config, same weights).

Measures forward (no grad) and forward+backward time of both models in one process, interleaved
iteration by iteration so that load from other processes hits both alike, and prints the ratio
theirs/ours (> 1 means we are faster). On CUDA it also prints images/s and MFU of the
forward+backward pass for the SD1 config at 32x32 latents (537 GFLOP per sample).

    .venv/bin/python bench/unet.py                          # tiny + SD1 @ 32x32, batch 1, CPU
    .venv/bin/python bench/unet.py --sizes sd1 --latent 64 --batch 2 --iters 5
    python bench/unet.py --device cuda --dtype bf16 --sizes sd1 --batch 32 [--compile]
    .venv/bin/python bench/unet.py --threads 1    # steadier numbers on a shared CPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from omegaconf import OmegaConf

from ldm.checkpoint.unet_keys import unet_kwargs_to_diffusers_config, unet_ldm_to_diffusers
from ldm.models.unet import UNetModel

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "ldm"
SD1_TRAIN_GFLOP_PER_SAMPLE = 537.0  # forward+backward, SD1 U-Net at 32x32 latents
# Dense bf16 tensor-core peaks; the first name contained in the device name wins.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0,
}  # fmt: skip
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (warmup, timed iterations) per size, unless --warmup/--iters are given: keeps the default CPU
# run to a few minutes (SD1 forward+backward takes ~10 s per step on 2 cores).
DEFAULT_ITERS = {"tiny": (2, 10)}
LARGE_ITERS = (1, 2)
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
    return ours.to(device), theirs.to(device), kwargs


def make_steps(
    ours: UNetModel,
    theirs: UNet2DConditionModel,
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backward: bool,
    dtype: torch.dtype,
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One forward (or forward+backward) step of each model as a closure."""
    x, t, ctx = inputs
    device_type = x.device.type
    amp = dtype != torch.float32

    def run(model: torch.nn.Module, call: Callable[[], torch.Tensor]) -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=amp):
            if backward:
                model.zero_grad(set_to_none=True)
                call().float().square().mean().backward()
            else:
                with torch.no_grad():
                    call()

    return (
        lambda: run(ours, lambda: ours(x, t, ctx)),
        lambda: run(theirs, lambda: theirs(x, t, ctx).sample),
    )


def time_interleaved(
    steps: tuple[Callable[[], None], Callable[[], None]], warmup: int, iters: int, cuda: bool
) -> tuple[float, float]:
    """Median seconds per step of each closure, alternating between them."""
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + iters):
        for step, acc in zip(steps, times, strict=True):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                acc.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def peak_tflops(override: float | None) -> float | None:
    """Dense bf16/fp16 peak of the current CUDA device, from its name (or ``override``)."""
    if override is not None:
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="tiny,sd1", help="comma list of unet-<size>.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--context-len", type=int, default=77)
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 tiny, 1 larger")
    parser.add_argument("--iters", type=int, default=None, help="default: 10 tiny, 2 larger")
    parser.add_argument("--modes", default="fwd,fwd+bwd", help="comma list of fwd, fwd+bwd")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"device={device} dtype={args.dtype} batch={args.batch} latent={args.latent} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")  # fmt: skip
    print(f"{'size':6s} {'mode':8s} {'ours ms':>10s} {'diffusers ms':>13s} {'ratio':>7s}")
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        ours, theirs, kw = build_pair(size, device)
        if args.compile:
            ours, theirs = torch.compile(ours), torch.compile(theirs)
        x = torch.randn(args.batch, kw["in_channels"], args.latent, args.latent, device=device)
        t = torch.randint(0, 1000, (args.batch,), device=device).float()
        ctx = torch.randn(args.batch, args.context_len, kw["context_dim"], device=device)
        warmup, iters = CUDA_ITERS if cuda else DEFAULT_ITERS.get(size, LARGE_ITERS)
        warmup = warmup if args.warmup is None else args.warmup
        iters = iters if args.iters is None else args.iters
        for mode in args.modes.split(","):
            backward = mode == "fwd+bwd"
            ours.train(backward)
            theirs.train(backward)
            steps = make_steps(ours, theirs, (x, t, ctx), backward, dtype)
            t_ours, t_theirs = time_interleaved(steps, warmup, iters, cuda)
            line = f"{size:6s} {mode:8s} {t_ours * 1e3:10.1f} {t_theirs * 1e3:13.1f} "
            line += f"{t_theirs / t_ours:7.2f}"
            if cuda:
                line += f"  img/s ours {args.batch / t_ours:.1f}"
                line += f" diffusers {args.batch / t_theirs:.1f}"
            peak = peak_tflops(args.peak_tflops) if cuda and dtype != torch.float32 else None
            if peak and backward and size == "sd1" and args.latent == 32:
                flops = SD1_TRAIN_GFLOP_PER_SAMPLE * 1e9 * args.batch
                mfu_ours, mfu_theirs = (flops / s / (peak * 1e12) for s in (t_ours, t_theirs))
                line += f", MFU ours {mfu_ours:.1%} diffusers {mfu_theirs:.1%}"
            print(line, flush=True)
        del ours, theirs
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
