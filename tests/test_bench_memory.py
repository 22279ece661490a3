"""bench/memory.py's CPU-cheap parts: the step time read from train.py's progress lines and the
photo shard it trains on (the runs themselves are the benchmark, not a test)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", ROOT / "bench" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_memory"] = module
    spec.loader.exec_module(module)
    return module


def test_step_seconds_is_the_clock_s_rise_after_the_first_step() -> None:
    out = (
        "noise\n"
        "step 1/3  loss 845  0.02 it/s  elapsed 0:00:50  ETA 0:01:40\n"
        "step 2/3  loss 801  0.03 it/s  elapsed 0:01:05  ETA 0:00:30\n"
        "step 3/3  loss 790  0.04 it/s  elapsed 1:00:07  ETA 0:00:00\n"
    )
    assert _bench().step_seconds(out) == 3600 + 7 - 65
    assert _bench().step_seconds("\n".join(out.splitlines()[:3])) == 65 - 50
    assert math.isnan(_bench().step_seconds(out.splitlines()[1]))


def test_photo_shard_holds_real_photos_at_the_size(tmp_path: Path) -> None:
    pytest.importorskip("skimage")
    from ldm.data.reader import ShardDataset

    shard = tmp_path / "photos.tar"
    _bench().write_photo_shard(shard, 48, count=4)
    batches = list(ShardDataset(str(shard), batch_size=4, image_size=48, shuffle_buffer=0))
    assert len(batches) == 1 and tuple(batches[0]["image"].shape) == (4, 3, 48, 48)
    assert all(float(x.std()) > 0.05 for x in batches[0]["image"])  # photos, not blank frames
