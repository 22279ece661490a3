"""Run directories: reused ones are refused, moved ones resume in place, interrupted saves leave
nothing behind, and a diverging run stops in one line without replacing its good weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint
from tests.faults.faultkit import tiny_ae_args
from tests.faults.test_bad_input import assert_one_line_exit_2


def _step(run: Path) -> str:
    return load_checkpoint(run / "checkpoints" / "last.safetensors").metadata["step"]


def test_reused_run_directory_is_refused(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    assert train.main(tiny_ae_args(six_batch_shard, tmp_path, "run.name=a")) == 0
    run = tmp_path / "a"
    before = {p: p.read_bytes() for p in [run / "config.yaml", *run.glob("checkpoints/*")]}
    capsys.readouterr()
    rc = train.main(
        tiny_ae_args(
            six_batch_shard,
            tmp_path,
            "run.name=a",
            "optim.lr=1e-3",
            "trainer.ckpt_every_n_steps=1",
            "trainer.keep_last_k=1",
        )
    )
    assert_one_line_exit_2(rc, capsys.readouterr().err, "already holds a run", "--resume")
    assert {p: p.read_bytes() for p in before} == before  # config, resume state, checkpoints


def test_moved_run_resumes_where_it_now_is(
    six_batch_shard: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started with a relative run.root from one directory, moved, resumed from another cwd."""
    import train

    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    assert train.main(tiny_ae_args(six_batch_shard, "runs", "run.name=r")) == 0
    moved = tmp_path / "elsewhere" / "r"
    moved.parent.mkdir()
    shutil.move(start / "runs" / "r", moved)
    ckpts = moved / "checkpoints"
    # What a process killed mid-save leaves: removed when the run starts again.
    (ckpts / ".step-00000004.safetensors.k2j4.tmp").write_bytes(b"partial")
    (ckpts / ".resume.ckpt.tmp").write_bytes(b"partial")
    monkeypatch.chdir(tmp_path)
    assert train.main(["--resume", str(moved), "trainer.max_steps=4"]) == 0
    assert _step(moved) == "4"
    assert not (start / "runs" / "r").exists()
    assert not list(ckpts.glob(".*.tmp"))


def test_diverging_autoencoder_stops_in_one_line(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An absurd learning rate: the non-finite guard skips, then stops with the advice; every
    checkpoint written holds finite weights only."""
    import train

    rc = train.main(
        tiny_ae_args(
            six_batch_shard,
            tmp_path,
            "run.name=nan",
            "optim.lr=1e12",
            "trainer.max_steps=60",
            "trainer.ckpt_every_n_steps=1",
            "trainer.max_epochs=100",
        )
    )
    assert_one_line_exit_2(rc, capsys.readouterr().err, "non-finite", "optim.lr", only=False)
    for path in (tmp_path / "nan" / "checkpoints").glob("*.safetensors"):
        for name, tensor in load_checkpoint(path).tensors.items():
            assert torch.isfinite(tensor).all(), f"{path.name}: {name} is not finite"


def test_full_disk_leaves_no_partial_file(six_batch_shard: str, tmp_path: Path) -> None:
    """Files may not grow past 300 kB: the config and logs fit, the checkpoints do not."""
    from tests.faults.faultkit import run_with_file_size_limit

    proc = run_with_file_size_limit(
        tiny_ae_args(six_batch_shard, tmp_path, "run.name=full"), limit=300_000
    )
    assert_one_line_exit_2(proc.returncode, proc.stderr, "disk full", "resume.ckpt", only=False)
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == []  # no partial or temporary file


def test_run_stopped_before_its_first_checkpoint_starts_again(tmp_path: Path) -> None:
    """Only this run's own config, no checkpoint: nothing to lose, the same run may restart;
    another run's config is refused even without checkpoints."""
    from ldm import build
    from ldm.config import load
    from tests.faults.faultkit import TINY_AE

    cfg = load([TINY_AE], [f"run.root={tmp_path}", "run.name=r"])
    path = build.prepare_run_dir(cfg)
    assert build.prepare_run_dir(cfg) == path
    other = load([TINY_AE], [f"run.root={tmp_path}", "run.name=r", "optim.lr=1e-3"])
    with pytest.raises(build.RunDirError, match="already holds a run"):
        build.prepare_run_dir(other)


def test_nan_stop_saves_the_finite_weights(
    six_batch_shard: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Losses turn NaN from step 3 on (the weights stay finite: those steps are skipped): the
    stop is one line, and a checkpoint of step 3 is saved for --resume with new settings."""
    import train
    from ldm.models.autoencoder_loss import AutoencoderLoss

    original = AutoencoderLoss.generator_loss

    def nan_from_step_3(self, x, reconstruction, posterior, step, last_layer):  # noqa: ANN001
        loss, log = original(self, x, reconstruction, posterior, step, last_layer)
        return (loss * float("nan") if step >= 3 else loss), log

    monkeypatch.setattr(AutoencoderLoss, "generator_loss", nan_from_step_3)
    rc = train.main(
        tiny_ae_args(
            six_batch_shard,
            tmp_path,
            "run.name=n",
            "trainer.max_steps=50",
            "trainer.ckpt_every_n_steps=100",
            "trainer.max_epochs=100",
        )
    )
    assert_one_line_exit_2(
        rc, capsys.readouterr().err, "20 consecutive non-finite", "optim.lr", only=False
    )
    ckpts = tmp_path / "n" / "checkpoints"
    assert _step(tmp_path / "n") == "3"
    assert (ckpts / "resume.ckpt").is_file()
