"""trainer.profiler: a train.py run reports where its step time went, in the run directory and on
its output; off by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.faultkit import needs_minilm, tiny_ldm_args


@needs_minilm
def test_simple_profiler_writes_the_table_into_the_run(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    args = tiny_ldm_args(
        six_batch_shard, tmp_path, "trainer.profiler=simple", "trainer.max_steps=2", "run.name=p"
    )
    assert train.main(args) == 0
    report = (tmp_path / "p" / "fit-profile.txt").read_text()
    # The actions a user reads the step from: the data, the module's step, backward, and the
    # optimizer step (which holds the other two under automatic optimisation, and the EMA).
    for action in ("train_dataloader_next", "training_step", "backward", "optimizer_step"):
        assert action in report, report
    out = capsys.readouterr().out
    assert f"time per training action (trainer.profiler=simple): {tmp_path / 'p'}" in out


@needs_minilm
def test_profiler_is_off_by_default(six_batch_shard: str, tmp_path: Path) -> None:
    import train

    assert (
        train.main(tiny_ldm_args(six_batch_shard, tmp_path, "trainer.max_steps=2", "run.name=q"))
        == 0
    )
    assert not list((tmp_path / "q").glob("*profile*"))
