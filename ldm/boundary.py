"""The CLIs' error boundary: a problem the user can fix becomes one line and exit code 2.

Every command-line entry point (``train.py``, ``sample.py``, ``python -m ldm.…``) wraps its
``main`` in :func:`error_boundary`. An exception that input can cause (a bad config value, a
damaged or mismatched checkpoint, a missing file, a full or read-only disk, a device that is not
there, a run that diverged) is printed as ``error: <what is wrong and how to fix it>`` on one line
and the command exits with 2. Any other exception is a bug of ours and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import pickle
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USAGE = 2

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}

F = TypeVar("F", bound=Callable[..., int])


class UsageError(ValueError):
    """Bad command-line input, with a one-line message naming the flag and the fix."""


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in lines[1]:
        # Re-raised from a DataLoader worker: the message is the traceback's last line.
        return lines[-1].partition(": ")[2] or lines[-1]
    return lines[0] if lines else ""


def _os_message(exc: OSError) -> str | None:
    where = f" {exc.filename}" if exc.filename else " a file"
    if exc.errno in _DISK_FULL:
        return (
            f"disk full writing{where}: free space, or point run.root / --outdir at a disk "
            "with room (nothing partial was kept)"
        )
    if exc.errno in _NOT_WRITABLE:
        return (
            f"cannot write{where} ({exc.strerror}): point run.root / --outdir at a folder "
            "you can write"
        )
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return (
            _first_line(str(exc)) if exc.filename is None else (f"{exc.strerror}: {exc.filename}")
        )
    return None


def _lightning_message(exc: BaseException) -> str | None:
    module = sys.modules.get("lightning_fabric.utilities.exceptions")
    if module is None:  # Lightning was never imported (sample.py), so this is none of its errors
        return None
    if isinstance(exc, module.MisconfigurationException):
        return (
            f"invalid trainer setting: {_first_line(str(exc))} (see the trainer.* keys in "
            "the README's config reference)"
        )
    return None


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an exception a user can cause, or None for a bug of ours."""
    from ldm.config import ConfigError

    if isinstance(exc, ConfigError | UsageError):
        return _first_line(str(exc))
    if isinstance(exc, OSError):
        return _os_message(exc)
    lightning = _lightning_message(exc)
    if lightning:
        return lightning
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        return f"not a readable safetensors file ({_first_line(str(exc))})"
    if isinstance(exc, pickle.UnpicklingError):
        return (
            "refusing to load a file that is pickled or damaged (checkpoints load with "
            "safetensors or torch.load(weights_only=True)): " + _first_line(str(exc))[:200]
        )
    from ldm.training.nonfinite import NonFiniteLossError

    if isinstance(exc, NonFiniteLossError):
        return _first_line(str(exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return (
            "out of memory: lower data.batch_size / --batch-size or the image size, or use "
            "a device with more memory"
        )
    if isinstance(exc, ValueError):  # our modules raise ValueError for bad input, with a message
        return _first_line(str(exc)) or type(exc).__name__
    return None


def report(exc: BaseException) -> int:
    """Print the one-line message of a user error and return the exit code; re-raise bugs."""
    message = user_message(exc)
    if message is None:
        raise exc
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def error_boundary(main: F) -> F:
    """Decorate a CLI ``main``: user errors print one line and return 2 (see module doc)."""

    @functools.wraps(main)
    def wrapper(*args: object, **kwargs: object) -> int:
        try:
            return main(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - classified in user_message, bugs re-raised
            return report(exc)

    return wrapper  # type: ignore[return-value]
