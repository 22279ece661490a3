"""A stop signal to the whole process group of a real ``train.py`` run (SLURM, ``timeout``,
Kubernetes, Ctrl+C), landing on an epoch's last batch or inside one: the run saves, exits 0,
and ``--resume`` continues with exactly the batches and losses of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.faultkit import (
    ROOT,
    needs_minilm,
    read_record,
    run_recorded,
    tiny_ae_args,
    tiny_ldm_args,
)
from tests.faults.test_bad_input import assert_one_line_exit_2

# Six batches per epoch; checkpoints only at the end, so the signal alone decides what is saved.
LIMITS = ("trainer.max_steps=12", "trainer.ckpt_every_n_steps=100")


@pytest.fixture(scope="module")
def straight(six_batch_shard: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("straight-ldm")
    proc = run_recorded(
        [*tiny_ldm_args(six_batch_shard, root, *LIMITS), "run.name=s"], root / "record.jsonl"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_record(root / "record.jsonl")


@needs_minilm
@pytest.mark.parametrize(
    "signum,at",
    [("SIGTERM", 5), ("SIGINT", 5), ("SIGTERM", 3)],
    ids=["sigterm-last-batch", "sigint-last-batch", "sigterm-mid-epoch"],
)
def test_group_signal_then_resume_replays_the_uninterrupted_run(
    signum: str, at: int, six_batch_shard: str, straight: list[dict], tmp_path: Path
) -> None:
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
    assert [r["loss"] for r in resumed] == pytest.approx(
        [r["loss"] for r in straight], rel=1e-6, abs=0
    )


def _hanging(shard: str, folder: Path) -> str:
    """A ``pipe:`` shard that sends half the tar, then stops writing and never exits, ignoring
    SIGTERM and SIGINT (a reader no signal unblocks); ``folder/stalled`` appears once it stalls."""
    shard = shard.replace("{000000..000000}", "000000")  # the one shard's path
    half = Path(shard).stat().st_size // 2
    script = folder / "hang.sh"
    script.write_text(
        f"trap '' TERM INT\nhead -c {half} {shard}\ntouch {folder / 'stalled'}\nexec sleep 1000\n"
    )
    return f"pipe:sh {script}"


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@needs_minilm
@pytest.mark.parametrize("workers", [0, 2])
def test_group_sigterm_while_a_pipe_reader_hangs_saves_and_exits(
    workers: int, six_batch_shard: str, tmp_path: Path
) -> None:
    args = [
        *tiny_ldm_args(
            _hanging(six_batch_shard, tmp_path),
            tmp_path,
            "trainer.max_steps=12",
            "trainer.ckpt_every_n_steps=100",
        ),
        f"data.num_workers={workers}",
        "data.shuffle_buffer=0",
        "run.name=h",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own process group, as under SLURM
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "stalled").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # the run now waits for bytes that never come
        os.killpg(proc.pid, signal.SIGTERM)  # kill -TERM -- -PGID, as SLURM and timeout do
        start = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - start
    finally:
        time.sleep(1)
        gone = _group_gone(proc.pid)
        if not gone:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    saved = [line for line in out.splitlines() if "saved a resumable checkpoint" in line]
    assert len(saved) == 1 and saved[0].startswith("SIGTERM"), out[-3000:]
    assert (tmp_path / "h" / "checkpoints" / "resume.ckpt").is_file()
    assert took < 30, took
    assert gone, "the hanging reader outlived the run"


def test_stalled_pipe_reader_is_killed_in_one_line(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    shard = _hanging(six_batch_shard, tmp_path)
    start = time.monotonic()
    rc = train.main(
        tiny_ae_args(
            shard,
            tmp_path,
            "data.read_timeout_s=1",
            "data.shuffle_buffer=0",
            "trainer.max_steps=50",
        )
    )
    assert time.monotonic() - start < 60
    assert_one_line_exit_2(
        rc,
        capsys.readouterr().err,
        "gave no bytes for 1 s",
        "data.read_timeout_s",
        shard,
        only=False,
    )
    assert not subprocess.run(["pgrep", "-f", shard[5:]], capture_output=True).stdout  # killed
