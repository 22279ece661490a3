"""The autoencoder Lightning system: fast_dev_run, checkpoints written by train.py, scale factor."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from ldm import build
from ldm.checkpoint.format import load_checkpoint
from ldm.config import load
from ldm.training.scale_factor import measure_scale_factor, set_scale_factor

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "autoencoder" / "kl-tiny.yaml"


def overrides(shapes_data: dict[str, str], tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"data.train_shards={shapes_data['train']}",
        f"data.val_shards={shapes_data['val']}",
        "data.image_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "logging.logger=csv",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run.root={tmp_path}",
        *extra,
    ]


def test_fast_dev_run(shapes_data: dict[str, str], tmp_path: Path) -> None:
    cfg = load(
        [TINY],
        overrides(shapes_data, tmp_path, "trainer.fast_dev_run=2", "model.loss.disc_start=1"),
    )
    module = build.build_module(cfg)
    trainer = build.build_trainer(cfg, build.prepare_run_dir(cfg))
    trainer.fit(module, datamodule=build.build_datamodule(cfg))
    assert trainer.global_step == 2  # one optimizer step per batch, GAN included
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_train_py_writes_checkpoints_with_config(
    shapes_data: dict[str, str], tmp_path: Path
) -> None:
    import train

    args = [
        "-c",
        str(TINY),
        *overrides(
            shapes_data,
            tmp_path,
            "trainer.max_steps=4",
            "trainer.ckpt_every_n_steps=2",
            "trainer.keep_last_k=1",
            "run.name=ae",
            "logging.image_every_n_steps=2",
            "trainer.limit_val_batches=1",
        ),
    ]
    assert train.main(args) == 0
    run = tmp_path / "ae"
    assert (run / "config.yaml").read_text().startswith("task: autoencoder")
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.safetensors", "resume.ckpt", "step-00000004.safetensors"]
    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors", expect_kind="autoencoder")
    assert ckpt.config["data"]["batch_size"] == 4 and ckpt.metadata["step"] == "4"
    assert list((run / "images").glob("*.png"))
    model = build.load_autoencoder(run / "checkpoints" / "last.safetensors")
    assert float(model.scale_factor) == 1.0

    cfg = load([TINY], overrides(shapes_data, tmp_path))
    dm = build.build_datamodule(cfg)
    dm.setup("fit")
    value = measure_scale_factor(
        model,
        dm.train_dataloader(),
        num_batches=3,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    assert 0 < value < 100
    set_scale_factor(run / "checkpoints" / "last.safetensors", value)
    reloaded = build.load_autoencoder(run / "checkpoints" / "last.safetensors")
    assert float(reloaded.scale_factor) == pytest.approx(value)


def test_measure_scale_factor_gives_unit_variance() -> None:
    class Fake(torch.nn.Module):
        def encode(self, x: torch.Tensor):  # noqa: ANN202
            class P:
                def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
                    return 3.0 * x

            return P()

    pl.seed_everything(0)
    batches = [torch.randn(8, 4, 8, 8) for _ in range(4)]
    value = measure_scale_factor(Fake(), batches, num_batches=4, progress=False)
    z = torch.cat([3.0 * b for b in batches]) * value
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
