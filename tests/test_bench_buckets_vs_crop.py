"""bench/buckets_vs_crop.py without its full training: the analyser scores real renders right and
a centre-cropped far disc as cut, the crop's data loss is what the README says, the class label
reaches the U-Net (and its dropout gives the guidance's null class), and the whole bench runs
end to end at a tiny budget. (`python bench/buckets_vs_crop.py --threads 1` is the measured run.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.diffusion.schedules import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "bench_buckets", ROOT / "bench" / "buckets_vs_crop.py"
)
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _unzeroed(net: torch.nn.Module) -> torch.nn.Module:
    """The U-Net with its zero-initialised convs (which hide the label at init) made random."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    return net


def _crop16(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    top, left = (h - 16) // 2, (w - 16) // 2
    return img[top : top + 16, left : left + 16]


def test_analyser_on_real_renders_and_centre_crops() -> None:
    rng = np.random.default_rng(3)
    for aspect, position, color in bench.CLASSES:
        for _ in range(3):
            img = np.asarray(bench.render(aspect, position, color, rng)) / 255.0
            assert img.shape[:2] == bench.ASPECTS[aspect][0]
            found = bench.analyse(img, aspect, position, color)
            assert found.pop("offset") < 0.75  # the centroid where the render put the disc
            assert found == dict.fromkeys(("found", "color", "position", "whole"), 1)
            wrong = next(c for c in bench.COLORS if c != color)
            assert not bench.analyse(img, aspect, position, wrong)["color"]
            crop = bench.analyse(_crop16(img), aspect, position, color)
            # the square crop keeps the centre disc whole and cuts every far one at the border
            assert crop["found"] and crop["color"] and crop["whole"] == (position == "centre")
            assert np.isnan(crop["offset"])  # measured only at the aspect's own size
    blank = np.ones((16, 24, 3))
    nothing = bench.analyse(blank, "landscape", "left", "red")
    assert np.isnan(nothing.pop("offset")) and not any(nothing.values())


def test_crop_loss_counts_the_far_discs() -> None:
    rng = np.random.default_rng(0)
    images = [np.asarray(bench.render(*c, rng)) for c in bench.CLASSES]
    lost, cut = bench.crop_loss(images)
    assert cut == pytest.approx(2 / 3)  # 12 of the 18 classes sit at a far position
    assert 0.15 < lost < 0.35
    centre = [img for img, c in zip(images, bench.CLASSES, strict=True) if c[1] == "centre"]
    assert len(centre) == 6 and bench.crop_loss(centre) == (0.0, 0.0)


def test_label_dropout_and_the_label_reaches_the_unet() -> None:
    captions = [" ".join(c) for c in bench.CLASSES]
    assert bench.label(captions).tolist() == list(range(len(bench.CLASSES)))
    g = torch.Generator().manual_seed(0)
    assert (bench.label(captions, 1.0, g) == bench.NULL).all()
    dropped = (bench.label(captions * 50, 0.1, g) == bench.NULL).float().mean().item()
    assert 0.05 < dropped < 0.15

    net = _unzeroed(bench.make_unet())
    assert net.label_emb.num_embeddings == len(bench.CLASSES) + 1  # the classes and NULL
    x, t = torch.randn(2, 3, 16, 24), torch.full((2,), 500.0)
    a = net(x, t, y=torch.tensor([0, 0]))
    b = net(x, t, y=torch.tensor([1, bench.NULL]))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_sample_shape_range_and_guidance() -> None:
    net = _unzeroed(bench.make_unet()).eval()
    schedule = NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02)
    out = bench.sample(net, schedule, 4, (24, 16), 2, 3, "v", 3.0)
    assert out.shape == (2, 24, 16, 3) and out.min() >= 0 and out.max() <= 1
    plain = bench.sample(net, schedule, 4, (24, 16), 2, 3, "v", 1.0)
    assert not np.allclose(out, plain)  # the guidance scale is applied


def test_bench_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--train-samples", "40", "--steps", "1", "--batch", "8", "--samples", "1",
                "--sample-steps", "1", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert "the 16x16 centre crop cuts the disc" in out
    rows = ("real images", "real 16x16 crops", "bucketed @ bucket", "centre crop @ 16x16")
    for row in (*rows, "centre crop @ bucket"):
        assert out.count(row) == 2  # one line per aspect
    lines = out.splitlines()
    real = [line.split() for line in lines if line.startswith("real images")]
    assert all(cells.count("100%") == 8 for cells in real)
    crops = [line.split() for line in lines if line.startswith("real 16x16 crops")]
    assert all(cells.count("0%") == 2 and cells.count("-") == 3 for cells in crops)


def test_bad_argument_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps: 0 is not a positive integer" in capsys.readouterr().err


def test_training_feeds_each_image_its_own_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ldm.data.buckets import bucket_set
    from ldm.data.reader import ShardDataset

    pattern, _ = bench.write_data(tmp_path, 40, seed=0)
    buckets = bucket_set({"enabled": True, "sizes": [[16, 24], [24, 16]], "step": 8})
    ds = ShardDataset(
        pattern, buckets=buckets, batch_size=8, shuffle_buffer=16, seed=0, rank=0, world_size=1
    )
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_loss = bench.diffusion_loss

    def spy(net, x0, schedule, cond, **kw):  # type: ignore[no-untyped-def]
        seen.append((x0, cond["y"]))
        return real_loss(net, x0, schedule, cond, **kw)

    monkeypatch.setattr(bench, "diffusion_loss", spy)
    bench.train(ds, 3, NoiseSchedule("linear", beta_start=1e-4, beta_end=0.02), p_uncond=0.0)
    assert len(seen) == 3
    for x0, y in seen:
        for img, cls in zip(x0, y.tolist(), strict=True):
            rgb = ((img.permute(1, 2, 0) + 1) / 2).numpy()  # the batch is in [-1, 1]
            found = bench.analyse(rgb, *bench.CLASSES[cls])
            assert found.pop("offset") < 0.75 and all(found.values())
