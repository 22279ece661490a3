"""The GPU check: one script for the few minutes a lent CUDA machine gives us.

Measures, in one run, and writes one markdown table (``<out>/gpu.md``, rows also as JSON lines
in ``<out>/gpu.jsonl``):

1. the machine's measured dense bf16 matmul rate (8192³ products), the ceiling MFU is read
   against beside the datasheet peak;
2. the SD1 U-Net training step (forward + backward, bf16 autocast, batch 32, 32×32 latents,
   537 GFLOP per sample) for ours and diffusers' ``UNet2DConditionModel`` with the same weights,
   with gradient checkpointing and ``torch.compile`` on and off: ms/step, images/s, MFU, peak
   memory;
3. AdamW's step over the SD1 U-Net's 860M fp32 weights (``bench/optim.py``): ours
   (``optim.implementation=auto``, the fused kernel) against the peers' ``torch.optim.AdamW``
   default (``foreach`` on CUDA): ms per step and the ratio;
4. one Lightning run per strategy (DDP and FSDP on one GPU) through ``train.py``: the SD1 U-Net
   and autoencoder (random weights) on 256 px shapes shards with a small local CLIP text
   encoder (the hub is unreachable), bf16-mixed; images/s, MFU and peak memory from the run's
   own throughput log;
5. the graphs ``torch.compile`` builds over aspect-ratio buckets (``bench/compile_buckets.py``
   on the SD1 U-Net, inductor);
6. the ``gpu``-marked tests.

Every part runs in its own subprocess under a time limit, so a hang or crash in one (a compile
that takes too long, an OOM) is a row saying so, not a lost run; parts that would start after
``--budget-s`` are recorded as skipped. ``--dry-run`` runs the same code on the CPU at toy
sizes (a tiny U-Net, 64 px, a few steps): the suite runs it so that the script a GPU session
gets is known to work.

    bash bench/gpu.sh --fetch-wheels        # here: wheels the CUDA image lacks, into .whl/
    bash bench/gpu.sh --out "$OUT"          # there (device run: carry .whl)
    bash bench/gpu.sh --dry-run --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SD1_TRAIN_GFLOP_PER_SAMPLE = 537.0  # forward + backward, SD1 U-Net at 32x32 latents
DATASHEET_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}
UNET_CASES = [(ckpt, comp) for comp in (False, True) for ckpt in (False, True)]


# --------------------------------------------------------------------------- parts (children)
def part_peak(dry: bool) -> dict[str, Any]:
    """Measured dense matmul rate: the mean of 10 timed products after 3 warm-ups."""
    import torch

    cuda = not dry
    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    device = "cuda" if cuda else "cpu"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(cuda)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(cuda)
    tflops = 2 * n**3 * 10 / (time.perf_counter() - start) / 1e12
    name = torch.cuda.get_device_name() if cuda else "cpu (dry run)"
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    return {
        "device": name,
        "torch": torch.__version__,
        "matmul": f"{n}^3 {dtype}",
        "measured_tflops": round(tflops, 4),
        "datasheet_tflops": datasheet,
    }


def part_unet(dry: bool, model: str, checkpointing: bool, compiled: bool) -> dict[str, Any]:
    """One model's training step: ms/step, images/s and peak memory."""
    import torch

    build_pair = bench_module("unet").build_pair  # ours and diffusers' with the same weights

    cuda = not dry
    device = torch.device("cuda" if cuda else "cpu")
    size, batch, warmup, iters = ("tiny", 2, 1, 2) if dry else ("sd1", 32, 3, 10)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    ours, theirs, kw = build_pair(size, device)
    net = ours if model == "ours" else theirs
    del ours, theirs  # only the measured model stays on the device
    if checkpointing:
        if model == "ours":
            net.set_gradient_checkpointing(True)
        else:
            net.enable_gradient_checkpointing()
    net.train()
    # The dry run compiles with the eager backend: it checks the call, not Inductor's speed.
    step_net = torch.compile(net, backend="eager" if dry else "inductor") if compiled else net
    x = torch.randn(batch, kw["in_channels"], 32, 32, device=device)
    t = torch.randint(0, 1000, (batch,), device=device).float()
    ctx = torch.randn(batch, 77, kw["context_dim"], device=device)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype):
            out = step_net(x, t, ctx)
            out = out if model == "ours" else out.sample
        out.float().square().mean().backward()

    for _ in range(warmup):
        step()
    sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(cuda)
    seconds = (time.perf_counter() - start) / iters
    row = {
        "model": model,
        "checkpointing": checkpointing,
        "compile": compiled,
        "size": size,
        "batch": batch,
        "ms_per_step": round(seconds * 1e3, 2),
        "images_per_s": round(batch / seconds, 1),
    }
    if cuda:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["tflops"] = round(SD1_TRAIN_GFLOP_PER_SAMPLE * 1e9 * batch / seconds / 1e12, 1)
    return row


