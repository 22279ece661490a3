"""``make demo``: train a prompt-following text-to-image model from nothing on a CPU, measured.

Every stage runs the real pipeline (the same CLIs a user runs) on ``configs/demo/``:

1. generate the captioned shapes dataset as webdataset shards (``ldm.data.shapes``);
2. train a small KL autoencoder (``train.py -c configs/demo/autoencoder.yaml``);
3. measure its latent ``scale_factor`` (``ldm.training.scale_factor``);
4. cache latents and MiniLM text embeddings (``ldm.cache``);
5. train the text-conditioned U-Net (``train.py -c configs/demo/ldm.yaml``);
6. sample a grid for seen, held-out and paraphrased prompts (``sample.py``);
7. score prompt adherence with the deterministic shapes analyser at guidance 1 and at the
   configured guidance, and print a report with the wall time of each stage.

A finished stage is reused on the next run (``--fresh`` starts over). Outputs go to
``demo_runs/``; the report to ``demo_runs/report.md`` and ``demo_runs/report.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path("configs/demo")
OUT = Path("demo_runs")
SAMPLES_PER_PROMPT = 8


class Stages:
    """Runs named stages once, records their wall time, and reuses finished ones."""

    def __init__(self, out: Path) -> None:
        self.path = out / "stages.json"
        self.times: dict[str, float] = json.loads(self.path.read_text()) if self.path.exists() \
            else {}
        self.reused: set[str] = set()

    def run(self, name: str, done: Path, fn: Callable[[], Any]) -> None:
        if name in self.times and done.exists():
            self.reused.add(name)
            print(f"[demo] {name}: reusing {done} (make demo FRESH=1 starts over)", flush=True)
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        result = fn()
        if isinstance(result, int) and result != 0:
            raise SystemExit(f"[demo] stage '{name}' failed with exit code {result}")
        self.times[name] = round(time.perf_counter() - start, 1)
        self.path.write_text(json.dumps(self.times, indent=2))
        print(f"[demo] {name}: done in {self.times[name]:.0f} s", flush=True)


def evaluate(ckpt: Path, metadata: Path, guidances: list[float], n: int) -> dict[str, Any]:
    """Generate ``n`` images per demo prompt at each guidance and score them."""
    from ldm import build
    from ldm.eval.adherence import (
        demo_prompts_from_metadata,
        format_report,
        score_pairs,
        summarise,
    )

    model, cfg = build.load_for_sampling(ckpt)
    sampler = build.build_sampler(cfg.sampling, disable_progress=True)
    prompts = demo_prompts_from_metadata(metadata)
    scored = []
    from tqdm import tqdm

    for guidance in guidances:
        for p in tqdm(prompts, desc=f"evaluating at guidance {guidance:g}", unit="prompt"):
            noise = torch.randn(model.latent_shape(n, cfg.data.image_size, cfg.data.image_size),
                                generator=torch.Generator().manual_seed(1000))
            images, _ = model.generate([p.prompt] * n, sampler, guidance=guidance, latents=noise,
                                       generator=torch.Generator().manual_seed(1000))
            scored += score_pairs([(p, img) for img in images], guidance=guidance)
    rows = summarise(scored)
    return {"rows": [r.to_dict() for r in rows], "text": format_report(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the CPU text-to-image demo.")
    parser.add_argument("--fresh", action="store_true", help="delete demo_runs/ and start over")
    parser.add_argument("--samples-per-prompt", type=int, default=SAMPLES_PER_PROMPT)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fresh and OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(exist_ok=True)
    stages = Stages(OUT)
    wall = time.perf_counter()

    import sample
    import train
    from ldm import cache
    from ldm.config import load
    from ldm.data import shapes
    from ldm.eval.adherence import demo_prompts_from_metadata
    from ldm.training import scale_factor

    data, ae_ckpt = OUT / "data", OUT / "autoencoder" / "checkpoints" / "last.safetensors"
    ldm_ckpt = OUT / "ldm" / "checkpoints" / "last.safetensors"
    stages.run("1 data", data / "metadata.json",
               lambda: shapes.main(["--config", str(CONFIGS / "shapes.yaml"), "--out", str(data)])
               and 0)
    stages.run("2 autoencoder", ae_ckpt,
               lambda: train.main(["-c", str(CONFIGS / "autoencoder.yaml")]))
    scale_marker = OUT / "autoencoder" / "scale_factor.done"
    stages.run("3 scale factor", scale_marker, lambda: (
        scale_factor.main(["--ckpt", str(ae_ckpt), "-c", str(CONFIGS / "autoencoder.yaml"),
                           "--batches", "20"]) or scale_marker.touch() or 0))
    cache_marker = OUT / "cached" / "train" / "manifest.json"
    stages.run("4 cache latents+text", cache_marker, lambda: cache.main(
        ["-c", str(CONFIGS / "ldm.yaml"), "--out", str(OUT / "cached"), "--dtype", "float16",
         "data.cached=false", f"data.train_shards={data}/train/shapes-train-{{000000..000009}}"
         ".tar", f"data.val_shards={data}/val/shapes-val-000000.tar"]))
    stages.run("5 diffusion model", ldm_ckpt,
               lambda: train.main(["-c", str(CONFIGS / "ldm.yaml")]))

    prompts = demo_prompts_from_metadata(data / "metadata.json")
    prompt_file = OUT / "prompts.txt"
    prompt_file.write_text("\n".join(p.prompt for p in prompts) + "\n")
    grid = OUT / "samples" / "grid.png"
    stages.run("6 sample grid", grid, lambda: sample.main(
        ["--ckpt", str(ldm_ckpt), "--from-file", str(prompt_file), "--n", "4",
         "--outdir", str(OUT / "samples"), "--batch-size", "32"]))

    cfg = load([CONFIGS / "ldm.yaml"])
    report_path = OUT / "report.json"
    guidances = [1.0, float(cfg.sampling.guidance)]
    stages.run("7 evaluate", report_path, lambda: report_path.write_text(json.dumps(
        evaluate(ldm_ckpt, data / "metadata.json", guidances, args.samples_per_prompt),
        indent=2)) and 0)

    report = json.loads(report_path.read_text())
    lines = ["# make demo report", "", f"grid: {grid} (rows: prompts in {prompt_file}, "
             "4 seeds each)", "", "```", report["text"].rstrip(), "```", "", "stage wall times:"]
    for name, seconds in stages.times.items():
        note = " (reused)" if name in stages.reused else ""
        lines.append(f"  {name:<24} {seconds:7.1f} s{note}")
    lines.append(f"  {'total (this run)':<24} {time.perf_counter() - wall:7.1f} s")
    text = "\n".join(lines) + "\n"
    (OUT / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
