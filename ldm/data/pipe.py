"""Reading a shard from a subprocess (``pipe:``, and webdataset's curl/gsutil schemes) without
ever hanging: a reader that produces no byte for ``read_timeout_s`` is killed with a one-line
error naming the shard and the fix, and a stop signal in a DataLoader worker ends the read at
once (the worker can then exit, so the main process saves and stops promptly).

webdataset's ``Pipe`` blocks in ``read()`` for as long as its command does, and waits up to two
hours for the command to exit on ``close()``. :class:`WatchedPipe` reads the same process's
stdout with ``select`` in short polls instead.
"""

from __future__ import annotations

import os
import select
import signal
import time
from typing import Any

#: How often a blocked read wakes to check the stop flag and the idle time (seconds).
POLL_S = 0.2
#: How long ``close()`` lets a command that already delivered its tar exit by itself (seconds).
CLOSE_GRACE_S = 5.0

_stop_requested = False


class ShardReadTimeout(ValueError):
    """A shard's reader produced no bytes for ``read_timeout_s`` seconds (one-line message)."""


class ReadInterrupted(Exception):
    """A stop signal reached this process while it waited for a shard's bytes."""


def request_stop(*_: Any) -> None:
    """Make every blocked :class:`WatchedPipe` read in this process stop (a signal handler)."""
    global _stop_requested
    _stop_requested = True


def stop_requested() -> bool:
    """Whether :func:`request_stop` was called in this process."""
    return _stop_requested


class WatchedPipe:
    """A readable binary stream over a webdataset ``Pipe``, with an idle timeout.

    Args:
        pipe: The ``webdataset.gopen.Pipe`` that started the command.
        url: The shard URL, for messages.
        read_timeout_s: Seconds without a byte before the command is killed; 0 waits forever.
    """

    def __init__(self, pipe: Any, url: str, read_timeout_s: float, group: bool = False) -> None:
        self.pipe = pipe
        self.proc = pipe.proc
        self.group = group
        self.url = url
        self.read_timeout_s = read_timeout_s
        self.fd = pipe.stream.fileno()
        self._last = time.monotonic()
        self._killed = False

    @classmethod
    def command(cls, url: str, read_timeout_s: float) -> WatchedPipe:
        """Run a ``pipe:`` URL's shell command in a process group of its own, so that stopping
        it stops everything it started (a shell's children too)."""
        from webdataset.gopen import Pipe

        pipe = Pipe(
            url[5:], mode="rb", shell=True, bufsize=0, ignore_status=[141], start_new_session=True
        )
        return cls(pipe, url, read_timeout_s, group=True)

    def _kill(self) -> None:
        if self.group:  # the command's whole group: a shell's children outlive the shell
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self._killed = True
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self._killed = True
            self.proc.kill()
        self.proc.wait()

    def _wait_readable(self) -> None:
        while not select.select([self.fd], [], [], POLL_S)[0]:
            if _stop_requested:
                self._kill()
                raise ReadInterrupted(f"stopped reading {self.url}: a stop signal arrived")
            idle = time.monotonic() - self._last
            if self.read_timeout_s and idle >= self.read_timeout_s:
                self._kill()
                raise ShardReadTimeout(
                    f"shard {self.url} gave no bytes for {idle:.0f} s, so its reader was killed: "
                    "check that the command or server still delivers data (run it by hand), "
                    "or raise data.read_timeout_s (0 waits forever)"
                )

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all until EOF when negative); ``b""`` at EOF."""
        if size is None or size < 0:
            chunks = []
            while chunk := self.read(1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        if size == 0:
            return b""
        self._wait_readable()
        data = os.read(self.fd, size)
        self._last = time.monotonic()
        return data

    def close(self) -> None:
        """Close the pipe; a command still running gets :data:`CLOSE_GRACE_S` to exit, then it is
        killed. Raises ``OSError`` if the command failed (a non-zero exit of its own)."""
        stream = self.pipe.stream
        if stream.closed:
            return
        stream.close()  # a command still writing gets SIGPIPE
        try:
            status = self.proc.wait(CLOSE_GRACE_S)
        except Exception:  # subprocess.TimeoutExpired: it delivered the tar, then kept running
            self._kill()
            status = self.proc.returncode
        self.pipe.status = status
        if self.group and not self._killed:  # what the command left running in the background
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._killed or status in (-signal.SIGPIPE, *self.pipe.ignore_status):
            return
        if not self.pipe.ignore_errors:
            raise OSError(f"{self.url}: the command exited with status {status}")
