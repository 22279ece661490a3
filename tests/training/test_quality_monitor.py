"""Quality metrics during training, through train.py with the default (wandb, offline) logger:
FID, KID, CLIP score and shapes adherence are computed at the configured steps and shown; bad
settings stop before training with one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.eval.test_quality_metrics import random_inception, tiny_clip

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"


def _base(shapes_data: dict[str, str], tmp_path: Path) -> list[str]:
    return [
        "-c",
        str(TINY_LDM),
        f"data.train_shards={shapes_data['train']}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.enable_progress_bar=false",
        "logging.image_every_n_steps=0",
        f"run.root={tmp_path / 'runs'}",
        "trainer.limit_val_batches=0",
    ]


def test_metrics_logged_at_the_interval(
    shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train
    from ldm.eval import stats

    inception = random_inception(tmp_path / "inception.pth")
    assert (
        stats.main(
            [
                "--shards",
                shapes_data["val"],
                "--inception",
                str(inception),
                "--out",
                str(tmp_path / "ref.npz"),
                "--size",
                "32",
            ]
        )
        == 0
    )
    metadata = Path(shapes_data["val"]).parent.parent / "metadata.json"
    assert metadata.is_file()
    overrides = [
        "quality.every_n_steps=2",
        "quality.n=3",
        "quality.batch_size=2",
        "quality.steps=2",
        "quality.prompts=[a red circle,a small blue square at the top left]",
        f"quality.ref={tmp_path / 'ref.npz'}",
        f"quality.inception={inception}",
        f"quality.clip={tiny_clip(tmp_path / 'clip')}",
        f"quality.shapes_metadata={metadata}",
        "quality.kid_subset_size=3",
    ]
    assert train.main([*_base(shapes_data, tmp_path), *overrides]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("quality at step 2:"))
    for name in ("fid", "kid", "clip_score", "adherence", "seconds"):
        assert re.search(rf"\b{name} [-0-9.e+]+", line), (name, line)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quality.every_n_steps=1", "quality.clip=x"], "there are no prompts"),
        (["quality.every_n_steps=1", "quality.prompts=[a]"], "nothing is measured"),
        (
            [
                "quality.every_n_steps=1",
                "quality.prompts=[a]",
                "quality.ref=none.npz",
                "quality.inception=x.pth",
            ],
            "reference statistics not found",
        ),
    ],
)
def test_bad_settings_are_one_line(
    shapes_data: dict[str, str],
    tmp_path: Path,
    overrides: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import train

    assert train.main([*_base(shapes_data, tmp_path), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]
    assert not (tmp_path / "runs").exists()  # refused before anything was written
