"""EMA: warm-up decay schedule, update cadence, float32 shadow, swapping for evaluation."""

from __future__ import annotations

import pytest
import torch

from ldm.training.ema import EMA


def test_warmup_decay_and_update_math() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999, update_every=1)
    assert ema.current_decay() == pytest.approx(1 / 10)
    old = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.step(model)
    expected = 0.1 * old + 0.9 * model.weight
    torch.testing.assert_close(ema.model.weight, expected)
    assert ema.current_decay() == pytest.approx(2 / 11)
    for _ in range(10_000):
        ema.num_updates += 1
    assert ema.current_decay() == pytest.approx(0.999)


def test_update_every_and_frozen_float32() -> None:
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.5, update_every=3, warmup=False)
    assert ema.model.weight.dtype == torch.float32 and not ema.model.weight.requires_grad
    updates = [ema.step(model) for _ in range(6)]
    assert updates == [False, False, True, False, False, True]
    assert int(ema.num_updates) == 2
    ema.train()
    assert not ema.model.training


def test_swapped_into_restores() -> None:
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.0, warmup=False)
    raw = model.weight.detach().clone()
    with torch.no_grad():
        ema.model.weight.fill_(3.0)
    with ema.swapped_into(model):
        assert torch.all(model.weight == 3.0)
    torch.testing.assert_close(model.weight, raw)
    assert set(ema.averaged_state_dict()) == set(model.state_dict())
