"""``make demo``: train a prompt-following text-to-image model from nothing on a CPU, measured.

Every stage runs the real pipeline (the same CLIs a user runs) on ``configs/demo/``:

1. generate the captioned shapes dataset as webdataset shards (``ldm.data.shapes``);
2. train a small KL autoencoder (``train.py -c configs/demo/autoencoder.yaml``);
3. measure its latent ``scale_factor`` (``ldm.training.scale_factor``);
4. cache latents and MiniLM text embeddings (``ldm.cache``);
5. train the text-conditioned U-Net (``train.py -c configs/demo/ldm.yaml``);
6. sample a grid for seen, held-out and paraphrased prompts (``sample.py``);
7. score prompt adherence with the deterministic shapes analyser at guidance 1 and at the
   configured guidance, and print a report with the wall time of each stage;
8. (optional, ``--fsd-samples 0`` skips it) the Fréchet shape distance of samples for the val
   captions against the val images (`ldm.demo_fid`: FID's formula on the analyser's features).

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
        self.times: dict[str, float] = (
            json.loads(self.path.read_text()) if self.path.exists() else {}
        )
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


def fixed_noise_samples(
    model: Any, sampler: Any, prompt: str, n: int, size: int, guidance: float
) -> torch.Tensor:
    """``n`` images of ``prompt`` drawn from seed 1000's noise: the same noise for every prompt
    and every model, so scores of two models (the demo's, a fine-tune's) compare samples that
    differ only by the model."""
    images, _ = model.generate(
        [prompt] * n,
        sampler,
        guidance=guidance,
        latents=torch.randn(
            model.latent_shape(n, size, size), generator=torch.Generator().manual_seed(1000)
        ),
        generator=torch.Generator().manual_seed(1000),
    )
    return images


def evaluate(
    ckpt: Path, metadata: Path, guidances: list[float], n: int, **sampler: Any
) -> dict[str, Any]:
    """Generate ``n`` images per demo prompt at each guidance and score them (``sampler``:
    overrides of the checkpoint's ``sampling`` section, e.g. ``steps=8``)."""
    from ldm import assemble, build
    from ldm.eval.adherence import (
        demo_prompts_from_metadata,
        format_report,
        geometry_from_metadata,
        score_pairs,
        summarise,
    )

    model, cfg = assemble.load_for_sampling(ckpt)
    sampler = build.build_sampler(cfg.sampling, disable_progress=True, **sampler)
    prompts = demo_prompts_from_metadata(metadata)
    geometry = geometry_from_metadata(metadata)
    scored = []
    from tqdm import tqdm

    for guidance in guidances:
        for p in tqdm(prompts, desc=f"evaluating at guidance {guidance:g}", unit="prompt"):
            images = fixed_noise_samples(model, sampler, p.prompt, n, cfg.data.image_size, guidance)
            scored += score_pairs(
                [(p, img) for img in images], guidance=guidance, geometry=geometry
            )
    rows = summarise(scored)
    return {"rows": [r.to_dict() for r in rows], "text": format_report(rows)}


QUICK = {  # --quick: every stage at toy scale, to check the pipeline in a minute or two
    "data": ["num_train=512", "num_val=64", "num_heldout=64", "samples_per_shard=256"],
    "autoencoder": [
        "trainer.max_steps=20",
        "trainer.val_check_interval=20",
        "trainer.ckpt_every_n_steps=20",
        "logging.image_every_n_steps=20",
        "optim.warmup_steps=5",
    ],
    "ldm": [
        "trainer.max_steps=20",
        "trainer.val_check_interval=20",
        "trainer.ckpt_every_n_steps=20",
        "logging.image_every_n_steps=20",
        "optim.warmup_steps=5",
        "sampling.steps=5",
    ],
}


def labelled_demo_grid(samples: Path, prompts: list[Any], out: Path, scale: int = 3) -> Path:
    """The README's grid: ``sample.py``'s per-sample PNGs (their ``prompt`` text chunks say which
    prompt each shows), upscaled, one row per prompt with its text, grouped seen / held-out /
    paraphrase."""
    import numpy as np
    from PIL import Image

    from ldm.eval.adherence import GROUPS
    from ldm.images import labelled_grid, save_png

    by_prompt: dict[str, list[np.ndarray]] = {}
    for png in sorted(samples.glob("[0-9]*.png")):
        with Image.open(png) as image:
            prompt = image.text.get("prompt")  # type: ignore[attr-defined]
            if prompt is not None:
                by_prompt.setdefault(prompt, []).append(np.asarray(image.convert("RGB")))
    ordered = sorted(prompts, key=lambda p: GROUPS.index(p.group) if p.group in GROUPS else 99)
    rows = [
        (p.group, p.prompt, np.stack(by_prompt[p.prompt])) for p in ordered if p.prompt in by_prompt
    ]
    return save_png(labelled_grid(rows, scale=scale), out)


def prepare(
    stages: Stages, out: Path, configs: Path, quick: dict[str, list[str]]
) -> dict[str, Any]:
    """Stages 1–4: data, autoencoder, scale factor, cached latents + text embeddings.

    Returns:
        ``splits`` (the dataset's metadata splits) and ``ldm_data``: the overrides that point
        ``configs/ldm.yaml`` at the cached shards and the autoencoder (also used by
        ``bench/objectives.py``).
    """
    import train
    from ldm import cache
    from ldm.data import shapes
    from ldm.training import scale_factor

    data = out / "data"
    ae_cfg, ldm_cfg = configs / "autoencoder.yaml", configs / "ldm.yaml"
    ae_ckpt = out / "autoencoder" / "checkpoints" / "last.safetensors"
    stages.run(
        "1 data",
        data / "metadata.json",
        lambda: (
            shapes.main(
                ["--config", str(configs / "shapes.yaml"), "--out", str(data), *quick["data"]]
            )
            and 0
        ),
    )

    splits = json.loads((data / "metadata.json").read_text())["splits"]
    image_data = [
        f"data.train_shards={splits['train']['shards']}",
        f"data.val_shards={splits['val']['shards']}",
        f"run.root={out}",
    ]
    ae_args = ["-c", str(ae_cfg), *image_data, *quick["autoencoder"]]
    stages.run("2 autoencoder", ae_ckpt, lambda: train.main(ae_args))
    scale_marker = out / "autoencoder" / "scale_factor.done"
    stages.run(
        "3 scale factor",
        scale_marker,
        lambda: (
            scale_factor.main(
                ["--ckpt", str(ae_ckpt), "-c", str(ae_cfg), "--batches", "20", *image_data]
            )
            or scale_marker.touch()
            or 0
        ),
    )
    cached = out / "cached"
    stages.run(
        "4 cache latents+text",
        cached / "train" / "manifest.json",
        lambda: cache.main(
            [
                "-c",
                str(ldm_cfg),
                "--out",
                str(cached),
                "--dtype",
                "float16",
                "data.cached=false",
                f"model.autoencoder_ckpt={ae_ckpt}",
                *image_data,
            ]
        ),
    )
    ldm_data = [
        f"data.train_shards={cached}/train/{Path(splits['train']['shards']).name}",
        f"data.val_shards={cached}/val/{Path(splits['val']['shards']).name}",
        f"run.root={out}",
        f"model.autoencoder_ckpt={ae_ckpt}",
    ]
    return {"splits": splits, "ldm_data": ldm_data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the CPU text-to-image demo.")
    parser.add_argument("--fresh", action="store_true", help="delete the output and start over")
    parser.add_argument("--out", type=Path, default=OUT, help="output directory")
    parser.add_argument(
        "--configs",
        type=Path,
        default=CONFIGS,
        help="config tree (shapes.yaml, autoencoder.yaml, ldm.yaml)",
    )
    parser.add_argument("--samples-per-prompt", type=int, default=SAMPLES_PER_PROMPT)
    parser.add_argument("--quick", action="store_true", help="toy scale: checks the pipeline")
    parser.add_argument(
        "--fsd-samples",
        type=int,
        default=256,
        help="val captions sampled for the Frechet shape distance (0: skip)",
    )
    args = parser.parse_args(argv)
    out, configs = args.out, args.configs
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    wall = time.perf_counter()
    quick = QUICK if args.quick else {"data": [], "autoencoder": [], "ldm": []}
    n_eval = 2 if args.quick else args.samples_per_prompt

    import sample
    import train
    from ldm.config import load
    from ldm.eval.adherence import demo_prompts_from_metadata

    data = out / "data"
    ldm_cfg = configs / "ldm.yaml"
    ldm_ckpt = out / "ldm" / "checkpoints" / "last.safetensors"
    prepared = prepare(stages, out, configs, quick)
    splits, cached_data = prepared["splits"], prepared["ldm_data"]
    stages.run(
        "5 diffusion model",
        ldm_ckpt,
        lambda: train.main(["-c", str(ldm_cfg), *cached_data, *quick["ldm"]]),
    )

    prompts = demo_prompts_from_metadata(data / "metadata.json")
    prompt_file = out / "prompts.txt"
    prompt_file.write_text("\n".join(p.prompt for p in prompts) + "\n")
    grid = out / "samples" / "grid.png"
    stages.run(
        "6 sample grid",
        grid,
        lambda: sample.main(
            [
                "--ckpt",
                str(ldm_ckpt),
                "--from-file",
                str(prompt_file),
                "--n",
                "4",
                "--outdir",
                str(out / "samples"),
                "--batch-size",
                "32",
            ]
        ),
    )

    labelled = labelled_demo_grid(out / "samples", prompts, out / "samples" / "labelled.png")
    cfg = load([ldm_cfg])
    report_path = out / "report.json"
    guidances = [1.0, float(cfg.sampling.guidance)]
    stages.run(
        "7 evaluate",
        report_path,
        lambda: (
            report_path.write_text(
                json.dumps(evaluate(ldm_ckpt, data / "metadata.json", guidances, n_eval), indent=2)
            )
            and 0
        ),
    )

    fsd_lines = []
    n_fsd = min(args.fsd_samples, 16) if args.quick else args.fsd_samples
    if n_fsd > 0:
        from ldm.demo_fid import demo_fsd, format_fsd

        fsd_path = out / "fsd.json"
        stages.run(
            "8 shape FID",
            fsd_path,
            lambda: (
                fsd_path.write_text(
                    json.dumps(
                        demo_fsd(ldm_ckpt, data / "metadata.json", splits["val"]["shards"], n_fsd),
                        indent=2,
                    )
                )
                and 0
            ),
        )
        fsd_lines = [format_fsd(json.loads(fsd_path.read_text())), ""]

    report = json.loads(report_path.read_text())
    lines = [
        "# make demo report",
        "",
        f"grid: {grid} (one row per prompt of {prompt_file}, "
        "4 seeds each); with the prompts beside each row, grouped: " + str(labelled),
        "",
        "```",
        report["text"].rstrip(),
        "```",
        "",
        *fsd_lines,
        "stage wall times:",
    ]
    for name, seconds in stages.times.items():
        note = " (reused)" if name in stages.reused else ""
        lines.append(f"  {name:<24} {seconds:7.1f} s{note}")
    lines.append(f"  {'total (this run)':<24} {time.perf_counter() - wall:7.1f} s")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
