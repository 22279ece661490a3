"""Learning-rate schedule: warm-up then constant or cosine; frozen parameters skipped."""

from __future__ import annotations

import pytest
import torch

from ldm.training.optim import build_optimizer, build_scheduler, lr_lambda


def test_warmup_then_constant_and_cosine() -> None:
    assert lr_lambda(0, 10, "constant", 100, 0.0) == pytest.approx(0.1)
    assert lr_lambda(9, 10, "constant", 100, 0.0) == pytest.approx(1.0)
    assert lr_lambda(50, 10, "constant", 100, 0.0) == 1.0
    assert lr_lambda(10, 10, "cosine", 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, "cosine", 110, 0.1) == pytest.approx(0.55)
    assert lr_lambda(110, 10, "cosine", 110, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_lambda(0, 0, "linear", 1, 0.0)


def test_optimizer_skips_frozen_and_scheduler_steps() -> None:
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.requires_grad_(False)
    opt = build_optimizer(list(a.parameters()) + list(b.parameters()), lr=1.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    sched = build_scheduler(opt, warmup_steps=4, schedule="constant", total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)


def test_lr_is_never_scaled_silently() -> None:
    from ldm.build import learning_rate
    from ldm.config import load

    assert learning_rate(load([], ["optim.lr=1e-4", "data.batch_size=8"])) == pytest.approx(1e-4)
    cfg = load(
        [],
        [
            "optim.lr=1e-4",
            "optim.scale_lr=true",
            "data.batch_size=8",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "trainer.accumulate_grad_batches=2",
        ],
    )
    assert learning_rate(cfg) == pytest.approx(1e-4 * 8 * 4 * 2 * 2)
