"""A stop signal to the whole process group of a real ``train.py`` run (SLURM, ``timeout``,
Kubernetes, Ctrl+C), landing on an epoch's last batch or inside one: the run saves, exits 0,
and ``--resume`` continues with exactly the batches and losses of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.faultkit import needs_minilm, read_record, run_recorded, tiny_ldm_args

# Six batches per epoch; checkpoints only at the end, so the signal alone decides what is saved.
LIMITS = ("trainer.max_steps=12", "trainer.ckpt_every_n_steps=100")


@pytest.fixture(scope="module")
def straight(six_batch_shard: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("straight-ldm")
    proc = run_recorded([*tiny_ldm_args(six_batch_shard, root, *LIMITS), "run.name=s"],
                        root / "record.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_record(root / "record.jsonl")


@needs_minilm
@pytest.mark.parametrize("signum,at", [("SIGTERM", 5), ("SIGINT", 5), ("SIGTERM", 3)],
                         ids=["sigterm-last-batch", "sigint-last-batch", "sigterm-mid-epoch"])
def test_group_signal_then_resume_replays_the_uninterrupted_run(
        signum: str, at: int, six_batch_shard: str, straight: list[dict],
        tmp_path: Path) -> None:
    """``at`` is the global step when the signal comes, i.e. during batch ``at + 1`` (batch 6
    is epoch 0's last)."""
    args = [*tiny_ldm_args(six_batch_shard, tmp_path, *LIMITS), "run.name=k"]
    record = tmp_path / "record.jsonl"
    proc = run_recorded(args, record, signal_at=at, signum=signum)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{signum}: saved a resumable checkpoint at step {at + 1}" in proc.stdout
    assert [r["step"] for r in read_record(record)] == list(range(1, at + 2))
    proc = run_recorded(["--resume", str(tmp_path / "k")], record)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = read_record(record)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["keys"] for r in resumed] == [r["keys"] for r in straight]  # same data order
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight],
                                                         rel=1e-6, abs=0)
