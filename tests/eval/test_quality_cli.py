"""The quality CLIs as a user runs them: reference statistics from shards, then FID/KID/CLIP
score of a checkpoint, reports on disk; the same numbers whatever the batch size; two ranks
sum statistics and gather rows like one; bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.eval import quality, stats
from ldm.eval.fid import FeatureStats
from tests.eval.test_quality_metrics import random_inception, tiny_clip

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, shapes_data: dict[str, str]) -> dict[str, Path]:
    from ldm import build
    from ldm.checkpoint.format import save_checkpoint
    from ldm.config import load, to_container

    root = tmp_path_factory.mktemp("quality")
    cfg = load([TINY_LDM])
    ckpt = save_checkpoint(
        root / "ldm.safetensors", build.build_module(cfg).export_modules(), to_container(cfg), "ldm"
    )
    inception = random_inception(root / "inception.pth")
    assert (
        stats.main(
            [
                "--shards",
                shapes_data["val"],
                "--inception",
                str(inception),
                "--out",
                str(root / "ref.npz"),
                "--size",
                "32",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na small blue square at the top left\n")
    return {
        "ckpt": ckpt,
        "inception": inception,
        "ref": root / "ref.npz",
        "clip": tiny_clip(root / "clip"),
        "prompts": prompts,
    }


def _run(setup: dict[str, Path], out: Path, *extra: str) -> dict:
    args = [
        "--ckpt",
        str(setup["ckpt"]),
        "--prompts",
        str(setup["prompts"]),
        "--n",
        "5",
        "--steps",
        "2",
        "--ref",
        str(setup["ref"]),
        "--inception",
        str(setup["inception"]),
        "--clip",
        str(setup["clip"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--kid-subset-size",
        "5",
        "--kid-subsets",
        "3",
        *extra,
    ]
    assert quality.main(args) == 0
    return json.loads((out / "quality.json").read_text())


def test_reference_stats_file(setup: dict[str, Path], shapes_data: dict[str, str]) -> None:
    with np.load(setup["ref"]) as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert int(ref["n"]) == 16 and ref["features"].shape == (16, 2048)  # the val split


def test_quality_report_and_batch_independence(
    setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A stochastic sampler: each sample's noise comes from its own seed's stream.
    a = _run(setup, tmp_path / "a", "--batch-size", "4", "--save-images", "--sampler", "euler_a")
    assert capsys.readouterr().out.count("quality: rank 0:") >= 1  # progress lines
    for key in ("fid", "kid", "kid_std", "clip_score"):
        assert np.isfinite(a[key]), key
    assert a["fid"] > 0 and a["sampler"] == "euler_a" and a["steps"] == 2 and a["n"] == 5
    assert "| FID |" in (tmp_path / "a" / "quality.md").read_text()
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 5
    b = _run(setup, tmp_path / "b", "--batch-size", "2", "--sampler", "euler_a")
    for key in ("fid", "kid", "clip_score"):
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_config_file_and_command_line_precedence(tmp_path: Path) -> None:
    args = quality.parse_args(
        ["--config", str(ROOT / "configs" / "eval" / "mlperf.yaml"), "--n", "8"]
    )
    assert (args.n, args.steps, args.guidance, args.sampler) == (8, 50, 8.0, "ddim")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['stepz'\\]"):
        quality.parse_args(["--config", str(bad)])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n and --batch-size must be >= 1"),
        (["--ref", "missing.npz"], "FID needs both --ref and --inception"),
        ([], "nothing to measure"),
        (["--clip", "no-such-folder"], "no CLIP model at"),
    ],
)
def test_bad_input_is_one_line(
    setup: dict[str, Path], extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert quality.main(["--ckpt", str(setup["ckpt"]), "--prompt", "x", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and message in err


def _two_ranks(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x = torch.arange(12.0).view(6, 2)[rank::2] + rank  # rank r holds rows r, r+2, r+4
    s = FeatureStats(2)
    s.update(x)
    s.all_reduce()
    rows = stats.gather_rows(x)
    if rank == 0:
        torch.save({"n": s.n, "total": s.total, "outer": s.outer, "rows": rows}, out)
    dist.destroy_process_group()


def test_two_ranks_sum_statistics_and_gather_rows(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "r.pt"
    mp.spawn(_two_ranks, args=(port, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    rows = torch.cat([torch.arange(12.0).view(6, 2)[r::2] + r for r in range(2)])
    single = FeatureStats(2)
    single.update(rows)
    assert got["n"] == 6 and torch.equal(got["rows"], rows)
    assert torch.allclose(got["total"], single.total) and torch.allclose(got["outer"], single.outer)


def test_prompt_files_read_as_sample_py_reads_them(tmp_path: Path) -> None:
    """--prompts takes sample.py --from-file's format: blank and # comment lines skipped."""
    import argparse

    from ldm.eval.quality import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("# shapes\na red circle\n\n  two blue squares  \n")
    args = argparse.Namespace(prompt=["a cat"], prompts=str(path))
    assert read_prompts(args) == ["a cat", "a red circle", "two blue squares"]
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="has no prompts"):
        read_prompts(args)
