"""Trainer precisions: bf16-true and 16-true train (the VAE input and the latents follow the
converted weights); bf16-mixed on the CPU trains close to fp32; 16-mixed on the CPU is refused
rather than silently becoming bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint
from tests.faults.faultkit import needs_minilm, tiny_ae_args, tiny_ldm_args
from tests.faults.test_bad_input import assert_one_line_exit_2


@needs_minilm
@pytest.mark.parametrize("precision,eps", [("bf16-true", "1e-8"), ("16-true", "1e-4")])
def test_true_precisions_train(
    precision: str, eps: str, six_batch_shard: str, tmp_path: Path
) -> None:
    import train

    args = tiny_ldm_args(
        six_batch_shard,
        tmp_path,
        "trainer.max_steps=2",
        f"trainer.precision={precision}",
        f"optim.eps={eps}",
        "run.name=p",
    )
    assert train.main(args) == 0
    ckpt = load_checkpoint(tmp_path / "p" / "checkpoints" / "last.safetensors")
    assert ckpt.metadata["step"] == "2"
    unet = {k: v for k, v in ckpt.tensors.items() if k.startswith("unet.")}
    assert unet and all(torch.isfinite(v.float()).all() for v in unet.values())


@pytest.mark.parametrize(
    "setting,needle",
    [
        (["trainer.precision=16-mixed"], "bf16-mixed"),
        (["trainer.precision=16-true"], "optim.eps=1e-4"),
        (
            [
                "trainer.precision=16-mixed",
                "trainer.gradient_clip_val=1.0",
                "optim.implementation=fused",
            ],
            "set optim.implementation=auto or foreach",
        ),
        (["optim.implementation=adam"], "fused"),
    ],
)
def test_precision_that_cannot_work_is_refused(
    setting: list[str],
    needle: str,
    six_batch_shard: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import train

    rc = train.main(tiny_ae_args(six_batch_shard, tmp_path, *setting))
    assert_one_line_exit_2(rc, capsys.readouterr().err, needle, only=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_accelerator_without_gpu(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    args = [
        a
        for a in tiny_ae_args(six_batch_shard, tmp_path)
        if not a.startswith("trainer.accelerator")
    ]
    rc = train.main([*args, "trainer.accelerator=gpu"])
    assert_one_line_exit_2(rc, capsys.readouterr().err, "trainer setting", only=False)


def _losses(run_dir: Path) -> list[float]:
    """train/loss per step from the run's CSV log."""
    import csv

    with (run_dir / "logs" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


@needs_minilm
def test_bf16_mixed_on_cpu_trains_close_to_fp32(six_batch_shard: str, tmp_path: Path) -> None:
    """``trainer.precision=bf16-mixed`` on the CPU is a real mode: the U-Net runs under bf16
    autocast (losses differ from fp32's) and training follows the fp32 run closely."""
    import train

    losses = {}
    for precision in ("32", "bf16-mixed"):
        args = tiny_ldm_args(
            six_batch_shard,
            tmp_path,
            "trainer.max_steps=4",
            "trainer.log_every_n_steps=1",
            f"trainer.precision={precision}",
            f"run.name={precision}",
        )
        assert train.main(args) == 0
        losses[precision] = _losses(tmp_path / precision)
    fp32, bf16 = losses["32"], losses["bf16-mixed"]
    assert len(fp32) == len(bf16) == 4
    assert fp32[1:] != bf16[1:]  # autocast took effect (step 0: the zero-initialised output)
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=0.01, atol=0.0)
