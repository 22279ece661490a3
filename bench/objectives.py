"""Head-to-head of the training objectives on the demo: same data, U-Net, steps and seed.

    python bench/objectives.py --out bench_runs/objectives --max-steps 600
    python bench/objectives.py --quick          # toy scale, checks the pipeline

The demo's stages 1–4 (shapes data, autoencoder, scale factor, cached latents; `ldm.demo.prepare`)
run once; then ``configs/demo/ldm.yaml`` trains three times for ``--max-steps`` optimizer steps,
changing only the objective:

- ``eps``: DDPM ε-prediction (Ho et al. 2020), the demo's min-SNR weighting, sampled with
  DPM-Solver++(2M) on Karras σ's (the demo's sampler);
- ``v+zsnr``: v-prediction (Salimans & Ho 2022) on the zero-terminal-SNR schedule with trailing
  timesteps (Lin et al. 2024), sampled with DDIM as that paper does;
- ``flow``: rectified flow with logit-normal(0, 1) times (Esser et al. 2024), sampled with the
  flow Euler sampler (diffusers' FlowMatchEulerDiscreteScheduler grid).

Each model is scored with the demo's analyser (`ldm.demo.evaluate`: the demo prompts, seen /
held-out / paraphrase, ``--samples-per-prompt`` seeds each) at the demo's guidance and 4, 8, 16
and 32 sampling steps. The samplers are fixed in advance, not picked on the held-out prompts.
Writes ``results_<max steps>.json`` and ``.md`` (the table) under ``--out``; finished stages
are reused on the next run (stages 1–4 across budgets too).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (training overrides, sampler overrides for ldm.demo.evaluate)
OBJECTIVES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "eps": (["model.diffusion.prediction=eps"], {"sampler": "dpmpp_2m", "karras": True}),
    "v+zsnr": (
        [
            "model.diffusion.prediction=v",
            "model.diffusion.zero_terminal_snr=true",
            "sampling.sampler=ddim",
            "sampling.karras=false",
            "sampling.timestep_spacing=trailing",
        ],
        {"sampler": "ddim", "karras": False, "timestep_spacing": "trailing"},
    ),
    "flow": (
        [
            "model.diffusion.objective=flow",
            "model.diffusion.flow_timestep_sampling=logit_normal",
            "sampling.sampler=euler",
            "sampling.karras=false",
        ],
        {"sampler": "euler", "karras": False},
    ),
}
GROUPS = ("seen", "held-out", "paraphrase", "all")


def final_train_loss(run: Path, tail: int = 50) -> float | None:
    """Mean ``train/loss`` of the last ``tail`` logged steps of a run's CSV log (each objective
    in its own target's units, so not comparable across objectives)."""
    values = []
    for path in sorted(run.glob("**/metrics.csv")):
        with path.open() as f:
            values += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return sum(values[-tail:]) / len(values[-tail:]) if values else None


def score(
    path: Path,
    ckpt: Path,
    metadata: Path,
    guidance: float,
    n: int,
    step_counts: list[int],
    sampler: dict[str, Any],
) -> int:
    """Adherence rows at each step count (`ldm.demo.evaluate`), written to ``path``."""
    from ldm.demo import evaluate

    rows = {
        str(k): evaluate(ckpt, metadata, [guidance], n, steps=k, **sampler)["rows"]
        for k in step_counts
    }
    path.write_text(json.dumps(rows))
    return 0


def table(results: dict[str, Any]) -> str:
    """The markdown table: 'all attributes right' per group, per objective and step count."""
    head = "| objective | sampler | steps | " + " | ".join(GROUPS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(GROUPS))]
    for name, per_steps in results["adherence"].items():
        for steps, rows in per_steps.items():
            acc = {r["group"]: r["all"] for r in rows}
            cells = " | ".join(f"{acc[g]:.2f}" if g in acc else "–" for g in GROUPS)
            lines.append(f"| {name} | {OBJECTIVES[name][1]['sampler']} | {steps} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench_runs/objectives"))
    p.add_argument("--configs", type=Path, default=ROOT / "configs" / "demo")
    p.add_argument("--max-steps", type=int, default=600, help="U-Net optimizer steps, each")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--steps", default="4,8,16,32", help="sampling steps to score")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--quick", action="store_true", help="toy scale: checks the pipeline")
    args = p.parse_args(argv)

    import train
    from ldm.config import load
    from ldm.demo import QUICK, Stages, prepare

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out)
    quick = QUICK if args.quick else {"data": [], "autoencoder": [], "ldm": []}
    names = [n for n in args.objectives.split(",") if n]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        print(
            f"error: unknown objective {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}",
            file=sys.stderr,
        )
        return 2
    step_counts = [int(s) for s in args.steps.split(",")]
    steps = 5 if args.quick else args.max_steps
    n = 1 if args.quick else args.samples_per_prompt
    prepared = prepare(stages, out, args.configs, quick)
    ldm_cfg = args.configs / "ldm.yaml"
    guidance = float(load([ldm_cfg]).sampling.guidance)
    metadata = out / "data" / "metadata.json"
    budget = [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"trainer.ckpt_every_n_steps={steps}",
        "logging.image_every_n_steps=0",
        "logging.logger=csv",
        f"optim.warmup_steps={min(100, steps // 5)}",
    ]
    results: dict[str, Any] = {
        "max_steps": steps,
        "guidance": guidance,
        "samples_per_prompt": n,
        "adherence": {},
        "train_loss": {},
        "train_seconds": {},
    }
    for name in names:
        run = out / f"{name.replace('+', '_')}_{steps}"  # a budget's runs are reused, not mixed
        ckpt = run / "checkpoints" / "last.safetensors"
        overrides, sampler = OBJECTIVES[name]
        train_args = [
            "-c",
            str(ldm_cfg),
            *prepared["ldm_data"],
            f"run.name={run.name}",
            *budget,
            *overrides,
        ]
        stages.run(f"train {run.name}", ckpt, partial(train.main, train_args))
        scored = out / f"adherence_{run.name}.json"
        stages.run(
            f"evaluate {run.name}",
            scored,
            partial(score, scored, ckpt, metadata, guidance, n, step_counts, sampler),
        )
        results["adherence"][name] = json.loads(scored.read_text())
        results["train_loss"][name] = final_train_loss(run)
        results["train_seconds"][name] = stages.times.get(f"train {run.name}")
    (out / f"results_{steps}.json").write_text(json.dumps(results, indent=2))
    text = (
        f"{steps} U-Net steps each (batch 32, configs/demo/ldm.yaml), guidance {guidance:g}, "
        f"{n} seeds per demo prompt; cells: fraction with every attribute right\n\n"
        + table(results)
        + "\n"
    )
    (out / f"results_{steps}.md").write_text(text)
    print(text)
    for name in names:
        print(
            f"{name}: train {results['train_seconds'][name]} s, final train loss "
            f"{results['train_loss'][name]} (own target units)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
