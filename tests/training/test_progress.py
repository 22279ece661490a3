"""Progress output: the line format off a terminal, and a bar description without "/-2"."""

from __future__ import annotations

from types import SimpleNamespace

from ldm.console import format_duration, progress, progress_line
from ldm.training.progress import StepProgressBar, progress_callbacks


def test_progress_line() -> None:
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"
    assert progress_line(120, 500, 0.1234, 3.2, 37.0) == (
        "step 120/500  loss 0.1234  3.2 it/s  elapsed 0:00:37  ETA 0:01:59"
    )
    assert progress_line(7, None, None, 2.0, 3.5) == "step 7  2 it/s  elapsed 0:00:04"


def test_step_bounded_bar_has_no_negative_epoch() -> None:
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=500, max_epochs=-1, global_step=0)
    assert bar._get_train_description(0) == "Epoch 0 (of 500 steps)"
    bar._trainer = SimpleNamespace(max_steps=-1, max_epochs=3, global_step=0)
    assert bar._get_train_description(1).rstrip() == "Epoch 1/2"  # padded to "Validation"


def test_lines_off_a_terminal(capsys) -> None:  # type: ignore[no-untyped-def]
    callbacks, bar = progress_callbacks(True, 50)  # pytest's stdout is not a terminal
    assert not bar and type(callbacks[0]).__name__ == "ProgressLines"
    assert progress_callbacks(False, 50) == ([], False)
    assert list(progress(range(3), "cache", every_s=1e9)) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cache: batch 1  ") and lines[-1].startswith("cache: batch 3  ")
    assert len(lines) == 2
