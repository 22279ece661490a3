"""How many graphs ``trainer.compile`` builds for aspect-ratio buckets (torch.compile recompiles).

Compiles the U-Net of a config in place, as ``trainer.compile`` does (``nn.Module.compile``),
and runs forward + backward on a sequence of bucket shapes, full and partial batches, printing
after each the number of graphs dynamo has built and the step's time. With automatic dynamic
shapes (torch's default) the expectation is: one graph for the first bucket, one recompile that
makes height/width dynamic at the second, one that makes the batch dynamic at the first partial
batch, then none. ``--backend eager`` measures dynamo's guards alone (cheap on CPU); the default
``inductor`` on a GPU is the real thing.

    .venv/bin/python bench/compile_buckets.py --backend eager                   # CPU, ~20 s
    .venv/bin/python bench/compile_buckets.py --device cuda -c configs/ldm/sd1.yaml \\
        --buckets 64x64,48x80,80x48,56x72 --batch 8                             # GPU session
"""

from __future__ import annotations

import argparse
import time

import torch
from torch._dynamo.utils import counters

from ldm import build
from ldm.config import load


def main(argv: list[str] | None = None) -> list[tuple[int, float]]:
    """Runs the steps; returns (graphs built so far, step seconds) after each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="configs/ldm/tiny.yaml")
    parser.add_argument(
        "--buckets",
        default="6x10,8x8,10x6,12x4",
        help="latent buckets HxW (pixels / autoencoder factor), comma-separated",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    cfg = load([args.config])
    unet = build.build_unet(cfg.model.unet).to(args.device)
    unet.compile(backend=args.backend)
    sizes = [tuple(int(v) for v in b.split("x")) for b in args.buckets.split(",")]
    # every bucket full, then partial batches of two sizes, then the first bucket again
    steps = [(args.batch, s) for s in sizes]
    steps += [(max(1, args.batch // 2), sizes[0]), (max(1, args.batch - 1), sizes[-1])]
    steps += [(args.batch, sizes[0])]
    channels = cfg.model.unet.in_channels
    record: list[tuple[int, float]] = []
    for batch, (h, w) in steps:
        x = torch.randn(batch, channels, h, w, device=args.device)
        t = torch.randint(0, 1000, (batch,), device=args.device)
        context = torch.randn(batch, 8, cfg.model.unet.context_dim, device=args.device)
        start = time.perf_counter()
        unet(x, t, context=context).float().mean().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        record.append((int(counters["stats"]["unique_graphs"]), time.perf_counter() - start))
        print(
            f"batch {batch:3d} latent {h:3d}x{w:<3d}  graphs so far {record[-1][0]:2d}  "
            f"step {record[-1][1]:7.2f} s",
            flush=True,
        )
    print(f"{len(sizes)} buckets, {len(steps)} steps: {record[-1][0]} graphs ({args.backend})")
    return record


if __name__ == "__main__":
    main()
