"""The LightningDataModule: loaders, epochs, skip counts, fast_dev_run, data position."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm.data import ShardDataModule
from ldm.data.shard_writer import ShardWriter
from ldm.data.shards import MissingShardError


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Train: 4 shards x 6 JPEGs (one corrupt); val: 1 shard x 4."""
    root = tmp_path_factory.mktemp("dm")
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG")
        return buffer.getvalue()

    with ShardWriter(str(root / "train-%06d.tar"), max_samples=6) as writer:
        for i in range(24):
            data = b"broken" if i == 5 else jpeg()
            writer.write({"__key__": f"t{i:03d}", "jpg": data, "txt": f"train {i}"})
    with ShardWriter(str(root / "val-%06d.tar"), max_samples=6) as writer:
        for i in range(4):
            writer.write({"__key__": f"v{i:03d}", "jpg": jpeg(), "txt": f"val {i}"})
    return str(root / "train-{000000..000003}.tar"), str(root / "val-000000.tar")


def make_dm(shards: tuple[str, str], **kw) -> ShardDataModule:
    args = dict(
        train_shards=[shards[0]],
        val_shards=[shards[1]],
        batch_size=4,
        num_workers=0,
        image_size=16,
        shuffle_buffer=8,
    )
    args.update(kw)
    return ShardDataModule(**args)


class TinyModule(pl.LightningModule):
    """Records what the DataModule feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv2d(3, 1, 1)
        self.train_keys: list[str] = []
        self.epochs: list[int] = []
        self.val_batches = 0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        assert batch["image"].shape[1:] == (3, 16, 16)
        assert isinstance(batch["caption"][0], str)
        self.train_keys.extend(batch["key"])
        self.epochs.append(self.trainer.datamodule.train_dataset.position[0])
        return self.layer(batch["image"]).mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.val_batches += 1

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_missing_shard_fails_at_construction(shards: tuple[str, str]) -> None:
    with pytest.raises(MissingShardError, match=r"train-000004.tar \(4 of 10 local"):
        make_dm(shards, train_shards=[shards[0].replace("000003}", "000009}")])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fast_dev_run(shards: tuple[str, str], num_workers: int) -> None:
    dm = make_dm(shards, num_workers=num_workers)
    model = TinyModule()
    trainer(fast_dev_run=True).fit(model, datamodule=dm)
    assert len(model.train_keys) == 4 and model.val_batches == 1


def test_epochs_follow_the_trainer_and_skips_are_counted(shards: tuple[str, str]) -> None:
    dm = make_dm(shards, val_shards=[], num_workers=2, persistent_workers=True)
    assert dm.val_dataloader() == []
    model = TinyModule()
    trainer(max_epochs=2, num_sanity_val_steps=0).fit(model, datamodule=dm)
    keys = model.train_keys
    assert len(keys) == 2 * 23 and sorted(keys[:23]) == sorted(keys[23:])
    assert keys[:23] != keys[23:]  # epoch 1 is reshuffled (persistent workers too)
    assert sorted(set(model.epochs)) == [0, 1]
    counts = dm.skipped_counts()
    assert counts["corrupt_image"] == 2 and counts["ok"] == 46
    assert dm.skipped_counts("val") == {}


def test_epochs_without_trainer_and_state_dict(shards: tuple[str, str]) -> None:
    dm = make_dm(shards, val_shards=[], num_workers=0)
    loader = dm.train_dataloader()
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    assert sorted(first) == sorted(second) and first != second
    state = dm.state_dict()
    assert state == {"epoch": 2, "seed": 0}
    resumed = make_dm(shards, val_shards=[], num_workers=0)
    resumed.load_state_dict({"epoch": 1, "seed": 0})
    assert [k for b in resumed.train_dataloader() for k in b["key"]] == second


def test_resampled_length_and_val_settings(shards: tuple[str, str]) -> None:
    dm = make_dm(shards, resampled=True, epoch_samples=10, random_crop=True, hflip=True)
    assert len(dm.train_dataloader()) == 3  # 4 + 4 + 2 samples
    assert sum(len(b["key"]) for b in dm.train_dataloader()) == 10
    val = dm.val_dataloader()
    assert not val.dataset.resampled and not val.dataset.spec.random_crop
    assert [k for b in val for k in b["key"]] == [f"v{i:03d}" for i in range(4)]
    with pytest.raises(RuntimeError, match="cached=True"):
        dm.empty_prompt()


def test_warns_on_uneven_split(shards: tuple[str, str], caplog: pytest.LogCaptureFixture) -> None:
    dm = make_dm(shards, rank=0, world_size=3, num_workers=2)
    with caplog.at_level("WARNING", logger="ldm.data"):
        dm.train_dataloader()
    text = caplog.text
    assert "do not split evenly over 3 ranks" in text and "some workers will be idle" in text


def test_import_rules() -> None:
    """Only datamodule.py imports Lightning; nothing under ldm/data imports ldm.models."""
    root = Path(__file__).resolve().parents[2] / "ldm" / "data"
    for path in sorted(root.glob("*.py")):
        names = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
        lightning = [n for n in names if n.split(".")[0] in ("pytorch_lightning", "lightning")]
        assert not lightning or path.name == "datamodule.py", path
        assert not [n for n in names if n.startswith("ldm.models")], path
