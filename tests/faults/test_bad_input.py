"""Table-driven bad input: every case exits 2 with one ``error:`` line and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.faults.faultkit import TINY_AE


def assert_one_line_exit_2(rc: int, err: str, *needles: str, only: bool = True) -> None:
    """Exit 2, one ``error:`` line holding every needle, no traceback; with ``only`` nothing
    else on stderr either (failures before training starts, when nothing else has spoken)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err[-2000:]
    assert not only or len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


# One case per key class: counts, signed limits, device lists, fixed-length lists, non-empty
# lists, probabilities, finite floats, choices, types and unknown keys.
CONFIG_CASES = {
    "max_steps_negative": (["trainer.max_steps=-5"], "trainer.max_steps"),
    "devices_negative": (["trainer.devices=-3"], "trainer.devices"),
    "accumulate_zero": (["trainer.accumulate_grad_batches=0"], "accumulate_grad_batches"),
    "betas_one_value": (["optim.betas=[0.9]"], "optim.betas"),
    "heads_zero": (["model.unet.num_heads=0"], "num_heads"),
    "channel_mult_empty": (["model.unet.channel_mult=[]"], "channel_mult"),
    "ae_ch_mult_empty": (["model.autoencoder.ch_mult=[]"], "ch_mult"),
    "batch_size_zero": (["data.batch_size=0"], "data.batch_size"),
    "lr_nan": (["optim.lr=nan"], "optim.lr"),
    "p_uncond_above_one": (["model.p_uncond=1.5"], "p_uncond"),
    "ema_decay_negative": (["model.ema.decay=-0.1"], "ema.decay"),
    "limit_fraction": (["trainer.limit_train_batches=1.5"], "limit_train_batches"),
    "sampling_steps_zero": (["sampling.steps=0"], "sampling.steps"),
    "choice": (["optim.schedule=cosin"], "cosine"),
    "type": (["data.batch_size=many"], "data.batch_size"),
    "unknown_key": (["optim.learning_rat=1"], "did you mean"),
    "no_equals": (["optim.lr"], "key=value"),
}


@pytest.mark.parametrize("overrides,needle", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_train_config_value_refused(
    overrides: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    rc = train.main(["-c", str(TINY_AE), f"run.root={tmp_path}", *overrides])
    assert_one_line_exit_2(rc, capsys.readouterr().err, needle)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused config"


def test_stored_config_that_is_a_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("- a\n- b\n")
    torch.save({"state_dict": {}}, run / "checkpoints" / "resume.ckpt")
    assert_one_line_exit_2(train.main(["--resume", str(run)]), capsys.readouterr().err, "mapping")


def test_missing_config_file_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import train

    assert_one_line_exit_2(
        train.main(["-c", str(tmp_path / "nope.yaml")]), capsys.readouterr().err, "not found"
    )
    assert_one_line_exit_2(
        train.main(["--resume", str(tmp_path / "nope")]),
        capsys.readouterr().err,
        "resume checkpoint",
    )


def test_run_root_that_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run.root below a file (as unwritable as a read-only folder, also for root)."""
    import train

    (tmp_path / "file").write_text("x")
    shards = tmp_path / "s.tar"
    shards.write_bytes(bytes(1024))
    rc = train.main(
        [
            "-c",
            str(TINY_AE),
            f"run.root={tmp_path / 'file' / 'runs'}",
            f"data.train_shards={shards}",
            "trainer.accelerator=cpu",
        ]
    )
    assert_one_line_exit_2(
        rc, capsys.readouterr().err, "cannot write the run directory", "run.root"
    )
