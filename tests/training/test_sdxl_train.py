"""SDXL through train.py on a tiny random SDXL-shaped config (tests/configs/sdxl-tiny.yaml, the
encoders of a tiny diffusers SDXL folder saved to tmp): from scratch with the default logger
(wandb offline), an exact --resume, sample.py from the run; from an SDXL single file at lr 0
(the run samples what the file samples); a LoRA run; bad inputs in one line, exit 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sample
import train
from ldm.checkpoint.format import load_checkpoint
from tests.models.sdxl_tiny import build_tiny_sdxl

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL.Image")
TINY = Path(__file__).resolve().parents[1] / "configs" / "sdxl-tiny.yaml"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


def _args(folder: Path, shards: str, root: Path, *extra: str) -> list[str]:
    return ["-c", str(TINY), f"model.text_encoder.name_or_path={folder}",
            f"data.train_shards={shards}", f"run.root={root}", *extra]  # fmt: skip


def _unet(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_checkpoint(run / "checkpoints" / "last.safetensors").tensors
    return {k: v for k, v in tensors.items() if k.startswith(("unet.", "unet_ema."))}


def _png(path: Path) -> np.ndarray:
    return np.asarray(PIL.open(path).convert("RGB")).astype(np.int16)


def test_train_resume_and_sample_sdxl(
    folder: Path, shapes_data: dict[str, str], tmp_path: Path
) -> None:
    common = _args(
        folder,
        shapes_data["train"],
        tmp_path,
        "model.p_uncond=0.5",
        "model.sdxl.uncond=per_encoder",
        "trainer.ckpt_every_n_steps=2",
    )
    assert train.main([*common, "trainer.max_steps=4", "run.name=straight"]) == 0
    assert (tmp_path / "straight" / "wandb").is_dir()  # the default logger, offline
    assert train.main([*common, "trainer.max_steps=2", "run.name=resumed"]) == 0
    assert train.main(["--resume", str(tmp_path / "resumed"), "trainer.max_steps=4"]) == 0
    straight, resumed = _unet(tmp_path / "straight"), _unet(tmp_path / "resumed")
    start = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "step-00000002.safetensors")
    assert any(not torch.equal(start.tensors[k], v) for k, v in straight.items())  # it trained
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)

    ckpt = tmp_path / "straight" / "checkpoints" / "last.safetensors"
    flags = ["--ckpt", str(ckpt), "--prompt", "the red", "--device", "cpu"]
    assert sample.main([*flags, "--outdir", str(tmp_path / "a")]) == 0
    assert (
        sample.main(
            [
                *flags,
                "--outdir",
                str(tmp_path / "b"),
                "--original-size",
                "64",
                "64",
                "--crop",
                "8",
                "8",
            ]
        )
        == 0
    )
    a = _png(tmp_path / "a" / "0000-the-red-s0.png")
    b = _png(tmp_path / "b" / "0000-the-red-s0.png")
    assert a.shape == (32, 32, 3) and np.abs(a - b).max() > 0  # micro-conditioning reaches y


def test_fine_tune_from_an_sdxl_single_file(
    folder: Path, shapes_data: dict[str, str], tmp_path: Path
) -> None:
    from ldm.checkpoint.sdxl_layout import load_sdxl_folder
    from ldm.checkpoint.sdxl_single_file import save_sdxl_single_file

    file = save_sdxl_single_file(load_sdxl_folder(folder), tmp_path / "tiny.safetensors")
    configs_only = tmp_path / "encoders"  # configs and vocabularies, no encoder weights
    for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        shutil.copytree(
            folder / part, configs_only / part, ignore=shutil.ignore_patterns("*.safetensors")
        )
    args = _args(configs_only, shapes_data["train"], tmp_path, f"model.init_from.path={file}",
                 "model.init_from.text_encoder=true", f"model.autoencoder_ckpt={file}",
                 "optim.lr=0", "trainer.max_steps=1", "run.name=ft")  # fmt: skip
    assert train.main(args) == 0
    common = ["--prompt", "the red", "--device", "cpu", "--steps", "3", "--height", "32"]
    ckpt = tmp_path / "ft" / "checkpoints" / "last.safetensors"
    assert sample.main(["--ckpt", str(ckpt), "--outdir", str(tmp_path / "ft-s"), *common]) == 0
    assert (
        sample.main(
            [
                "--ckpt",
                str(folder),
                "--outdir",
                str(tmp_path / "src"),
                "--sampler",
                "euler",
                "--guidance",
                "3",
                *common,
            ]
        )
        == 0
    )
    ours, source = (
        _png(tmp_path / "ft-s" / "0000-the-red-s0.png"),
        _png(tmp_path / "src" / "0000-the-red-s0.png"),
    )
    assert ours.std() > 1 and np.abs(ours - source).max() <= 1  # U-Net, VAE, both encoders


def test_lora_on_the_sdxl_unet_trains_and_samples(
    folder: Path, shapes_data: dict[str, str], tmp_path: Path
) -> None:
    args = _args(folder, shapes_data["train"], tmp_path, "model.lora.rank=2",
                 f"model.init_from.path={folder}", "trainer.max_steps=2", "run.name=lora",
                 "logging.logger=csv")  # fmt: skip
    assert train.main(args) == 0
    tensors = load_checkpoint(tmp_path / "lora" / "checkpoints" / "last.safetensors").tensors
    ups = [k for k in tensors if k.startswith("unet.") and k.endswith("lora_up.weight")]
    assert ups and any(tensors[k].abs().max() > 0 for k in ups)  # adapters trained from zero
    assert any(".attn2.to_k." in k for k in ups)  # cross-attention of the SDXL blocks
    assert sample.main(["--ckpt", str(tmp_path / "lora" / "checkpoints" / "last.safetensors"),
                        "--prompt", "the red", "--device", "cpu",
                        "--outdir", str(tmp_path / "s")]) == 0  # fmt: skip
    # the run's adapters as SDXL kohya and diffusers files: diffusers' load_lora_weights of the
    # one samples what sample.py --lora of the other does (tests/test_lora_sdxl.py: all layouts)
    from ldm.checkpoint.lora_keys import main as export
    from tests.test_lora_interop import assert_close, ours, theirs

    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("kohya", "diffusers")}
    for fmt, file in files.items():
        assert export(["--ckpt", str(tmp_path / "lora" / "checkpoints" / "last.safetensors"),
                       "--out", str(file), "--format", fmt]) == 0  # fmt: skip
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(str(files["kohya"])))
    assert any(k.startswith("unet.down_blocks.") for k in load_file(str(files["diffusers"])))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path), weight_name=files["diffusers"].name)
    got = ours({"folder": folder}, tmp_path, files["kohya"], extra=("--sampler", "euler"))
    assert_close(got, theirs(pipe), "the run's kohya file in ours, its diffusers one in diffusers")


def test_bad_sdxl_inputs_are_one_line_exit_2(
    folder: Path, shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from safetensors.torch import save_file

    sd1 = tmp_path / "sd1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1),
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(sd1))  # fmt: skip
    no_second = tmp_path / "no_second"
    for part in ("text_encoder", "tokenizer", "tokenizer_2"):
        shutil.copytree(folder / part, no_second / part)
    from ldm.data.cached import save_empty_prompt

    sd_cache = tmp_path / "sd_cache"  # a cache written without the pooled embedding
    sd_cache.mkdir()
    save_empty_prompt(str(sd_cache), torch.zeros(16, 80), torch.ones(16, dtype=torch.bool))
    (sd_cache / "train-000000.tar").write_bytes(b"")
    base = _args(folder, shapes_data["train"], tmp_path, "run.name=bad")
    cases = {
        "is an SD 1.x/2.x file": [*base, f"model.init_from.path={sd1}"],
        "has no text_encoder_2/config.json": [
            *base,
            f"model.text_encoder.name_or_path={no_second}",
        ],
        "model.text_encoder.kind is hf": [*base, "model.text_encoder.kind=hf"],
        "set model.unet.adm_in_channels=1560": [*base, "model.unet.adm_in_channels=1800"],
        "the SDXL refiner's": [*base, "model.unet.adm_in_channels=1304"],
        "set model.unet.context_dim=80": [*base, "model.unet.context_dim=64"],
        "holds no pooled text embedding": [
            *base,
            "data.cached=true",
            f"data.train_shards={sd_cache}/train-000000.tar",
        ],
        "SDXL takes both encoders' penultimate states": [*base, "model.text_encoder.layer=2"],
        "is not one: set model.text_encoder.name_or_path": [
            *base,
            f"model.text_encoder.name_or_path={tmp_path / 'nowhere'}",
        ],
    }
    for needle, argv in cases.items():
        capsys.readouterr()
        assert train.main(argv) == 2, needle
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err, err
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()  # refused before the run directory was made
    capsys.readouterr()
    assert sample.main(["--ckpt", str(folder), "--prompt", "x", "--crop", "-1", "0"]) == 2
    assert "crop offsets non-negative" in capsys.readouterr().err