def part_train(dry: bool, strategy: str, work: Path) -> dict[str, Any]:
    """A short train.py run on one GPU; the run's own throughput log gives the numbers."""
    import csv

    data = make_shards(work / "shards", dry)
    encoder = make_text_encoder(work / "clip", width=384 if dry else 768)
    size = ("tiny", 32) if dry else ("sd1", 256)
    config = ROOT / "configs" / "ldm" / f"{size[0]}.yaml"
    run_root = work / "runs"
    overrides = [
        f"data.train_shards={data}",
        f"data.image_size={size[1]}",
        "data.num_workers=2",
        "data.batch_size=2" if dry else "data.batch_size=32",
        "model.text_encoder.kind=clip",
        f"model.text_encoder.name_or_path={encoder}",
        "model.text_encoder.max_length=77",
        "logging.logger=csv",
        "logging.image_every_n_steps=0",
        "trainer.log_every_n_steps=1",
        f"trainer.strategy={strategy}",
        f"trainer.max_steps={3 if dry else 30}",
        "trainer.ckpt_every_n_steps=1000",
        "trainer.enable_progress_bar=false",
        f"run.root={run_root}",
        f"run.name={strategy}",
    ]
    if dry:
        overrides += ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32"]
    else:
        overrides += [
            "trainer.accelerator=gpu",
            "trainer.devices=1",
            "trainer.precision=bf16-mixed",
        ]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-c", str(config), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train.py exited {proc.returncode}: {tail(proc.stderr)}")
    rows = list(csv.DictReader((run_root / strategy / "logs" / "metrics.csv").open()))
    last = {k: v for r in rows[len(rows) // 2 :] for k, v in r.items() if v}  # after warm-up
    return {
        "strategy": strategy,
        "wall_s": round(wall, 1),
        "steps": 3 if dry else 30,
        "images_per_s": last.get("perf/images_per_s"),
        "mfu": last.get("perf/mfu"),
        "peak_mem_gib": last.get("perf/peak_mem_gb"),
    }


def part_optim(dry: bool) -> dict[str, Any]:
    """AdamW's step over the U-Net's weights, fused (ours) and PyTorch's default (the peers')."""
    import statistics

    import torch

    optim = bench_module("optim")
    device = torch.device("cpu" if dry else "cuda")
    size, warmup, iters = ("tiny", 1, 2) if dry else ("sd1", 3, 10)
    impls = ["auto", "default"]
    numel, labels, times = optim.measure(size, device, "fp32", impls, warmup, iters)
    _, per_impl = optim.ratios(impls, times)
    row: dict[str, Any] = {"size": size, "weights_m": round(numel / 1e6)}
    for name, ts in zip(labels, times, strict=True):
        row[f"{name.split()[0]}_ms"] = round(statistics.median(ts) * 1e3, 2)
    row["default_kernel"] = labels[1].split("(")[-1].rstrip(")")
    row["ratio_vs_default"] = round(per_impl[0], 2)
    return row


def part_buckets(dry: bool) -> dict[str, Any]:
    """How many graphs ``torch.compile`` (inductor) builds for the SD1 U-Net over 4 aspect
    buckets with full and partial batches (``bench/compile_buckets.py``), and the step times:
    the expectation is 3 graphs and no recompile after the first partial batch."""
    import contextlib
    import io

    args = ["--backend", "eager"] if dry else ["--device", "cuda", "-c", "configs/ldm/sd1.yaml"]
    args += [] if dry else ["--buckets", "64x64,48x80,80x48,56x72", "--batch", "8"]
    with contextlib.redirect_stdout(io.StringIO()):  # the child's stdout carries one JSON line
        record = bench_module("compile_buckets").main(args)
    graphs = [g for g, _ in record]
    times = [round(s, 3) for _, s in record]
    return {"graphs": graphs[-1], "graphs_per_step": graphs, "step_s": times}


def part_tests(dry: bool) -> dict[str, Any]:
    """The ``gpu``-marked tests (on the CPU they are all skipped: the dry run checks the call)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else tail(proc.stderr)
    return {"exit": proc.returncode, "summary": summary}


# --------------------------------------------------------------------------- helpers
def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def bench_module(name: str) -> Any:
    """``bench/<name>.py`` as a module, without putting bench/ on sys.path (its file names
    would shadow the standard library's for everything imported later)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tail(text: str, n: int = 300) -> str:
    return " ".join(text.strip().splitlines()[-3:])[-n:]


def make_shards(out: Path, dry: bool) -> str:
    """Shapes shards (256 px, or 32 px for the dry run); returns the train brace pattern."""
    from ldm.data.shapes import ShapesConfig, generate

    if not (out / "metadata.json").is_file():
        cfg = ShapesConfig(
            image_size=32 if dry else 256,
            num_train=32 if dry else 1280,
            num_val=8,
            num_heldout=8,
            samples_per_shard=16 if dry else 320,
            seed=0,
            workers=2,
            supersample=1,
        )
        generate(cfg, str(out))
    meta = json.loads((out / "metadata.json").read_text())
    return meta["splits"]["train"]["shards"]


def make_text_encoder(out: Path, width: int) -> Path:
    """A 1-layer random CLIP text model of the given width with a small BPE vocabulary."""
    if (out / "config.json").is_file():
        return out
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    tokenizer.save_pretrained(out)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=1,
        num_attention_heads=8,
        max_position_embeddings=77,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    transformers.CLIPTextModel(config).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- driver (parent)
def plan() -> list[tuple[str, list[str], int]]:
    """(name, child arguments, time limit in s) of every part, in the order they run."""
    parts = [("peak", ["peak"], 120)]
    for ckpt, comp in UNET_CASES:
        for model in ("ours", "diffusers"):
            name = f"unet {model} ckpt={'on' if ckpt else 'off'} compile={'on' if comp else 'off'}"
            parts.append(
                (name, ["unet", model, str(int(ckpt)), str(int(comp))], 240 if comp else 120)
            )
    parts.append(("optim adamw", ["optim"], 120))
    parts += [(f"train {s}", ["train", s], 240) for s in ("ddp", "fsdp")]  # fsdp: GPU only
    parts.append(("buckets compile", ["buckets"], 240))  # issue 16: graphs per bucket
    parts.append(("gpu tests", ["tests"], 300))
    return parts


def run_child(args: list[str], dry: bool, work: Path, limit: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", *args, "--work", str(work)]
    cmd += ["--dry-run"] if dry else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {limit} s"}
    if proc.returncode != 0:
        return {"status": f"failed: {tail(proc.stderr)}"}
    return {"status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown report: one row per part, its measured values as key=value."""
    peak = next((r for r in rows if r["part"] == "peak" and r["status"] == "ok"), {})
    lines = ["| part | status | result |", "| --- | --- | --- |"]
    for r in rows:
        values = {k: v for k, v in r.items() if k not in ("part", "status") and v is not None}
        if "tflops" in values:
            for label, key in (
                ("mfu_measured", "measured_tflops"),
                ("mfu_datasheet", "datasheet_tflops"),
            ):
                if peak.get(key):
                    values[label] = f"{values['tflops'] / peak[key]:.1%}"
        text = ", ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"| {r['part']} | {r['status']} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-report", help="folder for gpu.md and gpu.jsonl")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="start no part after this many seconds (default 480)",
    )
    p.add_argument("--only", default="", help="comma list of part-name prefixes to run")
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Path(args.work or Path(args.out) / "work")
    if args.child:  # one part, in its own process; prints one JSON line
        kind, *rest = args.child
        if kind == "peak":
            row = part_peak(args.dry_run)
        elif kind == "unet":
            row = part_unet(args.dry_run, rest[0], rest[1] == "1", rest[2] == "1")
        elif kind == "train":
            row = part_train(args.dry_run, rest[0], work)
        elif kind == "buckets":
            row = part_buckets(args.dry_run)
        elif kind == "optim":
            row = part_optim(args.dry_run)
        else:
            row = part_tests(args.dry_run)
        print(json.dumps(row))
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(
                "error: no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr
            )
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    only = [s for s in args.only.split(",") if s]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, child_args, limit in plan():
        if only and not any(name.startswith(s) for s in only):
            continue
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            row = {"status": f"skipped: budget of {args.budget_s:.0f} s spent"}
        elif args.dry_run and name == "train fsdp":
            row = {"status": "skipped: FSDP needs a CUDA device (torch refuses CPU)"}
        else:
            print(f"[{elapsed:6.0f} s] {name} ...", flush=True)
            row = run_child(child_args, args.dry_run, work, limit)
        rows.append({"part": name, **row})
        with (out / "gpu.jsonl").open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")
        print(f"          {row['status']}", flush=True)
    report = table(rows)
    (out / "gpu.md").write_text(report)
    print(report)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
