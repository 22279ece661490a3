"""Exact passes under real torch.distributed (2 gloo processes) with uneven leftovers: 27
samples over 2 ranks × 2 workers at batch 4 (27 is no multiple of 2 × 4). Every sample is seen
exactly once per epoch (each worker's last partial batch is kept, ``drop_last=False``), a
mid-epoch resume on each rank continues with exactly the batches the uninterrupted epoch had,
and ``drop_last=True`` drops only the partial batches. One pair of processes runs both."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.write_shards import ShardWriter

ROOT = Path(__file__).resolve().parents[2]
SHARD_SIZES = (7, 7, 7, 6)  # 27 samples
RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from ldm.data import ShardDataModule

pattern, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")  # rank and world size from the environment, as torchrun sets
result = {}
for drop_last in (False, True):
    dm = ShardDataModule(train_shards=[pattern], batch_size=4, num_workers=2, image_size=16,
                         shuffle_buffer=4, seed=7, drop_last=drop_last)
    full = [batch["key"] for batch in dm.train_dataloader()]  # epoch 0, rank from dist
    resumed_loader = dm.train_dataloader()
    resumed_loader.position_fn = lambda: (0, 0, 1)  # resumed in epoch 0 after 1 batch
    resumed = [batch["key"] for batch in resumed_loader]
    per_rank = [None, None]
    dist.all_gather_object(per_rank, {"full": full, "resumed": resumed})
    result[f"drop_last={drop_last}"] = per_rank
if dist.get_rank() == 0:
    open(out, "w").write(json.dumps(result))
dist.destroy_process_group()
"""


def write_shards(root: Path) -> str:
    rng = np.random.default_rng(0)
    with ShardWriter(str(root / "train-%06d.tar"), max_samples=SHARD_SIZES[0]) as writer:
        for i in range(sum(SHARD_SIZES)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "PNG")
            writer.write({"__key__": f"s{i:03d}", "png": buffer.getvalue(), "txt": f"sample {i}"})
    return str(root / f"train-{{000000..{len(SHARD_SIZES) - 1:06d}}}.tar")


def run_two_ranks(tmp_path: Path, pattern: str) -> dict[str, list[dict]]:
    """Both ranks' batches (keys) of epoch 0 and of a resume after one batch, per drop_last."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script, out = tmp_path / "rank.py", tmp_path / "keys.json"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, str(script), pattern, str(out)],
                         env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]  # fmt: skip
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errors)
    return json.loads(out.read_text())


def test_two_gloo_ranks_exact_pass_uneven_leftovers_and_resume(tmp_path: Path) -> None:
    runs = run_two_ranks(tmp_path, write_shards(tmp_path))
    ranks = runs["drop_last=False"]
    keys = [k for r in ranks for batch in r["full"] for k in batch]
    assert sorted(keys) == [f"s{i:03d}" for i in range(27)]  # each exactly once
    # each worker reads one shard (7, 7, 7 or 6 samples): batches of 4, then its leftover
    assert sorted(len(batch) for r in ranks for batch in r["full"]) == [2, 3, 3, 3, 4, 4, 4, 4]
    for r in ranks:
        assert len(r["full"]) == 4 and r["resumed"] == r["full"][1:]  # the same epoch's rest

    ranks = runs["drop_last=True"]  # the documented drop rule: only the partial batches go
    batches = [batch for r in ranks for batch in r["full"]]
    assert [len(b) for b in batches] == [4, 4, 4, 4]  # 27 - 11 leftover samples dropped
    assert len({k for b in batches for k in b}) == 16
    for r in ranks:
        assert r["resumed"] == r["full"][1:]
