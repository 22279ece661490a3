"""Whole weights under FSDP: the EMA update and checkpoint export on 2 CPU ranks (gloo)."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ldm.models.unet import UNetModel
from ldm.nn.wrappers import unwrap, unwrapped_name
from ldm.training.ema import EMA
from ldm.training.sharding import (
    full_parameters,
    full_state_dict,
    is_sharded,
    outermost_module,
)

UNET = dict(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
    attention_resolutions=[1], num_heads=2, transformer_depth=1, context_dim=16,
)  # fmt: skip


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 5, 16, generator=g),
    )


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    x, t, context = _batch()
    model(x, t, context).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_names_and_state_dict_without_sharding() -> None:
    assert unwrapped_name("_fsdp_wrapped_module.input_blocks.1._fsdp_wrapped_module.0.w") == (
        "input_blocks.1.0.w"
    )
    assert unwrapped_name("_orig_mod._checkpoint_wrapped_module.out.0.bias") == "out.0.bias"
    torch.manual_seed(0)
    unet = UNetModel(**UNET)
    compiled = torch.compile(unet)  # wraps as "_orig_mod"; nothing is compiled until called
    assert unwrap(compiled) is unet and unwrap(unet) is unet
    assert outermost_module(unet) is unet  # not attached to a trainer
    assert not is_sharded(unet)
    state = full_state_dict(unet)
    assert list(state) == list(unet.state_dict())
    assert all(state[k].data_ptr() == v.data_ptr() for k, v in unet.state_dict().items())


def test_ema_matches_names_through_wrappers() -> None:
    torch.manual_seed(0)
    unet = UNetModel(**UNET)
    ema = EMA(unet, decay=0.5, warmup=False)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    ema.update(torch.compile(unet))  # names carry "_orig_mod."; nothing is compiled
    for (name, avg), p in zip(ema.model.named_parameters(), unet.parameters(), strict=True):
        torch.testing.assert_close(avg, p - 0.5, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fsdp_rank(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ldm.training.strategy import FSDP_WRAP_CLASSES

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        unet = UNetModel(**UNET)
        reference = copy.deepcopy(unet)
        ema, reference_ema = EMA(unet, decay=0.9), EMA(reference, decay=0.9)
        sharded = FullyShardedDataParallel(
            unet, device_id=torch.device("cpu"), use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy(FSDP_WRAP_CLASSES),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
        )  # fmt: skip
        assert is_sharded(sharded)
        shard_sizes = [p.numel() for p in sharded.parameters()]
        assert sum(shard_sizes) < sum(p.numel() for p in reference.parameters())

        with pytest.raises(RuntimeError, match="inside full_parameters"):
            ema.update(sharded)  # shards, not weights: refused rather than averaged wrongly
        optimizer = torch.optim.SGD(sharded.parameters(), lr=0.1)
        reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(3):  # both ranks see the same batch: the averaged gradient is the same
            _train_step(sharded, optimizer)
            _train_step(reference, reference_optimizer)
            assert ema.step(sharded, gather=lambda: full_parameters(sharded))
            reference_ema.update(reference)

        state = full_state_dict(sharded)
        assert list(state) == list(reference.state_dict())
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(state[name], value, atol=1e-6, rtol=1e-5, msg=name)
        for name, value in reference_ema.averaged_state_dict().items():
            torch.testing.assert_close(
                ema.averaged_state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name
            )
        if rank == 0:
            torch.save({"ok": True}, out)
    finally:
        dist.destroy_process_group()


def test_ema_and_export_under_fsdp_on_two_cpu_ranks(tmp_path: pytest.TempPathFactory) -> None:
    """FULL_SHARD over 2 gloo ranks: 3 steps, EMA updates and the exported state dict equal a
    single-process run's (same weights, same names, whole tensors)."""
    out = str(tmp_path / "ok.pt")  # type: ignore[operator]
    mp.spawn(_fsdp_rank, args=(_free_port(), out), nprocs=2, join=True)
    assert torch.load(out, weights_only=True) == {"ok": True}
