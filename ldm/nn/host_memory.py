"""Keep freed host memory for reuse: on CPU, a training step's large tensors are re-allocated
every step, and glibc hands each one above its mmap threshold (32 MiB at most) to the kernel
on free, so the next step touches fresh pages again.

Measured on the 2-core sandbox VM (see README, Benchmarks): one fp32 SD1 U-Net training step at
batch 1 spent 40% of its self time in ``fill_`` of weight-sized gradients (in bf16 autocast, 28%
in ``copy_`` of the weight casts) — the first touch of newly mapped pages, i.e. page faults —
and took 1.3-1.8x longer than with freed memory kept in the heap.

:func:`keep_freed_memory` sets glibc's ``M_MMAP_MAX`` to 0 (large blocks come from the heap;
glibc still falls back to ``mmap`` when the heap cannot grow) and raises ``M_TRIM_THRESHOLD``
so the heap is not given back: the process keeps its peak footprint, which a training loop
reaches every step anyway. The environment variables ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=…`` do the same at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int: trim only past 2 GiB of free heap top


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018  (glibc only: musl/macOS lack it)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (process-wide).

    Returns:
        True if applied; False where the C library has no ``mallopt`` (not glibc).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX))


def apply_host_memory(mode: str, on_cpu: bool) -> bool:
    """``trainer.host_memory``: ``keep``, or ``auto`` on a CPU run, calls
    :func:`keep_freed_memory`; ``default`` leaves glibc as started.

    Returns:
        True if freed memory is now kept.
    """
    return (mode == "keep" or (mode == "auto" and on_cpu)) and keep_freed_memory()
