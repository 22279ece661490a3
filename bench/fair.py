"""What bench/unet.py and bench/autoencoder.py share: the measured matmul peak, FLOP counts,
settings (dtype × memory format) and interleaved timing of ours against diffusers.

A *setting* is what both libraries can be given alike: autocast dtype (weights stay float32, as
in mixed-precision training) and the memory format of weights and inputs (NCHW or
channels-last). "Same settings" rows give both models the same setting; the "out of the box"
row compares our fastest setting with diffusers' defaults (float32, NCHW).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ldm.nn.host_memory import keep_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """One way of running a model: autocast dtype and memory format."""

    dtype: str = "fp32"
    channels_last: bool = False

    @property
    def name(self) -> str:
        return f"{self.dtype} {'channels-last' if self.channels_last else 'NCHW'}"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def parse_settings(text: str) -> list[Setting]:
    """``"fp32,fp32-cl,bf16"`` -> settings (``-cl``: channels-last)."""
    out = []
    for item in text.split(","):
        dtype, _, fmt = item.strip().partition("-")
        if dtype not in DTYPES or fmt not in ("", "cl"):
            raise SystemExit(f"error: setting {item!r}: use <{'|'.join(DTYPES)}>[-cl]")
        out.append(Setting(dtype, fmt == "cl"))
    return out


CLOCK: list[Callable[[], float]] = [time.perf_counter]
MALLOC = ["glibc default"]


def use_cpu_clock() -> None:
    """Time calls by this process's CPU time: on a shared, busy CPU with ``--threads 1`` it
    counts the work done, not the time spent waiting for a core."""
    CLOCK[0] = time.process_time


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """``--settings``, ``--threads`` and ``--clock`` (U-Net and autoencoder benches)."""
    parser.add_argument(
        "--settings",
        default="fp32,fp32-cl,bf16",
        help="comma list of <fp32|bf16|fp16>[-cl] (-cl: channels-last)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "default"],
        help="keep: glibc keeps freed memory for reuse (ldm.nn.host_memory, process-wide, so "
        "both libraries alike); default: glibc as started",
    )
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: process CPU time, steadier on a busy machine with --threads 1",
    )


def apply_common_args(args: argparse.Namespace) -> list[Setting]:
    """Apply ``--threads``/``--clock``/``--malloc``; the parsed ``--settings``."""
    MALLOC[0] = (
        "keep freed memory" if args.malloc == "keep" and keep_freed_memory() else "glibc default"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        use_cpu_clock()
    return parse_settings(args.settings)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Measured dense matmul rate: the fastest of 5 timed ``n³`` products after 2 warm-ups (the
    machine's ceiling, not its average: on a shared CPU a busy neighbour slows every call).

    On the CPU the same product is also timed through oneDNN, as a 1×1 convolution over a
    channels-last ``(1, n, 1, n)`` input, and the faster of the two counts: fp32 ``a @ b`` goes
    to MKL, which on AMD CPUs runs AVX2 code (2026-12-02, AMD EPYC with AVX-512: 158-190
    GFLOP/s against oneDNN's 363-392), while convolutions take oneDNN — a ceiling from MKL
    alone read the autoencoder at 158% of it.
    """
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    products = [lambda: a @ b]
    if device.type == "cpu":
        x = a.view(1, 1, n, n).permute(0, 3, 1, 2)  # channels-last (1, n, 1, n): no copy
        w = b.t().contiguous().view(n, n, 1, 1)
        products.append(lambda: torch.nn.functional.conv2d(x, w))
    best = float("inf")
    for product in products:
        for i in range(7):
            sync(device)
            start = CLOCK[0]()
            product()
            sync(device)
            if i >= 2:
                best = min(best, CLOCK[0]() - start)
    return 2 * n**3 / best / 1e9


def count_gflop(step: Callable[[], object]) -> float:
    """FLOPs of one call of ``step`` (matmuls, convolutions, attention), in GFLOP."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def time_interleaved(
    steps: list[Callable[[], object]], warmup: int, iters: int, device: torch.device
) -> list[list[float]]:
    """Seconds of each timed call of each step, calling them in turn (the order rotating every
    round) so that load from other processes hits all of them alike. The clock is
    :data:`CLOCK` (wall time, or this process's CPU time after ``use_cpu_clock()``)."""
    times: list[list[float]] = [[] for _ in steps]
    for i in range(warmup + iters):
        order = list(range(len(steps)))
        order = order[i % len(order) :] + order[: i % len(order)]
        for j in order:
            sync(device)
            start = CLOCK[0]()
            steps[j]()
            sync(device)
            if i >= warmup:
                times[j].append(CLOCK[0]() - start)
    return times


def autocast(device: torch.device, setting: Setting) -> torch.autocast:
    """Autocast to the setting's dtype (disabled for float32)."""
    dtype = DTYPES[setting.dtype]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def print_header(device: torch.device, peaks: dict[str, float], what: str) -> None:
    """The run's context line and the measured matmul peaks."""
    clock = "process CPU time" if CLOCK[0] is time.process_time else "wall time"
    print(
        f"{what}; device={device} threads={torch.get_num_threads()} torch={torch.__version__}, "
        f"{clock}, malloc: {MALLOC[0]}"
    )
    print("measured matmul peak: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print("ratio = median over interleaved rounds of diffusers time / ours (> 1: ours faster); "
          "util = achieved GFLOP/s / measured matmul peak of the setting's dtype")  # fmt: skip


def row(
    label: str, mode: str, ours: list[float], theirs: list[float], gflop: float, peak: float
) -> str:
    """One printed result line from interleaved call times: median times, the median of the
    per-round ratios (robust to load that hits one round), GFLOP/s and utilisation."""
    t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
    ratio = statistics.median(b / a for a, b in zip(ours, theirs, strict=True))
    util = lambda t: gflop / t / peak  # noqa: E731
    return (f"{label:34s} {mode:8s} {t_ours * 1e3:9.1f} {t_theirs * 1e3:10.1f} "
            f"{ratio:6.2f}  {gflop / t_ours:6.1f} {util(t_ours):5.0%} "
            f"{gflop / t_theirs:6.1f} {util(t_theirs):5.0%}")  # fmt: skip


TABLE_HEAD = (
    f"{'setting':34s} {'mode':8s} {'ours ms':>9s} {'diff. ms':>10s} {'ratio':>6s}  "
    f"{'GF/s':>6s} {'util':>5s} {'GF/s':>6s} {'util':>5s}  (ours | diffusers)"
)
