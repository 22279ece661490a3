"""A LoRA'd U-Net under FSDP, set up as ``FrozenAwareFSDPStrategy`` does it: the frozen
subtrees, the EMA among them (it shares the frozen base with the U-Net and averages only the
adapters), are ignored modules, so the shared base stays whole on every rank; training, the EMA and
sampling with the EMA equal a single-process run (2 CPU ranks, gloo)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ldm.models.lora import add_lora
from ldm.models.unet import UNetModel
from ldm.training.ema import EMA
from ldm.training.sharding import full_parameters
from ldm.training.strategy import frozen_modules
from tests.checkpoint.test_stable_diffusion import perturb
from tests.training.test_sharding import UNET, _batch, _free_port, _train_step


class System(nn.Module):
    """The Lightning module's shape: the trained U-Net and its EMA side by side."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.ema = EMA(unet, decay=0.5)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.unet(*args)


def _lora_unet() -> nn.Module:
    torch.manual_seed(0)
    unet = perturb(UNetModel(**UNET), seed=1)  # SD zero-initialises output layers
    add_lora(unet, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".lora_up." in name:
                param.normal_(std=0.1)
    return unet


def _rank(rank: int, port: int, out: str) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from ldm.training.strategy import FSDP_WRAP_CLASSES

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        system, reference = System(_lora_unet()), System(_lora_unet())
        ignored = frozen_modules(system)  # what the strategy ignores: the EMA among them
        assert any(m is system.ema for m in ignored)
        sharded = FullyShardedDataParallel(
            system, device_id=torch.device("cpu"), use_orig_params=True,
            auto_wrap_policy=ModuleWrapPolicy(FSDP_WRAP_CLASSES), ignored_modules=ignored,
            sharding_strategy=ShardingStrategy.FULL_SHARD,
        )  # fmt: skip
        optimizer = torch.optim.SGD([p for p in sharded.parameters() if p.requires_grad], lr=0.5)
        reference_optimizer = torch.optim.SGD(
            [p for p in reference.parameters() if p.requires_grad], lr=0.5
        )
        for _ in range(2):
            _train_step(sharded, optimizer)
            _train_step(reference, reference_optimizer)
            assert system.ema.step(system.unet, gather=lambda: full_parameters(sharded))
            reference.ema.update(reference.unet)
        x, t, context = _batch()
        with torch.no_grad():
            ours, theirs = system.ema.model(x, t, context), reference.ema.model(x, t, context)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        base = {n: p for n, p in system.ema.model.named_parameters() if n in system.ema.shared}
        assert base and all(
            p.numel() == reference.ema.model.get_parameter(n).numel() for n, p in base.items()
        )  # the shared base is whole
        if rank == 0:
            torch.save({"ok": True}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_lora_ema_under_fsdp_on_two_cpu_ranks(tmp_path: pytest.TempPathFactory) -> None:
    out = str(tmp_path / "ok.pt")  # type: ignore[operator]
    mp.spawn(_rank, args=(_free_port(), out), nprocs=2, join=True)
    assert torch.load(out, weights_only=True) == {"ok": True}


def test_reference_is_not_trivial() -> None:
    """The adapters change the output, so the comparison above can fail."""
    unet = _lora_unet()
    plain = copy.deepcopy(unet)
    for module in plain.modules():
        if hasattr(module, "lora_up"):
            nn.init.zeros_(module.lora_up.weight)
    x, t, context = _batch()
    with torch.no_grad():
        assert not torch.allclose(unet(x, t, context), plain(x, t, context), atol=1e-4)
