"""Sweeps: local grid expansion and wandb sweep specs whose parameters are our config keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm.config import all_keys
from ldm.training.sweep import grid, run_name, split_values, summary_table

ROOT = Path(__file__).resolve().parents[2]


def test_split_values_keeps_brackets_and_quotes() -> None:
    assert split_values("1e-4,2e-4") == ["1e-4", "2e-4"]
    assert split_values("[1,2],[3]") == ["[1,2]", "[3]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


def test_grid_is_cartesian_product() -> None:
    runs = grid(["optim.lr=1e-4,2e-4", "data.batch_size=8,16,32"])
    assert len(runs) == 6
    assert runs[0] == ["optim.lr=1e-4", "data.batch_size=8"]
    assert runs[-1] == ["optim.lr=2e-4", "data.batch_size=32"]
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        grid(["optim.lr"])
    assert run_name("exp", 3, runs[0]) == "exp-03-lr=1e-4_batch_size=8"


def test_summary_table() -> None:
    table = summary_table(
        [
            {"name": "a", "overrides": ["x=1"], "status": "ok", "metrics": {"val/loss": 0.5}},
            {"name": "b", "overrides": ["x=2"], "status": "failed", "metrics": {}},
        ]
    )
    assert "| a | x=1 | ok | 0.5 |" in table and "| b | x=2 | failed |  |" in table


def test_summary_table_leads_with_losses_and_drops_zero_skip_counters() -> None:
    metrics = {
        "data/skipped_corrupt": 0.0,
        "data/skipped_total": 0.0,
        "data/skipped_x": 2.0,
        "perf/step_time_s": 0.1,
        "train/loss": 0.25,
        "val/loss": 0.5,
    }
    header = summary_table(
        [{"name": "a", "overrides": [], "status": "ok", "metrics": metrics}]
    ).splitlines()[0]
    assert header == (
        "| run | overrides | status | val/loss | train/loss | data/skipped_x | perf/step_time_s |"
    )


def test_wandb_sweep_specs_use_config_keys() -> None:
    specs = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
    assert specs
    keys = set(all_keys())
    for spec_path in specs:
        spec = yaml.safe_load(spec_path.read_text())
        assert spec["program"] == "train.py"
        assert "${args}" in spec["command"]
        for key in spec["parameters"]:
            assert key in keys, f"{spec_path.name}: '{key}' is not a config key"
        config_files = [spec["command"][i + 1] for i, a in enumerate(spec["command"]) if a == "-c"]
        # The agent passes --key=value: train.py must accept exactly that style.
        agent_args = [f"--{k}={v['values'][0]}" for k, v in spec["parameters"].items()]
        cmd = [sys.executable, str(ROOT / "train.py"), "--print-config"]
        for f in config_files:
            cmd += ["-c", str(ROOT / f)]
        subprocess.run([*cmd, *agent_args], check=True, capture_output=True)
