"""Where a U-Net training step spends its time: ops by self time, grouped by kind.

Profiles forward + backward of one training step (torch.profiler, CPU or CUDA) and prints the
share of self time per kind of op — convolutions, GroupNorm, attention (SDPA), matmuls
(linear layers), copies and fills (dtype casts, zeroed gradients), elementwise/activation, and
the rest — plus the top ops, so an optimisation is aimed at what costs. Two configurations by
default: the SD1 U-Net at 32×32 latents (batch 1 on CPU) and the demo's U-Net at its own batch
(32 at 8×8 latents).

    .venv/bin/python bench/op_profile.py                       # both, CPU, fp32
    .venv/bin/python bench/op_profile.py --sizes demo --dtype bf16 --top 15
    .venv/bin/python bench/op_profile.py --sizes sd1 --latent 16 --dtype bf16-weights --threads 1
    python bench/op_profile.py --device cuda --dtype bf16 --sizes sd1 --batch 32
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from ldm.models.unet import UNetModel
from ldm.nn.host_memory import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent
# name -> (config file, latent side, default batch on CPU)
SIZES = {
    "sd1": (ROOT / "configs/ldm/unet-sd1.yaml", 32, 1),
    "demo": (ROOT / "configs/demo/ldm.yaml", 8, 32),
}
KINDS = [  # (kind, substrings of op names), first match wins
    ("convolution", ("conv", "mkldnn_convolution", "slow_conv")),
    ("group norm", ("group_norm", "native_group_norm")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax")),
    ("matmul", ("addmm", "mm", "bmm", "matmul", "linear")),
    ("copy/fill", ("copy_", "fill_", "zero_")),  # dtype casts, zeroed gradients: memory passes
    (
        "elementwise",
        (
            "add",
            "mul",
            "silu",
            "gelu",
            "sigmoid",
            "div",
            "sub",
            "threshold",
            "cat",
            "neg",
            "pow",
            "sum",
            "mean",
        ),
    ),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def build(size: str, device: torch.device) -> tuple[UNetModel, dict, int, int]:
    path, latent, batch = SIZES[size]
    kwargs = OmegaConf.to_container(OmegaConf.load(path))["model"]["unet"]
    torch.manual_seed(0)
    return UNetModel(**kwargs).to(device).train(), kwargs, latent, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="sd1,demo", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "bf16-weights"],
        help="bf16: autocast (fp32 weights); bf16-weights: the model and inputs cast to bf16",
    )
    p.add_argument("--latent", type=int, default=None, help="latent side (default: per size)")
    p.add_argument("--malloc", default="keep", choices=["keep", "default"],
                   help="keep: ldm.nn.host_memory.keep_freed_memory, as bench/fair.py")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="default: per size")
    p.add_argument("--top", type=int, default=8, help="top ops to list")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        keep_freed_memory()
    device = torch.device(args.device)
    for size in args.sizes.split(","):
        report(size, args, device)


def report(size: str, args: argparse.Namespace, device: torch.device) -> None:
    """Profile one training step of ``size`` and print its self time by kind and top ops."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    net, kw, latent, batch = build(size, device)
    batch, latent = args.batch or batch, args.latent or latent
    dtype = torch.bfloat16 if args.dtype == "bf16-weights" else torch.float32
    net.to(dtype)
    x = torch.randn(batch, kw["in_channels"], latent, latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    ctx = torch.randn(batch, 77, kw["context_dim"], device=device, dtype=dtype)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = net(x, t, ctx)
        out.float().square().mean().backward()

    for _ in range(2):  # warm-up: kernel selection, and the heap grown to its steady size
        step()
    with profile(activities=activities) as prof:
        step()
    use_cuda = device.type == "cuda"
    self_time = {
        e.key: (e.self_device_time_total if use_cuda else e.self_cpu_time_total)
        for e in prof.key_averages()
    }
    total = sum(self_time.values()) or 1.0
    by_kind: dict[str, float] = defaultdict(float)
    for name, us in self_time.items():
        by_kind[kind_of(name)] += us
    print(
        f"\n{size}: batch {batch}, {latent}x{latent} latents, {args.dtype}, {device}, "
        f"threads {torch.get_num_threads()}, malloc {args.malloc}: {total / 1e3:.0f} ms self time"
    )
    print(f"{'kind':14s} {'share':>7s} {'ms':>9s}")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{kind:14s} {us / total:7.1%} {us / 1e3:9.1f}")
    print(f"top {args.top} ops:")
    for name, us in sorted(self_time.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {us / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
