"""Config loading: merge order, strict keys with suggestions, types, choices, every YAML loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ldm.config import ConfigError, closest_keys, load, markdown_reference

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_merge_order_files_then_overrides(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "optim:\n  lr: 1.0e-3\n  warmup_steps: 5\n")
    b = write(tmp_path, "b.yaml", "optim:\n  lr: 2.0e-3\n")
    cfg = load([a, b], ["optim.warmup_steps=7"])
    assert cfg.optim.lr == pytest.approx(2e-3)
    assert cfg.optim.warmup_steps == 7
    assert cfg.data.batch_size == 8  # schema default


def test_unknown_key_in_file_names_key_and_closest(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "optim:\n  lrr: 1.0e-3\n")
    with pytest.raises(ConfigError) as e:
        load([a])
    msg = str(e.value)
    assert "optim.lrr" in msg and "optim.lr" in msg and str(a) in msg
    assert "\n" not in msg


def test_unknown_override_and_section() -> None:
    with pytest.raises(ConfigError, match=r"'trainer.max_step'.*trainer.max_steps"):
        load([], ["trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"'optm'.*optim"):
        load([], ["optm.lr=3"])


def test_wrong_type_names_key_value_and_type(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "data:\n  batch_size: abc\n")
    with pytest.raises(ConfigError) as e:
        load([a])
    msg = str(e.value)
    assert "data.batch_size" in msg and "'abc'" in msg and "int" in msg


def test_choices_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"sampling.sampler.*valid choices.*ddim"):
        load([], ["sampling.sampler=dimm"])


def test_missing_file_and_bad_override() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load(["/nonexistent/cfg.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load([], ["optim.lr"])


def test_wandb_agent_style_overrides() -> None:
    assert load([], ["--optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)


def test_closest_keys() -> None:
    assert closest_keys("model.unet.num_head")[0] == "model.unet.num_heads"


def test_every_yaml_in_configs_loads() -> None:
    """Run configs load through the schema; shapes-generator and eval configs through theirs."""
    from ldm.data.shapes import load_config
    from ldm.eval.quality import parse_args

    files = sorted((ROOT / "configs").rglob("*.yaml"))
    files = [f for f in files if "sweeps" not in f.parts]
    assert files, "no configs found"
    for f in files:
        if f.stem == "shapes":
            load_config(str(f))
        elif "eval" in f.parts:
            parse_args(["--config", str(f)])
        else:
            load([f])


def test_print_config_cli() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--print-config", "optim.lr=0.5"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "lr: 0.5" in out and "task: autoencoder" in out


def test_cli_config_error_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--print-config", "optim.lrr=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "optim.lr" in proc.stderr


def test_readme_config_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
    assert begin in readme and end in readme, "README lacks the config reference markers"
    current = readme.split(begin)[1].split(end)[0].strip()
    assert current == markdown_reference().strip(), (
        "README config reference is stale: run `python -m ldm.config --update-readme`"
    )


def test_config_reference_rows_have_four_columns() -> None:
    """A bare ``|`` in a type (``str | None``), default or help text would split a row."""
    import re

    rows = markdown_reference().strip().splitlines()
    bad = [r for r in rows if len(re.findall(r"(?<!\\)\|", r)) != 5]
    assert not bad, f"rows with a stray column separator: {bad[:3]}"
    assert any(" or None |" in r for r in rows)


def test_every_run_config_builds_its_models() -> None:
    """Models, schedule, loss and sampler of every run config build (on the meta device, so
    the SD-size ones cost no memory); text encoders need their weights and are built elsewhere."""
    import torch

    from ldm import build

    for f in sorted((ROOT / "configs").rglob("*.yaml")):
        if "sweeps" in f.parts or "eval" in f.parts or f.stem == "shapes":
            continue
        cfg = load([f])
        with torch.device("meta"):
            build.build_autoencoder(cfg.model.autoencoder)
            build.build_autoencoder_loss(cfg.model.loss)
            build.build_unet(cfg.model.unet)
        build.build_schedule(cfg.model.diffusion)
        build.build_diffusion_loss(cfg.model.diffusion)
        build.build_sampler(cfg.sampling)
