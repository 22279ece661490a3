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


def progress_line(
    step: int,
    total: int | None,
    loss: float | None,
    rate: float,
    elapsed: float,
    unit: str = "step",
    rate_unit: str = "it/s",
) -> str:
    """One progress line: ``step 120/500  loss 0.1234  3.21 it/s  elapsed 0:00:37  ETA 0:01:58``."""
    parts = [f"{unit} {step}/{total}" if total else f"{unit} {step}"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    parts.append(f"{rate:.3g} {rate_unit}")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if total and rate > 0:
        parts.append(f"ETA {format_duration((total - step) / rate)}")
    return "  ".join(parts)


class Counter:
    """Progress over a known amount of work, advanced by :meth:`update`: a tqdm bar on a
    terminal (stderr), else a line on stdout after the first unit, every ``every_s`` seconds
    and at :meth:`close`::

        sampling: step 40/60  12.3 step/s  elapsed 0:00:03  ETA 0:00:02

    Args:
        total: Units of work (None: unknown).
        desc: What is being done.
        unit: Name of one unit.
        every_s: Longest silence between lines when not on a terminal.
    """

    def __init__(
        self, total: int | None, desc: str, unit: str = "step", every_s: float = 30.0
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = self._printed = 0
        self._bar = None
        if is_terminal(sys.stderr):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit)
        self._start = self._last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` units."""
        if n <= 0:
            return
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._printed == 0 or time.perf_counter() - self._last >= self.every_s:
            self._report()

    def close(self) -> None:
        """Finish: close the bar, or print the last line if the count moved since."""
        if self._bar is not None:
            self._bar.close()
        elif self.n != self._printed:
            self._report()

    def _report(self) -> None:
        now = time.perf_counter()
        rate = self.n / (now - self._start) if now > self._start else 0.0
        print(
            f"{self.desc}: "
            + progress_line(
                self.n, self.total, None, rate, now - self._start, self.unit, f"{self.unit}/s"
            ),
            flush=True,
        )
        self._last, self._printed = now, self.n


def progress(
    iterable: Iterable[T],
    desc: str,
    unit: str = "batch",
    total: int | None = None,
    enabled: bool = True,
    every_s: float = 30.0,
) -> Iterator[T]:
    """Iterate with progress (a :class:`Counter` advanced once per item)."""
    if not enabled:
        yield from iterable
        return
    counter = Counter(total, desc, unit, every_s)
    for item in iterable:
        yield item
        counter.update()
    counter.close()
