"""Benchmark our end-to-end ``sample.py`` against diffusers' ``StableDiffusionPipeline``.

Both sample the same diffusers folder (random weights: the tiny U-Net of
``configs/ldm/unet-tiny.yaml``, a small f=4 autoencoder and a 2-layer CLIP text model, written
once to a temporary folder) with the same settings: DDIM as Stable Diffusion, guidance with a
negative prompt, same steps, batch and size. Each iteration times the whole user path: loading
the folder, encoding prompts, sampling, decoding and (ours) writing the PNGs; ours and theirs are
interleaved so that load from other processes hits both alike. Prints the ratio theirs/ours
(> 1 means we are faster) of the median wall time, and of the median CPU time of this process
(``time.process_time``: steadier on a machine shared with other processes).

    .venv/bin/python bench/sample.py                     # 64 px, 20 steps, batch 2, CPU
    .venv/bin/python bench/sample.py --size 128 --steps 30 --batch 4 --iters 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
from ldm import build  # noqa: E402
from ldm.checkpoint.diffusers_layout import export_diffusers_folder  # noqa: E402
from ldm.config import load  # noqa: E402

LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
PROMPT, NEGATIVE = "a red circle", "blurry"


def tiny_clip(root: Path, width: int) -> Path:
    """A random 2-layer CLIPTextModel and a BPE tokenizer over a-z."""
    import transformers

    vocab = LETTERS + [c + "</w>" for c in LETTERS] + ["<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77
    )
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1,
    )  # fmt: skip
    transformers.CLIPTextModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def make_folder(root: Path, size: int) -> Path:
    """The benchmark's diffusers folder (random, non-zero weights)."""
    unet = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/ldm/unet-tiny.yaml"))
    unet = unet["model"]["unet"]
    clip = tiny_clip(root / "clip", int(unet["context_dim"]))
    cfg = load(base={
        "task": "ldm",
        "model": {
            "unet": unet,
            "autoencoder": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                            "resolution": size, "scale_factor": 0.18215},
            "diffusion": {"schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
            "text_encoder": {"kind": "clip", "name_or_path": str(clip), "max_length": 77},
            "use_context_mask": False,
        },
        "data": {"image_size": size},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build.build_latent_diffusion(cfg)
    with torch.no_grad():
        for module in (model.unet, model.autoencoder):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return export_diffusers_folder(model, cfg, root / "pipe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2, help="images per run")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--iters", type=int, default=3, help="timed runs of each")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp), args.size)
        out = Path(tmp) / "samples"

        def ours() -> None:
            argv = [
                "--ckpt",
                str(folder),
                "--prompt",
                PROMPT,
                "--negative-prompt",
                NEGATIVE,
                "--n",
                str(args.batch),
                "--batch-size",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--guidance",
                str(args.guidance),
                "--sampler",
                "ddim",
                "--height",
                str(args.size),
                "--device",
                "cpu",
                "--outdir",
                str(out),
            ]
            with (
                contextlib.redirect_stderr(io.StringIO()),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                assert sample.main(argv) == 0

        def theirs() -> None:
            pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                pipe(
                    [PROMPT] * args.batch,
                    negative_prompt=[NEGATIVE] * args.batch,
                    height=args.size,
                    width=args.size,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    output_type="pil",
                )

        ours(), theirs()  # warm-up: imports, first-call allocations
        wall: dict[str, list[float]] = {"ours": [], "theirs": []}
        cpu: dict[str, list[float]] = {"ours": [], "theirs": []}
        for _ in range(args.iters):
            for name, fn in (("ours", ours), ("theirs", theirs)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    a, b = statistics.median(wall["ours"]), statistics.median(wall["theirs"])
    ca, cb = statistics.median(cpu["ours"]), statistics.median(cpu["theirs"])
    print(
        f"size={args.size} steps={args.steps} batch={args.batch} guidance={args.guidance} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'path':28s} {'median s':>9s} {'CPU s':>9s}")
    print(f"{'sample.py (ours)':28s} {a:9.3f} {ca:9.3f}")
    print(f"{'StableDiffusionPipeline':28s} {b:9.3f} {cb:9.3f}")
    print(f"ratio theirs/ours: {b / a:.2f} (CPU time: {cb / ca:.2f})")


if __name__ == "__main__":
    main()
