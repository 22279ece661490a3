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


def test_frozen_parameters_are_shared_not_copied_and_only_adapters_average() -> None:
    from ldm.models.lora import add_lora

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    add_lora(model, rank=2, targets=["0", "2"])  # the base frozen, the adapters train
    ema = EMA(model, decay=0.5, warmup=False)
    assert ema.shared == {"0.weight", "0.bias", "2.weight", "2.bias"}
    ema_params = dict(ema.model.named_parameters())
    for name, param in model.named_parameters():
        assert (ema_params[name] is param) == (name in ema.shared), name
    copied = sum(p.numel() for n, p in ema_params.items() if n not in ema.shared)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert copied == trainable == 2 * 8 * 2 + 2 * (8 + 4)  # A: 2x8 twice, B: 8x2 and 4x2
    start = {n: p.detach().clone() for n, p in ema_params.items()}
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    ema.update(model)
    for name, param in ema.model.named_parameters():
        expected = start[name] + 0.5 * (name not in ema.shared)
        torch.testing.assert_close(param, expected, msg=name)
    x = torch.randn(3, 8)
    with torch.no_grad(), ema.swapped_into(model):
        torch.testing.assert_close(model(x), ema.model(x))
    assert not EMA(model, share_frozen=False).shared
