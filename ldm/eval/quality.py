"""FID, KID and CLIP score of a text-to-image checkpoint, in one command, on all ranks.

    python -m ldm.eval.quality --ckpt runs/x/checkpoints/last.safetensors \\
        --prompts prompts.txt --ref ref.npz --inception pt_inception-2015-12-05-6726825d.pth \\
        --clip ./clip-vit-large-patch14 --n 30000 --sampler ddim --steps 50 --guidance 8
    torchrun --nproc_per_node 8 -m ldm.eval.quality --config configs/eval/mlperf.yaml ...

Sample ``i`` uses prompt ``i mod len(prompts)`` and seed ``seed + i`` (its own noise stream,
as ``sample.py`` gives that seed), so a report is reproducible and independent of the number
of ranks; rank r generates the samples with ``i mod world == r``. Feature statistics are summed
and CLIP scores gathered over ranks; rank 0 writes ``quality.json`` and ``quality.md`` to
``--out`` (and PNGs with ``--save-images``). FID needs ``--ref`` (``python -m ldm.eval.stats``);
KID needs a reference saved with features; CLIP score needs ``--clip``. ``--config`` reads the
options from a YAML file whose keys are the long option names (``configs/eval/``); flags given
on the command line win.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ldm.checkpoint.format import CheckpointError
from ldm.config import ConfigError
from ldm.eval.fid import FeatureStats, frechet_distance, kid, load_stats
from ldm.eval.inception import FEATURE_DIM
from ldm.eval.stats import gather_rows, init_distributed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML of these options (keys: long option names)")
    p.add_argument("--ckpt", help="checkpoint file or diffusers folder (as sample.py)")
    p.add_argument(
        "-c",
        "--model-config",
        action="append",
        default=[],
        metavar="YAML",
        help="model config for checkpoints that carry none (SD single files)",
    )
    p.add_argument("--prompts", help="text file, one prompt per line (as sample.py --from-file)")
    p.add_argument("--prompt", action="append", default=[], help="prompt (repeatable)")
    p.add_argument("--n", type=int, default=None, help="images to generate (default 1000)")
    p.add_argument("--ref", help="reference statistics .npz (for FID, and KID with features)")
    p.add_argument("--inception", help="local pt_inception-2015-12-05 weights (FID/KID)")
    p.add_argument("--clip", help="local CLIP folder (CLIP score)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed of sample 0 (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--kid-subsets", type=int, default=None, help="default 100")
    p.add_argument("--kid-subset-size", type=int, default=None, help="default 1000")
    p.add_argument("--out", default=None, help="report folder (default quality/)")
    p.add_argument("--save-images", action="store_true", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("overrides", nargs="*", help="model config overrides key=value")
    return p


DEFAULTS: dict[str, Any] = {
    "n": 1000,
    "seed": 0,
    "batch_size": 16,
    "kid_subsets": 100,
    "kid_subset_size": 1000,
    "out": "quality",
    "save_images": False,
    "device": "cuda" if torch.cuda.is_available() else "cpu",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line over ``--config`` YAML over :data:`DEFAULTS`."""
    p = parser()
    args = p.parse_args(argv)
    from_file: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"eval config not found: {path}")
        from_file = {
            k.replace("-", "_"): v for k, v in (yaml.safe_load(path.read_text()) or {}).items()
        }
        known = {a.dest for a in p._actions}
        unknown = sorted(set(from_file) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; valid: {sorted(known - {'help'})}")
    for key in {a.dest for a in p._actions} - {"help"}:
        given = getattr(args, key)
        if given is None or given == []:
            setattr(args, key, from_file.get(key, DEFAULTS.get(key, given)))
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    from ldm.sample_args import read_prompt_file

    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    if not prompts:
        raise ValueError("no prompts: pass --prompts FILE or --prompt TEXT")
    return prompts


def generate(
    args: argparse.Namespace, prompts: list[str], rank: int, world: int, sinks: dict[str, Any]
) -> dict[str, Any]:
    """Generate this rank's samples, feed each batch to the metric sinks; returns the sampling
    settings used (the checkpoint's config filled in what the command line left unset)."""
    from ldm import assemble, build
    from ldm.images import save_png, to_uint8

    model, cfg = assemble.load_for_sampling(args.ckpt, args.model_config, args.overrides)
    sampler = build.build_sampler(
        cfg.sampling, steps=args.steps, sampler=args.sampler, disable_progress=True
    )
    guidance = cfg.sampling.guidance if args.guidance is None else args.guidance
    height = args.height or int(cfg.data.image_size)
    width = args.width or height
    model.to(args.device)
    mine = list(range(rank, args.n, world))
    start, last = time.perf_counter(), 0.0
    for b in range(0, len(mine), args.batch_size):
        idx = mine[b : b + args.batch_size]
        batch_prompts = [prompts[i % len(prompts)] for i in idx]
        # One stream per sample (its initial noise, then its sampler's), as sample.py draws.
        generators = [torch.Generator().manual_seed(args.seed + i) for i in idx]
        with torch.no_grad():
            images, _ = model.generate(
                batch_prompts,
                sampler,
                guidance=guidance,
                negative_prompts=cfg.sampling.negative_prompt,
                height=height,
                width=width,
                generator=generators,
            )
        if "inception" in sinks:
            with torch.no_grad():
                f = sinks["inception"](images.to(args.device)).cpu()
            sinks["stats"].update(f)
            sinks["features"].append(f)
        if "clip" in sinks:
            sinks["clip_scores"].append(sinks["clip"].scores(images, batch_prompts))
        if args.save_images:
            for i, arr in zip(idx, to_uint8(images), strict=True):
                save_png(
                    arr,
                    Path(args.out) / "images" / f"{i:06d}.png",
                    {"prompt": prompts[i % len(prompts)], "seed": str(args.seed + i)},
                )
        done = b + len(idx)
        now = time.perf_counter() - start
        if now - last > 10 or done == len(mine):
            eta = now / done * (len(mine) - done)
            print(
                f"quality: rank {rank}: {done}/{len(mine)} images, "
                f"{done / now:.2f} img/s, ETA {eta:.0f} s",
                flush=True,
            )
            last = now
    return {
        "sampler": sampler.sampler,
        "steps": sampler.steps,
        "guidance": guidance,
        "size": [height, width],
    }


def report(
    args: argparse.Namespace, sinks: dict[str, Any], settings: dict[str, Any]
) -> dict[str, Any]:
    """Metrics over all ranks (call on every rank; collectives inside)."""
    result: dict[str, Any] = {"n": args.n, "ckpt": str(args.ckpt), **settings, "seed": args.seed}
    if "inception" in sinks:
        stats: FeatureStats = sinks["stats"]
        stats.all_reduce()
        mu_ref, sigma_ref = load_stats(args.ref)
        result["fid"] = frechet_distance(*stats.mean_cov(), mu_ref, sigma_ref)
        with np.load(args.ref, allow_pickle=False) as ref:
            ref_features = torch.from_numpy(ref["features"]) if "features" in ref else None
        fake = gather_rows(
            torch.cat(sinks["features"]) if sinks["features"] else torch.zeros(0, FEATURE_DIM)
        )
        if ref_features is not None:
            result["kid"], result["kid_std"] = kid(
                ref_features, fake, args.kid_subsets, args.kid_subset_size
            )
        else:
            result["kid"] = None  # the reference was saved without features
    if "clip" in sinks:
        scores = gather_rows(torch.cat(sinks["clip_scores"])[:, None])[:, 0]
        result["clip_score"] = float(scores.mean())
        result["clip_score_std"] = float(scores.std()) if len(scores) > 1 else 0.0
    return result


def markdown(result: dict[str, Any]) -> str:
    rows = [
        ("FID", "fid"),
        ("KID", "kid"),
        ("KID std", "kid_std"),
        ("CLIP score", "clip_score"),
        ("CLIP score std", "clip_score_std"),
    ]
    lines = [
        f"# Quality of {result['ckpt']}",
        "",
        f"{result['n']} images, sampler {result['sampler']}, {result['steps']} steps, "
        f"guidance {result['guidance']}, seeds {result['seed']}…",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for label, key in rows:
        if result.get(key) is not None:
            lines.append(f"| {label} | {result[key]:.4g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        if not args.ckpt:
            raise ValueError("no checkpoint: pass --ckpt (or set ckpt in --config)")
        if args.n < 1 or args.batch_size < 1:
            raise ValueError(f"--n and --batch-size must be >= 1 (got {args.n}, {args.batch_size})")
        if bool(args.ref) != bool(args.inception):
            raise ValueError("FID needs both --ref and --inception (or neither)")
        if not (args.ref or args.clip):
            raise ValueError(
                "nothing to measure: give --ref and --inception (FID/KID) and/or "
                "--clip (CLIP score)"
            )
        prompts = read_prompts(args)
        rank, world = init_distributed()
        sinks: dict[str, Any] = {}
        if args.ref:
            from ldm.eval.inception import load_fid_inception

            load_stats(args.ref)  # fail before generating anything
            sinks.update(
                inception=load_fid_inception(args.inception, args.device),
                stats=FeatureStats(FEATURE_DIM),
                features=[],
            )
        if args.clip:
            from ldm.eval.clip_score import CLIPScorer

            sinks.update(clip=CLIPScorer(args.clip, args.device), clip_scores=[])
        settings = generate(args, prompts, rank, world, sinks)
        result = report(args, sinks, settings)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "quality.md").write_text(markdown(result))
        print(markdown(result))
        print(f"wrote {out / 'quality.json'} and {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
