"""Callbacks without a full run: skipped-sample counters reach the logger."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ldm.training.monitors import DataSkipLogger


def test_data_skip_logger_reports_counts_per_reason() -> None:
    logged: dict[str, Any] = {}

    class Module:
        def log_dict(self, metrics: dict[str, float], **kwargs: Any) -> None:
            logged.update(metrics)
            logged["kwargs"] = kwargs

    class DataModule:
        def skipped_counts(self, split: str) -> dict[str, int]:
            return {"ok": 90, "corrupt_image": 3, "missing_caption": 2}

    trainer = SimpleNamespace(global_step=10, datamodule=DataModule(), world_size=2)
    callback = DataSkipLogger(every_n_steps=5)
    callback.on_train_batch_end(trainer, Module(), None, None, 0)  # type: ignore[arg-type]
    assert logged["data/skipped_corrupt_image"] == 3.0
    assert logged["data/skipped_missing_caption"] == 2.0
    assert logged["data/skipped_total"] == 5.0
    assert "data/skipped_ok" not in logged
    assert logged["kwargs"]["reduce_fx"] == "sum" and logged["kwargs"]["sync_dist"] is True

    logged.clear()
    trainer.global_step = 11  # not on the interval: nothing logged
    callback.on_train_batch_end(trainer, Module(), None, None, 0)  # type: ignore[arg-type]
    assert not logged
