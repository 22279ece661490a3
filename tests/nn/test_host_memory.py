"""ldm.nn.host_memory: with freed memory kept, large blocks come from the heap, not fresh mmaps;
``trainer.host_memory`` (apply_host_memory) keeps it on CPU runs unless told otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# In a child process (the setting is process-wide): malloc 64 MiB and report whether glibc
# served it from a fresh mmap (mallinfo2().hblkhd: bytes held in mmapped blocks).
CHILD = """
import ctypes, importlib.util, sys
# The module alone (ldm.nn's package would import torch: seconds per child).
spec = importlib.util.spec_from_file_location("host_memory", sys.argv[2])
host_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host_memory)

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory()
elif sys.argv[1] != "glibc":  # trainer.host_memory value and where the run trains
    mode, device = sys.argv[1].split(":")
    host_memory.apply_host_memory(mode, on_cpu=device == "cpu")
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
mapped = libc.mallinfo2().hblkhd - before
libc.free(block)
print(mapped)
"""


def mapped_bytes(mode: str) -> int:
    module = ROOT / "ldm" / "nn" / "host_memory.py"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(module)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_serves_large_blocks_from_the_heap() -> None:
    assert mapped_bytes("glibc") >= 64 << 20  # glibc maps a 64 MiB block on its own
    assert mapped_bytes("keep") == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize(
    ("setting", "kept"),
    [("auto:cpu", True), ("auto:gpu", False), ("keep:gpu", True), ("default:cpu", False)],
)
def test_trainer_host_memory_setting(setting: str, kept: bool) -> None:
    assert (mapped_bytes(setting) == 0) is kept
