"""bench/objectives.py without training: each objective's overrides load as a valid demo config
(the builders give the intended schedule and loss), the table reads the adherence rows, and bad
input is one line with exit code 2. (`python bench/objectives.py --quick` runs it end to end.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ldm import build
from ldm.config import load

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_objectives", ROOT / "bench" / "objectives.py")
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.mark.parametrize("name", list(bench.OBJECTIVES))
def test_each_objective_is_a_valid_demo_config(name: str) -> None:
    from ldm.diffusion import Sampler
    from ldm.diffusion.flow import is_flow

    overrides, sampler = bench.OBJECTIVES[name]
    cfg = load([ROOT / "configs" / "demo" / "ldm.yaml"], overrides)
    schedule = build.build_schedule(cfg.model.diffusion)
    assert is_flow(schedule) == (name == "flow")
    if name == "v+zsnr":
        assert float(schedule.alphas_cumprod[-1]) == 0.0 and cfg.model.diffusion.prediction == "v"
    if name == "eps":
        assert cfg.model.diffusion.prediction == "eps"
    for steps in (4, 32):  # the evaluation's sampler builds and has a grid for this model
        s = build.build_sampler(cfg.sampling, steps=steps, **sampler)
        assert isinstance(s, Sampler) and len(s.grid(schedule).sigmas) == steps + 1


def test_table_and_bad_objective(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        {"group": g, "all": a}
        for g, a in (("seen", 1.0), ("held-out", 0.5), ("paraphrase", 0.25), ("all", 0.6))
    ]
    text = bench.table({"adherence": {"flow": {"4": rows}}})
    assert "| flow | euler | 4 | 1.00 | 0.50 | 0.25 | 0.60 |" in text
    assert bench.main(["--out", str(tmp_path), "--objectives", "x0"]) == 2
    assert "unknown objective 'x0'" in capsys.readouterr().err
    assert bench.final_train_loss(tmp_path) is None
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.csv").write_text("step,train/loss\n0,2.0\n1,\n2,1.0\n")
    assert bench.final_train_loss(tmp_path, tail=2) == 1.5
