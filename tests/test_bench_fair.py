"""bench/unet.py and bench/autoencoder.py: one run prints same-settings and out-of-the-box rows,
the measured matmul peak and utilisation; bad settings are one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=300)  # fmt: skip


def test_unet_bench_prints_fair_rows_and_peak() -> None:
    proc = run(
        "bench/unet.py",
        "--sizes",
        "tiny",
        "--latent",
        "8",
        "--warmup",
        "0",
        "--iters",
        "2",
        "--settings",
        "fp32,fp32-cl",
        "--threads",
        "1",
        "--clock",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert re.search(r"measured matmul peak: fp32 [\d.]+ GFLOP/s", out)
    for mode in ("fwd", "fwd+bwd"):
        for label in ("same: fp32 NCHW", "same: fp32 channels-last"):
            line = next(x for x in out.splitlines() if x.startswith(label) and f" {mode} " in x)
            fields = line.split()
            i = fields.index(mode)  # then: ours ms, diffusers ms, ratio, GF/s, util, GF/s, util
            assert float(fields[i + 1]) > 0 and float(fields[i + 3]) > 0
            assert fields[i + 5].endswith("%") and fields[i + 7].endswith("%")
        assert any(x.startswith("ours fp32") and "vs diffusers default" in x and f" {mode} " in x
                   for x in out.splitlines())  # fmt: skip


def test_bad_setting_is_one_line() -> None:
    proc = run("bench/autoencoder.py", "--settings", "fp33")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: setting 'fp33'")
