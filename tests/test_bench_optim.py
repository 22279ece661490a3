"""bench/optim.py: AdamW's step, ours (fused) against the peers' default construction, runs and
reports each kernel it measured."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_optim", ROOT / "bench" / "optim.py")
optim = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(optim)


def test_bench_prints_every_kernel_and_the_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    impls = "auto,default,foreach,for-loop"
    assert optim.main(["--size", "tiny", "--impls", impls, "--iters", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {"auto", "default", "foreach", "for-loop"}
    assert rows["auto"][1] == "(fused)" and rows["default"][1] == "(for-loop)"  # on the CPU
    assert float(rows["default"][-1]) == 1.0 and float(rows["auto"][-1]) > 0
    assert "vs default" in out.splitlines()[1]


def test_shared_state_is_one_set_of_moments() -> None:
    import torch

    numel, labels, times = optim.measure("tiny", torch.device("cpu"), "bf16", ["auto"], 0, 1)
    assert numel > 0 and labels == ["auto (fused)"] and len(times[0]) == 1
