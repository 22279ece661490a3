"""Every diffusers UNet2DConditionModel / AutoencoderKL config key that changes the function is
reproduced (our model matches diffusers' on the folder) or refused at load with one line naming
the key; sample.py turns the refusal into exit code 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ldm.assemble import diffusers_folder_model
from ldm.checkpoint.diffusers_layout import export_diffusers_folder
from ldm.checkpoint.format import CheckpointError
from ldm.config import load
from tests.checkpoint.test_stable_diffusion import tiny_clip_dir, tiny_config, tiny_model

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")

# Changed values that would alter diffusers' function: refused, naming the key.
UNET_REFUSED = [
    ("norm_num_groups", 16), ("norm_eps", 1e-3), ("act_fn", "mish"), ("downsample_padding", 0),
    ("center_input_sample", True), ("mid_block_scale_factor", 1.5),
    ("timestep_post_act", "silu"), ("time_embedding_act_fn", "silu"),
    ("resnet_out_scale_factor", 2.0), ("resnet_skip_time_act", True), ("conv_in_kernel", 1),
    ("conv_out_kernel", 1), ("dual_cross_attention", True), ("time_cond_proj_dim", 8),
    ("attention_type", "gated"), ("cross_attention_norm", "group_norm"),
    ("encoder_hid_dim", 16), ("class_embeddings_concat", True), ("flip_sin_to_cos", False),
    ("freq_shift", 1), ("time_embedding_dim", 64), ("addition_embed_type", "text"),
    ("only_cross_attention", True), ("mid_block_only_cross_attention", True),
]  # fmt: skip
# Values that do not change the function (or equal ours): loaded and reproduced.
UNET_REPRODUCED = [
    ("time_embedding_dim", 128),
    ("mid_block_only_cross_attention", False),
    ("dropout", 0.1),
    ("sample_size", 12),
    ("addition_embed_type_num_heads", 8),
]
VAE_REFUSED = [
    ("act_fn", "gelu"),
    ("norm_num_groups", 16),
    ("use_quant_conv", False),
    ("use_post_quant_conv", False),
    ("shift_factor", 0.1),
    ("latents_mean", [0.0] * 4),
    ("latents_std", [1.0] * 4),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
]
VAE_REPRODUCED = [("force_upcast", False), ("sample_size", 64)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("audit")
    config = tiny_config(tiny_clip_dir(root / "clip"))
    model = tiny_model(config, seed=3)
    return {
        "folder": export_diffusers_folder(model, load(base=config), root / "pipe"),
        "config": config,
    }


def edited(src: Path, dst: Path, component: str, key: str, value: Any) -> Path:
    """A copy of the folder ``src`` with one key of ``component/config.json`` changed."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / component / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, key: value}))
    return dst


@pytest.mark.parametrize(
    ("component", "key", "value"),
    [("unet", *kv) for kv in UNET_REFUSED] + [("vae", *kv) for kv in VAE_REFUSED],
)
def test_changed_key_is_refused_in_one_line(
    folder: dict[str, Any], tmp_path: Path, component: str, key: str, value: Any
) -> None:
    path = edited(folder["folder"], tmp_path / "f", component, key, value)
    with pytest.raises(CheckpointError) as err:
        diffusers_folder_model(path)
    message = str(err.value)
    assert "\n" not in message and key in message and "not implemented" in message


def test_sample_cli_refuses_with_exit_2(
    folder: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sample

    path = edited(folder["folder"], tmp_path / "f", "unet", "norm_eps", 1e-3)
    assert sample.main(["--ckpt", str(path), "--prompt", "x", "--outdir", str(tmp_path)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "norm_eps=0.001 is not implemented" in err[0]


@pytest.mark.parametrize("key, value", UNET_REPRODUCED)
def test_unet_key_is_reproduced(
    folder: dict[str, Any], tmp_path: Path, key: str, value: Any
) -> None:
    path = edited(folder["folder"], tmp_path / "f", "unet", key, value)
    ours = diffusers_folder_model(path).unet.eval()
    theirs = diffusers.UNet2DConditionModel.from_pretrained(path / "unet").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        expected = theirs(x, t, ctx).sample
        assert (ours(x, t, ctx) - expected).abs().max().item() <= 1e-5
    assert expected.abs().mean().item() > 1e-3


@pytest.mark.parametrize("key, value", VAE_REPRODUCED)
def test_vae_key_is_reproduced(
    folder: dict[str, Any], tmp_path: Path, key: str, value: Any
) -> None:
    path = edited(folder["folder"], tmp_path / "f", "vae", key, value)
    ours = diffusers_folder_model(path).autoencoder.eval()
    theirs = diffusers.AutoencoderKL.from_pretrained(path / "vae").eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.decode(z).sample
        actual = ours.decode(z)
    assert (actual - expected).abs().max().item() <= 1e-5
