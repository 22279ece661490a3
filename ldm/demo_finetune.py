"""``make demo-finetune``: teach the demo's trained model a colour it has never seen, measured.

The second act of ``make demo`` (run that first). The demo's U-Net knows six colour words; this
teaches it a seventh, ``brown`` (``--concept``, one of
:data:`ldm.data.shapes_vocab.EXTRA_COLORS`), twice, through the
real CLIs a user runs:

1. generate a small shapes set, half brown and half the six old colours (``ldm.data.shapes`` with
   ``extra_colors=[brown]``; the old half is what limits forgetting);
2. cache its latents and text embeddings with the demo's autoencoder and text encoder
   (``ldm.cache``);
3. score the demo's model before: adherence on brown prompts and on the old seen and held-out
   prompts, with the deterministic shapes analyser (whose palette includes the new colour, as
   the new data's ``metadata.json`` lists it), and the autoencoder's round trip of real images
   of the new colour (the ceiling: the U-Net only learns latents the frozen decoder decodes);
4. fine-tune with a LoRA (``train.py -c configs/demo/ldm.yaml -c configs/demo/finetune-lora.yaml``,
   which starts from the demo's checkpoint through ``model.init_from``) and export the adapters
   (``python -m ldm.checkpoint.lora_keys``);
5. fine-tune every U-Net weight (``configs/demo/finetune-full.yaml``);
6. score both, and write ``report.md`` / ``report.json``: adherence on the new concept before and
   after, on the old ones (forgetting), trainable parameters, wall time and LoRA file size.

Outputs go to ``demo_runs/finetune-<concept>/`` (``--out``); finished stages are reused
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ldm.data.shapes_vocab import EXTRA_COLORS
from ldm.demo import Stages
from ldm.demo_finetune_report import (
    autoencoder_round_trip,
    concept_prompts,
    format_table,
    old_prompts,
    score,
    tensor_count,
)

CONFIGS = Path("configs/demo")
DEMO = Path("demo_runs")
CONCEPT = "brown"
SAMPLES_PER_PROMPT = 8
NEW_PROMPTS = 10
#: --quick: toy scale, to check the pipeline in well under a minute.
QUICK = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=4",
    "trainer.ckpt_every_n_steps=4",
    "logging.image_every_n_steps=4",
    "optim.warmup_steps=1",
    "sampling.steps=3",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Teach the demo's model a new colour (LoRA and "
        "full fine-tuning) and measure it. Run `make demo` first."
    )
    parser.add_argument("--demo", type=Path, default=DEMO, help="the finished `make demo` output")
    parser.add_argument(
        "--out", type=Path, default=None, help="output (default: DEMO/finetune-CONCEPT)"
    )
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="config tree")
    parser.add_argument(
        "--concept", default=CONCEPT, choices=sorted(EXTRA_COLORS), help="the colour word to teach"
    )
    parser.add_argument("--num-train", type=int, default=1024, help="fine-tuning images")
    parser.add_argument("--samples-per-prompt", type=int, default=SAMPLES_PER_PROMPT)
    parser.add_argument("--fresh", action="store_true", help="delete the output and start over")
    parser.add_argument("--quick", action="store_true", help="toy scale: checks the pipeline")
    args = parser.parse_args(argv)
    demo, configs = args.demo, args.configs
    concept = args.concept
    out = args.out or demo / f"finetune-{concept}"
    base = demo / "ldm" / "checkpoints" / "last.safetensors"
    ae = demo / "autoencoder" / "checkpoints" / "last.safetensors"
    for needed in (base, ae, demo / "data" / "metadata.json"):
        if not needed.is_file():
            print(
                f"error: {needed} not found; run `make demo` first (or pass --demo DIR)",
                file=sys.stderr,
            )
            return 2
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    wall = time.perf_counter()
    quick = QUICK if args.quick else []
    n = 1 if args.quick else args.samples_per_prompt
    num_train = 64 if args.quick else args.num_train
    steps = 3 if args.quick else None

    import train
    from ldm import cache
    from ldm.checkpoint import lora_keys
    from ldm.data import shapes
    from ldm.eval.adherence import geometry_from_metadata

    data, cached = out / "data", out / "cached"
    stages.run(
        "1 data",
        data / "metadata.json",
        lambda: (
            shapes.main(
                [
                    "--config",
                    str(configs / "shapes.yaml"),
                    "--out",
                    str(data),
                    f"num_train={num_train}",
                    "num_val=64",
                    "num_heldout=0",
                    f"samples_per_shard={num_train}",
                    "seed=1",
                    f"extra_colors=[{concept}]",
                    "extra_color_fraction=0.5",
                ]
            )
            and 0
        ),
    )
    ldm_cfg = configs / "ldm.yaml"
    shards = [
        f"data.train_shards=[{data}/train/shapes-train-000000.tar]",
        f"data.val_shards=[{data}/val/shapes-val-000000.tar]",
    ]
    stages.run(
        "2 cache latents+text",
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
                f"model.autoencoder_ckpt={ae}",
                *shards,
            ]
        ),
    )

    geometry = geometry_from_metadata(data / "metadata.json")
    prompts = (
        concept_prompts(concept, 2 if args.quick else NEW_PROMPTS)
        + old_prompts(demo / "data" / "metadata.json")[: 2 if args.quick else None]
    )
    scores_path = out / "scores.json"
    scores: dict[str, Any] = json.loads(scores_path.read_text()) if scores_path.exists() else {}

    def scored(name: str, ckpt: Path) -> Any:
        def run() -> int:
            scores[name] = score(ckpt, prompts, geometry, n, steps)
            scores_path.write_text(json.dumps(scores, indent=2))
            return 0

        return run

    stages.run("3 score before", scores_path, scored("before", base))
    ceiling_path = out / "autoencoder_round_trip.json"
    stages.run(
        "3 autoencoder ceiling",
        ceiling_path,
        lambda: (
            ceiling_path.write_text(
                json.dumps(
                    autoencoder_round_trip(
                        base, data / "val" / "shapes-val-000000.tar", concept, geometry
                    )
                )
            )
            and 0
        ),
    )
    common = [
        f"data.train_shards=[{cached}/train/shapes-train-000000.tar]",
        f"data.val_shards=[{cached}/val/shapes-val-000000.tar]",
        f"run.root={out}",
        f"model.autoencoder_ckpt={ae}",
        f"model.init_from.path={base}",
        *quick,
    ]
    runs = {}
    for mode in ("lora", "full"):
        run_dir = out / f"finetune-{mode}"
        ckpt = run_dir / "checkpoints" / "last.safetensors"
        overrides = [
            "-c",
            str(ldm_cfg),
            "-c",
            str(configs / f"finetune-{mode}.yaml"),
            *common,
            f"run.name=finetune-{mode}",
        ]
        stages.run(f"4 fine-tune {mode}", ckpt, lambda o=overrides: train.main(o))
        runs[mode] = ckpt
    lora_file = out / f"lora-{concept}.safetensors"
    stages.run(
        "5 export LoRA",
        lora_file,
        lambda: (
            lora_keys.main(
                ["--ckpt", str(runs["lora"]), "--format", "ldm", "--out", str(lora_file)]
            )
            or 0
        ),
    )
    for mode, ckpt in runs.items():
        stages.run(f"6 score {mode}", scores_path, scored(mode, ckpt))

    trainable = {
        "before": None,
        "lora": tensor_count(lora_file, skip="alpha"),
        "full": tensor_count(base, prefix="unet."),
    }
    rows = [
        {
            "model": name,
            "trainable_params": trainable[name],
            "train_seconds": stages.times.get(f"4 fine-tune {name}"),
            "file_bytes": lora_file.stat().st_size if name == "lora" else None,
            "new": scores[name]["new"],
            "old": scores[name]["old"],
        }
        for name in ("before", "lora", "full")
    ]
    report = {
        "concept": concept,
        "samples_per_prompt": n,
        "prompts": {
            "new": sum(p.group == "new" for p in prompts),
            "old": sum(p.group == "old" for p in prompts),
        },
        "rows": rows,
        "autoencoder_round_trip": json.loads(ceiling_path.read_text()),
        "stages": stages.times,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = format_table(rows, concept)
    lines = [
        f'# make demo-finetune report: teaching the demo\'s model "{concept}"',
        "",
        f"adherence at the demo's guidance, {n} samples per prompt: "
        f"{report['prompts']['new']} {concept} prompts (new), {report['prompts']['old']} "
        "seen and held-out demo prompts (old); analyser palette: six colours + "
        f"{concept}",
        "",
        "```",
        table,
        "```",
        "",
        f"ceiling: real {concept} images through the frozen autoencoder (encode, decode) "
        f"keep their colour in {report['autoencoder_round_trip']['color']:.2f} of "
        f"{report['autoencoder_round_trip']['count']}, median ΔE*ab "
        f"{report['autoencoder_round_trip']['delta_e']:.1f} from the true {concept}; ΔE: "
        "median CIELAB distance of the drawn colour from the asked one",
        "",
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
