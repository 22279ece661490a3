r"""AdamW's step over a U-Net's weights: ours (``optim.implementation=auto``: PyTorch's fused
kernel) against what the peers' training scripts build, ``torch.optim.AdamW(params, lr, betas,
weight_decay, eps)`` with PyTorch's default implementation (the per-tensor loop on the CPU,
``foreach`` on GPUs: diffusers' ``train_text_to_image.py``, CompVis and sgm), in one process.

The step is the optimizer's whole share of a training step, and it does not shrink with the
batch: one read of each weight, gradient and both moments and one write of weight and moments
(28 bytes per fp32 weight), so its speed is the memory bandwidth it reaches, printed as GB/s.
All implementations share one set of weights, gradients and moments (``optimizer.state`` is
the same object), so the SD1 U-Net's 860M weights fit in ~14 GB; calls alternate, the order
rotating every round, and a ratio is the median of the per-round ratios.

    .venv/bin/python bench/optim.py                          # SD1's U-Net, fp32, CPU
    .venv/bin/python bench/optim.py --impls auto,default,foreach,for-loop --dtype bf16
    .venv/bin/python bench/optim.py --size configs/demo/ldm.yaml --iters 50   # the demo's U-Net
    python bench/optim.py --device cuda                      # on a GPU (bench/gpu.sh runs it)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import fair  # noqa: E402
from ldm.nn.host_memory import keep_freed_memory  # noqa: E402
from ldm.training.optim import build_optimizer  # noqa: E402

CONFIGS = ROOT / "configs" / "ldm"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def unet_parameters(size: str, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Leaf tensors shaped like the U-Net weights of ``configs/ldm/unet-<size>.yaml`` (or of
    the ``model.unet`` section of the config file ``size`` names), built on the meta device so
    only the weights themselves are allocated, with gradients."""
    from omegaconf import OmegaConf

    from ldm.models.unet import UNetModel

    path = Path(size) if size.endswith(".yaml") else CONFIGS / f"unet-{size}.yaml"
    kwargs = OmegaConf.to_container(OmegaConf.load(path))["model"]["unet"]
    with torch.device("meta"):
        shapes = [p.shape for p in UNetModel(**kwargs).parameters()]
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device, dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).mul_(1e-3).to(device, dtype)
        params.append(p)
    return params


def optimizer(params: list[torch.Tensor], implementation: str) -> torch.optim.Optimizer:
    """``default`` is the peers' construction; the rest go through ``ldm``'s builder."""
    hyper = dict(lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if implementation == "default":
        return torch.optim.AdamW(params, **hyper)
    return build_optimizer(params, implementation=implementation, **hyper)


def label(opt: torch.optim.Optimizer, implementation: str) -> str:
    group = opt.param_groups[0]
    kernel = "fused" if group["fused"] else "foreach" if group["foreach"] else "for-loop"
    if implementation == "default" and group["foreach"] is None and group["fused"] is None:
        on = opt.param_groups[0]["params"][0].device.type
        kernel = "foreach" if on == "cuda" else "for-loop"
    return implementation if implementation == kernel else f"{implementation} ({kernel})"


def measure(
    size: str, device: torch.device, dtype: str, impls: list[str], warmup: int, iters: int
) -> tuple[int, list[str], list[list[float]]]:
    """Weights counted, each implementation's label, and its interleaved step times (s)."""
    params = unet_parameters(size, device, DTYPES[dtype])
    opts = [optimizer(params, impl) for impl in impls]
    for opt in opts[1:]:
        opt.state = opts[0].state  # one set of moments: the same bytes move for every kernel
    times = fair.time_interleaved([opt.step for opt in opts], warmup, iters, device)
    labels = [label(opt, impl) for opt, impl in zip(opts, impls, strict=True)]
    return sum(p.numel() for p in params), labels, times


def ratios(impls: list[str], times: list[list[float]]) -> tuple[str, list[float]]:
    """The baseline (``default`` if measured, else the last) and each median per-round ratio
    baseline time / this time (> 1: faster than the baseline)."""
    base_name = "default" if "default" in impls else impls[-1]
    base = times[impls.index(base_name)]
    return base_name, [
        statistics.median(b / a for a, b in zip(ts, base, strict=True)) for ts in times
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="sd1", help="configs/ldm/unet-<size>.yaml, or a config file")
    p.add_argument(
        "--impls", default="auto,default", help="comma list (auto default fused foreach for-loop)"
    )
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's choice)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    numel, labels, times = measure(args.size, device, args.dtype, impls, args.warmup, args.iters)
    # Bytes moved per weight: read weight, gradient and both moments, write weight and moments
    # (PyTorch's AdamW keeps the moments in the weights' dtype).
    traffic = numel * DTYPES[args.dtype].itemsize * 7
    name = Path(args.size).name if args.size.endswith(".yaml") else f"unet-{args.size}"
    print(
        f"AdamW step over {name}'s {numel / 1e6:.3g}M {args.dtype} weights on {device} "
        f"(threads={torch.get_num_threads()}, torch={torch.__version__}); median of "
        f"{args.iters} interleaved rounds after {args.warmup} warm-up"
    )
    base_name, per_impl = ratios(impls, times)
    print(f"{'implementation':26s} {'ms':>9s} {'GB/s':>7s} {'vs ' + base_name:>12s}")
    for name, ts, ratio in zip(labels, times, per_impl, strict=True):
        t = statistics.median(ts)
        print(f"{name:26s} {t * 1e3:9.1f} {traffic / t / 1e9:7.1f} {ratio:12.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
