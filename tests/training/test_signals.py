"""A signal to the whole process group (what ``timeout``, SLURM and Kubernetes send; Ctrl+C too)
of a real ``train.py`` run with DataLoader workers saves a resumable checkpoint and exits 0, and
``--resume`` continues it, into the same wandb run (the default logger, offline)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ldm.checkpoint.format import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TINY_AE = ROOT / "configs" / "autoencoder" / "kl-tiny.yaml"


def _train(args: list[str], home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(home), "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # its own process group, as under SLURM


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_process_group_signal_saves_and_resumes(
    signum: signal.Signals, shapes_data: dict[str, str], tmp_path: Path
) -> None:
    args = [
        "-c",
        str(TINY_AE),
        f"data.train_shards={shapes_data['train']}",
        "data.num_workers=2",
        "data.batch_size=2",
        "data.image_size=32",
        "trainer.accelerator=cpu",
        "trainer.max_steps=5000",
        "trainer.log_every_n_steps=1",
        "trainer.ckpt_every_n_steps=100000",
        "logging.image_every_n_steps=0",
        f"run.root={tmp_path}",
        "run.name=r",
    ]
    proc = _train(args, tmp_path)
    watchdog = threading.Timer(120, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 3/5000"):  # a progress line (stdout is not a terminal)
                os.killpg(proc.pid, signum)  # kill -TERM -- -PGID: main process and workers
                break
        rest = proc.stdout.read()
        code = proc.wait()
    finally:
        watchdog.cancel()
    output = "".join(lines) + rest
    assert code == 0, output[-3000:]
    assert "killed by signal" not in output, output[-3000:]
    saved = [line for line in output.splitlines() if "saved a resumable checkpoint" in line]
    assert len(saved) == 1 and saved[0].startswith(signum.name), output[-3000:]
    ckpts = tmp_path / "r" / "checkpoints"
    step = int(load_checkpoint(ckpts / "last.safetensors").metadata["step"])
    assert 3 <= step < 5000 and (ckpts / "resume.ckpt").is_file()
    if signum != signal.SIGTERM:
        return

    resumed = _train(["--resume", str(tmp_path / "r"), f"trainer.max_steps={step + 2}"], tmp_path)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, out[-3000:]
    assert int(load_checkpoint(ckpts / "last.safetensors").metadata["step"]) == step + 2
    runs = sorted((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    run_id = (tmp_path / "r" / "wandb" / "run-id").read_text().strip()
    assert all(run.name.endswith(f"-{run_id}") for run in runs), (runs, run_id)
