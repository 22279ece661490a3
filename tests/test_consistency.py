"""Cross-section config checks: one line, exit 2, before a run directory or a model exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.config import ConfigError, load
from ldm.consistency import text_encoder_width

ROOT = Path(__file__).resolve().parents[1]


def _train(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    import train

    code = train.main(args)
    return code, capsys.readouterr().err


def test_default_text_encoder_vs_default_context_dim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _train(["task=ldm", f"run.root={tmp_path}", "data.train_shards=x.tar"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.unet.context_dim is 768" in err and "set model.unet.context_dim=384" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task=ldm", "model.unet.context_dim=384", "model.unet.in_channels=3"],
            "model.unet.in_channels is 3 but model.autoencoder makes 4-channel latents",
        ),
        (
            ["task=ldm", "model.unet.context_dim=384", "model.autoencoder.embed_dim=8"],
            "model.unet.out_channels is 4 but model.autoencoder makes 8-channel latents",
        ),
        (
            ["data.image_size=100"],
            "data.image_size 100 is not a multiple of the downsampling factor 8",
        ),
        (["data.cached=true"], "task=autoencoder trains on images"),
    ],
)
def test_contradictions_fail_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load([], overrides)


def test_inpainting_unet_channels_are_allowed() -> None:
    load([], ["task=ldm", "model.unet.context_dim=384", "model.unet.in_channels=9"])


def test_width_from_local_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 96}))
    assert text_encoder_width(str(tmp_path)) == 96
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 64}}))
    assert text_encoder_width(str(tmp_path)) == 64
    with pytest.raises(ConfigError, match="gives 64-wide context"):
        load([], ["task=ldm", f"model.text_encoder.name_or_path={tmp_path}"])
    assert text_encoder_width("some-org/unknown-model") is None


def test_cached_flag_vs_shards(
    shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="are not cached shards"):
        load(
            [ROOT / "configs" / "ldm" / "tiny.yaml"],
            ["data.cached=true", f"data.train_shards={shapes_data['train']}"],
        )
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.tar").write_bytes(b"")
    (cache / "empty_prompt.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="are cached latents"):
        load([ROOT / "configs" / "ldm" / "tiny.yaml"], [f"data.train_shards={cache}/a.tar"])


def test_missing_shards_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _train([f"run.root={tmp_path}", f"data.train_shards={tmp_path}/none.tar"], capsys)
    assert code == 2 and "shard not found" in err and len(err.strip().splitlines()) == 1
    code, err = _train([f"run.root={tmp_path}"], capsys)
    assert code == 2 and "data.train_shards is empty" in err
    assert not any(tmp_path.iterdir())


def test_shipped_configs_are_consistent() -> None:
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        if path.parts[-2] in ("sweeps", "eval") or path.name == "shapes.yaml":  # not run configs
            continue
        load([path])


def test_cached_text_width_vs_context_dim(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.tar").write_bytes(b"")
    save_file(
        {"context": torch.zeros(8, 512), "context_mask": torch.ones(8, dtype=torch.bool)},
        str(cache / "empty_prompt.safetensors"),
    )
    overrides = ["data.cached=true", f"data.train_shards={cache}/a.tar"]
    with pytest.raises(ConfigError, match="are 512 wide but model.unet.context_dim is 384"):
        load([ROOT / "configs" / "ldm" / "tiny.yaml"], overrides)
    load(
        [ROOT / "configs" / "ldm" / "tiny.yaml"],
        [*overrides, "model.unet.context_dim=512", "model.text_encoder.name_or_path=t5-small"],
    )
