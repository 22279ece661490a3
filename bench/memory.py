r"""Peak memory and step time of ``train.py`` per image size and batch size, measured on this CPU.

Each point is one real ``train.py`` run (``trainer.max_steps`` steps, no DataLoader workers, csv
logger) on shards of scikit-image's sample photos at that size; the peak is the run's maximum
resident set size (``ru_maxrss`` from ``os.wait4``), the step time is taken from the run's
progress lines after the first step (the clock's 1 s resolution spread over the steps; ``--steps``
≥ 2, more for finer figures). The table ends with a least-squares line
``peak ≈ base + per_image × batch`` per size, which is how the README extrapolates to batch
sizes that do not fit here.

The default is the case issue 13 reported, Stable Diffusion's f=8 autoencoder
(``configs/autoencoder/kl-f8.yaml``) with its PatchGAN on from the first step
(``model.loss.disc_start=0``: the later, larger phase of a run), float32:

    .venv/bin/python bench/memory.py                                # 128 and 256 px, batch 1 and 2
    .venv/bin/python bench/memory.py --sizes 64 --batches 1 2 4 \
        -c configs/autoencoder/kl-f4-demo.yaml
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def write_photo_shard(path: Path, size: int, count: int = 16, seed: int = 0) -> None:
    """``count`` random square crops of scikit-image's photos, resized to ``size``, as one shard."""
    import io

    import skimage.data
    from PIL import Image

    from ldm.data.shard_writer import write_shard

    rng = np.random.default_rng(seed)

    def samples():
        for i in range(count):
            photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
            if photo.ndim == 2:
                photo = np.stack([photo] * 3, axis=-1)
            h, w = photo.shape[:2]
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = Image.fromarray(photo[y : y + side, x : x + side, :3]).resize((size, size))
            buf = io.BytesIO()
            crop.save(buf, format="JPEG", quality=90)
            yield {"__key__": f"{i:06d}", "jpg": buf.getvalue(), "txt": PHOTOS[i % len(PHOTOS)]}

    write_shard(str(path), samples())


def run_point(config: str, shard: Path, size: int, batch: int, steps: int, extra: list[str]):
    """One ``train.py`` run; returns (peak RSS in GiB, seconds per step, wall seconds)."""
    with tempfile.TemporaryDirectory() as root:
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            "-c",
            config,
            f"run.root={root}",
            f"data.train_shards={shard}",
            f"data.image_size={size}",
            f"data.batch_size={batch}",
            "data.num_workers=0",
            f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1",
            "logging.logger=csv",
            "logging.image_every_n_steps=0",
            *extra,
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        out = proc.stdout.read()  # to the end, then reap the run ourselves for its rusage
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"train.py failed at {size} px, batch {batch}:\n{out[-2000:]}")
    return usage.ru_maxrss / 2**20, step_seconds(out), wall  # ru_maxrss: KiB on Linux


def step_seconds(output: str) -> float:
    """Seconds per step from train.py's progress lines (``step 2/2  loss ..  elapsed 0:01:05
    ETA ..``): the elapsed clock's rise from the second line to the last over the steps between
    (the first step, which warms up, left out when there are three or more lines; the clock's
    1 s resolution divided by their number); NaN with fewer than two lines."""
    clocks = [
        sum(int(part) * 60**i for i, part in enumerate(reversed(hms.split(":"))))
        for hms in re.findall(r"^step \d+/\d+  loss .*elapsed (\d+:\d\d:\d\d)", output, re.M)
    ]
    if len(clocks) < 2:
        return float("nan")
    first = 1 if len(clocks) >= 3 else 0
    return (clocks[-1] - clocks[first]) / (len(clocks) - 1 - first)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", "--config", default=str(ROOT / "configs/autoencoder/kl-f8.yaml"))
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=2, help="training steps per point (>= 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument(
        "overrides", nargs="*", default=["model.loss.disc_start=0"], help="extra key=value"
    )
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            shard = Path(tmp) / f"photos-{size}.tar"
            write_photo_shard(shard, size, count=max(args.batches) * (args.steps + 1))
            for batch in args.batches:
                peak, per_step, wall = run_point(
                    args.config, shard, size, batch, args.steps, list(args.overrides)
                )
                rows.append((size, batch, peak, per_step, wall))
                print(
                    f"{size} px  batch {batch}: peak {peak:.2f} GiB  {per_step:.1f} s/step  "
                    f"(run {wall:.0f} s)",
                    flush=True,
                )
    print(f"\n{Path(args.config).name} {' '.join(args.overrides)}, float32, CPU")
    print("| image size | batch | peak RSS (GiB) | s / step |")
    print("| --- | --- | --- | --- |")
    for size, batch, peak, per_step, _ in rows:
        print(f"| {size} px | {batch} | {peak:.2f} | {per_step:.1f} |")
    for size in args.sizes:
        pts = [(b, m) for s, b, m, _, _ in rows if s == size]
        if len(pts) >= 2:
            slope, base = np.polyfit([b for b, _ in pts], [m for _, m in pts], 1)
            print(f"{size} px: peak ≈ {base:.2f} GiB + {slope:.2f} GiB × batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
