"""bench/gpu.sh, the script a lent GPU session runs: its CPU dry run, the report table and the
refusal without a CUDA device."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)  # bench/gpu.py, without bench/ on sys.path
_spec.loader.exec_module(gpu)


def test_dry_run_measures_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "report"
    # A compiled, checkpointed U-Net step, a train.py run and the gpu-test call: the parts whose
    # code differs; the other U-Net cases only change two flags.
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "gpu.sh"),
            "--dry-run",
            "--out",
            str(out),
            "--only",
            "peak,unet ours ckpt=on compile=on,optim,train,buckets,gpu tests",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "gpu.jsonl").read_text().splitlines()]
    by_part = {r["part"]: r for r in rows}
    assert set(by_part) == {
        "peak",
        "unet ours ckpt=on compile=on",
        "optim adamw",
        "train ddp",
        "train fsdp",
        "buckets compile",
        "gpu tests",
    }
    assert by_part["peak"]["measured_tflops"] > 0
    unet = by_part["unet ours ckpt=on compile=on"]
    assert unet["status"] == "ok" and unet["checkpointing"] and unet["compile"]
    assert unet["ms_per_step"] > 0 and unet["images_per_s"] > 0
    adamw = by_part["optim adamw"]  # ours fused, the peers' default the loop on a CPU
    assert adamw["status"] == "ok" and adamw["default_kernel"] == "for-loop", adamw
    assert adamw["auto_ms"] > 0 and adamw["default_ms"] > 0 and adamw["ratio_vs_default"] > 0
    ddp = by_part["train ddp"]
    assert ddp["status"] == "ok" and float(ddp["images_per_s"]) > 0
    assert by_part["train fsdp"]["status"].startswith("skipped")
    buckets = by_part["buckets compile"]  # eager backend on the CPU: dynamo's guards only
    assert buckets["status"] == "ok" and buckets["graphs"] == 3, buckets
    assert len(buckets["step_s"]) == len(buckets["graphs_per_step"]) == 7
    assert by_part["gpu tests"]["exit"] in (0, 5)  # all gpu tests skip on a CPU
    report = (out / "gpu.md").read_text()
    assert report.startswith("| part | status | result |") and "| train ddp | ok |" in report


def test_table_reads_mfu_against_both_peaks() -> None:
    rows = [
        {"part": "peak", "status": "ok", "measured_tflops": 800.0, "datasheet_tflops": 989.0},
        {"part": "unet ours", "status": "ok", "tflops": 400.0},
        {"part": "train fsdp", "status": "timed out after 240 s"},
    ]
    report = gpu.table(rows)
    assert "mfu_measured=50.0%" in report and "mfu_datasheet=40.4%" in report
    assert "| train fsdp | timed out after 240 s |" in report


def test_plan_covers_every_case_within_limits() -> None:
    names = [name for name, _, _ in gpu.plan()]
    assert sum(n.startswith("unet ") for n in names) == 8  # 2 models x checkpointing x compile
    assert {"optim adamw", "train ddp", "train fsdp", "buckets compile", "gpu tests"} <= set(names)
    assert sum(limit for _, _, limit in gpu.plan()) < 3600


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_says_to_dry_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert gpu.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dry-run" in err
