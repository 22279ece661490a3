"""Progress output for long loops: a tqdm bar on a terminal, plain lines when output goes to a
file (``nohup``, SLURM, ``| tee``), where a bar is one unreadable line of carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stdout) is an interactive terminal."""
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` for a number of seconds (negative or non-finite: ``?``)."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int | None, loss: float | None, rate: float,
                  elapsed: float, unit: str = "step", rate_unit: str = "it/s") -> str:
    """One progress line: ``step 120/500  loss 0.1234  3.21 it/s  elapsed 0:00:37  ETA 0:01:58``."""
    parts = [f"{unit} {step}/{total}" if total else f"{unit} {step}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    parts.append(f"{rate:.3g} {rate_unit}")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if total and rate > 0:
        parts.append(f"ETA {format_duration((total - step) / rate)}")
    return "  ".join(parts)


def progress(iterable: Iterable[T], desc: str, unit: str = "batch", total: int | None = None,
             enabled: bool = True, every_s: float = 30.0) -> Iterator[T]:
    """Iterate with progress: tqdm on a terminal (stderr), else a line every ``every_s`` seconds
    (and after the first item and at the end) on stdout."""
    if not enabled:
        yield from iterable
        return
    if is_terminal(sys.stderr):
        from tqdm import tqdm

        yield from tqdm(iterable, desc=desc, unit=unit, total=total)
        return
    start = last = time.perf_counter()
    n = printed = 0

    def report() -> None:
        now = time.perf_counter()
        rate = n / (now - start) if now > start else 0.0
        print(f"{desc}: " + progress_line(n, total, None, rate, now - start, unit, f"{unit}/s"),
              flush=True)

    for item in iterable:
        yield item
        n += 1
        if n == 1 or time.perf_counter() - last >= every_s:
            report()
            last, printed = time.perf_counter(), n
    if n != printed:
        report()
