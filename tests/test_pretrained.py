"""Fine-tuning starts from released weights by config alone: ``model.init_from`` (SD1/SD2 single
files, diffusers folders, our checkpoints) and ``model.autoencoder_ckpt`` (SD files, diffusers
``vae/`` and pipeline folders), driven through ``train.py``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from ldm.checkpoint.diffusers_export import export_diffusers_folder
from ldm.checkpoint.format import load_checkpoint
from ldm.config import load
from tests.checkpoint.test_stable_diffusion import (
    hf_text_state,
    perturb,
    save_sd_file,
    sd_layout,
    tiny_clip_dir,
    tiny_config,
    tiny_model,
    write_yaml,
)

pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")


def run_args(yaml_path: Path, shards: str, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "-c",
        str(yaml_path),
        f"data.train_shards={shards}",
        "data.image_size=32",
        "data.num_workers=0",
        "data.shuffle_buffer=0",
        "data.batch_size=2",
        "logging.logger=csv",
        "logging.image_every_n_steps=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=1",
        "trainer.ckpt_every_n_steps=1",
        "optim.lr=0",
        "model.ema.decay=0.5",
        f"run.root={root}",
        f"run.name={name}",
        *extra,
    ]


def unet_of(run: Path, key: str = "unet") -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.safetensors").module_state(key)


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k].to(a[k].dtype)), k


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny random SD1 and SD2 models, saved as SD single files and diffusers folders."""
    root = tmp_path_factory.mktemp("pretrained")
    out: dict[str, Any] = {"root": root}
    for family, sd2 in (("sd1", False), ("sd2", True)):
        clip = tiny_clip_dir(
            root / f"clip_{family}", 3 if sd2 else 2, "gelu" if sd2 else "quick_gelu"
        )
        model = tiny_model(tiny_config(clip, sd2=sd2), seed=3 if sd2 else 1)  # SD's 0.18215
        config = tiny_config(clip, sd2=sd2)
        config["model"]["autoencoder"]["scale_factor"] = 1.0  # the source says what it is
        ema = perturb(copy.deepcopy(model.unet), seed=7)
        single = save_sd_file(
            sd_layout(model, "openclip" if sd2 else "clip", ema_unet=ema),
            root / f"{family}.safetensors",
        )
        folder = export_diffusers_folder(
            model, load(base=tiny_config(clip, sd2=sd2)), root / f"{family}_pipe"
        )
        out[family] = {
            "config": config,
            "yaml": write_yaml(config, root / f"{family}.yaml"),
            "model": model,
            "ema": ema,
            "file": single,
            "folder": folder,
        }
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("form", ["file", "folder"])
def test_init_from_starts_the_run_at_the_source(
    sources: dict[str, Any], shapes_data: dict, tmp_path: Path, family: str, form: str
) -> None:
    import train

    src = sources[family]
    path = src[form]
    args = run_args(
        src["yaml"],
        shapes_data["train"],
        tmp_path,
        "ft",
        f"model.init_from.path={path}",
        f"model.autoencoder_ckpt={path}",
    )
    assert train.main(args) == 0
    run = tmp_path / "ft"
    # lr=0: the first step's weights are the source's, raw and EMA alike (EMA starts there)
    expected = src["ema"] if form == "file" else src["model"].unet  # SD files carry model_ema
    assert_equal_states(unet_of(run), expected.state_dict())
    assert_equal_states(unet_of(run, "unet_ema"), expected.state_dict())
    ae = load_checkpoint(run / "checkpoints" / "last.safetensors").module_state("autoencoder")
    ref = {k: v for k, v in src["model"].autoencoder.state_dict().items() if k != "scale_factor"}
    assert_equal_states({k: v for k, v in ae.items() if k != "scale_factor"}, ref)
    assert float(ae["scale_factor"]) == pytest.approx(0.18215)

    saved = yaml.safe_load((run / "config.yaml").read_text())
    init = saved["model"]["init_from"]
    assert init["path"] == str(path) and init["fingerprint"].startswith("sha256:")
    ckpt_cfg = load_checkpoint(run / "checkpoints" / "last.safetensors").config
    assert ckpt_cfg["model"]["init_from"] == init


def test_raw_weights_text_encoder_and_rerun(
    sources: dict[str, Any], shapes_data: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import train

    src = sources["sd1"]
    single = tmp_path / "copy.safetensors"
    single.write_bytes(src["file"].read_bytes())
    text_model = src["model"].text_encoder.model
    perturbed_text = perturb(copy.deepcopy(text_model), seed=11)
    layout = sd_layout(src["model"], "clip", ema_unet=src["ema"])
    layout.update(
        {
            f"cond_stage_model.transformer.{k}": v.detach().clone()
            for k, v in hf_text_state(perturbed_text).items()
        }
    )
    save_sd_file(layout, single)
    args = run_args(
        src["yaml"],
        shapes_data["train"],
        tmp_path,
        "raw",
        f"model.init_from.path={single}",
        "model.init_from.weights=raw",
        "model.init_from.text_encoder=true",
        f"model.autoencoder_ckpt={single}",
    )
    assert train.main(args) == 0
    run = tmp_path / "raw"
    assert_equal_states(unet_of(run), src["model"].unet.state_dict())
    # the text encoder is frozen (not in our checkpoints): the run's config rebuilds it
    from ldm import assemble, build

    cfg = build.resolve(load([run / "config.yaml"]))
    module = build.build_module(cfg)
    assert_equal_states(module.model.text_encoder.model.state_dict(), perturbed_text.state_dict())
    sampled, _ = assemble.load_for_sampling(run / "checkpoints" / "last.safetensors")
    assert_equal_states(sampled.text_encoder.model.state_dict(), perturbed_text.state_dict())

    # the saved config alone reruns the same start
    again = ["-c", str(run / "config.yaml"), "run.name=again"]
    assert train.main(again) == 0
    assert_equal_states(unet_of(tmp_path / "again"), unet_of(run))

    # a changed source is refused by the saved config, in one line, exit 2
    save_sd_file(sd_layout(src["model"], "clip"), single)
    capsys.readouterr()
    assert train.main(["-c", str(run / "config.yaml"), "run.name=changed"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(single) in errors[0] and "fingerprint" in errors[0]


def test_our_checkpoint_and_a_vae_folder(
    sources: dict[str, Any], shapes_data: dict, tmp_path: Path
) -> None:
    import train

    src = sources["sd1"]
    first = run_args(
        src["yaml"],
        shapes_data["train"],
        tmp_path,
        "first",
        f"model.init_from.path={src['file']}",
        f"model.autoencoder_ckpt={src['folder'] / 'vae'}",
        "model.autoencoder_scale_factor=0.5",
    )
    assert train.main(first) == 0
    ours = tmp_path / "first" / "checkpoints" / "last.safetensors"
    ae = load_checkpoint(ours).module_state("autoencoder")
    assert float(ae["scale_factor"]) == 0.5  # the override wins over the folder's
    second = run_args(
        src["yaml"],
        shapes_data["train"],
        tmp_path,
        "second",
        f"model.init_from.path={ours}",
        f"model.autoencoder_ckpt={ours}",
    )
    assert train.main(second) == 0
    assert_equal_states(unet_of(tmp_path / "second"), unet_of(tmp_path / "first", "unet_ema"))


@pytest.mark.parametrize("case", ["missing", "wrong_layout", "shape", "empty_dir"])
def test_bad_sources_fail_in_one_line(
    sources: dict[str, Any],
    shapes_data: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    case: str,
) -> None:
    import train

    src = sources["sd1"]
    extra: list[str] = []
    if case == "missing":
        bad, needle = tmp_path / "nope.safetensors", "not found"
    elif case == "wrong_layout":
        bad = tmp_path / "ae_only.safetensors"
        save_sd_file(
            {
                k: v
                for k, v in sd_layout(src["model"]).items()
                if k.startswith("first_stage_model.")
            },
            bad,
        )
        needle = "no U-Net weights"
    elif case == "shape":
        bad, needle = src["file"], "time_embed.0.weight has shape"
        extra = ["model.unet.model_channels=64"]
    else:
        bad = tmp_path / "empty"
        bad.mkdir()
        needle = "model_index.json"
    args = run_args(
        src["yaml"], shapes_data["train"], tmp_path, "bad", f"model.init_from.path={bad}", *extra
    )
    capsys.readouterr()
    assert train.main(args) == 2
    err = capsys.readouterr().err  # (transformers' own progress bars go there too)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, err
    err = errors[0]
    assert needle in err and (str(bad) in err), err


def test_freeze_patterns_keep_those_weights(
    sources: dict[str, Any], shapes_data: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import train

    src = sources["sd1"]
    args = run_args(
        src["yaml"],
        shapes_data["train"],
        tmp_path,
        "frozen",
        f"model.init_from.path={src['file']}",
        "model.init_from.weights=raw",
        "optim.lr=1e-2",
        "trainer.max_steps=2",
        "model.freeze=[input_blocks.*]",
    )
    assert train.main(args) == 0
    trained, start = unet_of(tmp_path / "frozen"), src["model"].unet.state_dict()
    changed = {name for name, value in trained.items() if not torch.equal(value, start[name])}
    assert changed and not any(name.startswith("input_blocks.") for name in changed)
    assert any(name.startswith("output_blocks.") for name in changed)

    capsys.readouterr()
    bad = run_args(
        src["yaml"], shapes_data["train"], tmp_path, "badfreeze", "model.freeze=[encoder.*]"
    )
    assert train.main(bad) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "'encoder.*' matches no U-Net parameter" in errors[0]


def base_text_encoder(src: dict[str, Any]) -> torch.nn.Module:
    """The source's own (unadapted) text encoder."""
    from ldm import assemble

    return assemble.load_for_sampling(src["file"], [src["yaml"]], use_ema=False)[0].text_encoder


def test_lora_fine_tune_trains_adapters_only_resumes_exactly_and_samples(
    sources: dict[str, Any], shapes_data: dict, tmp_path: Path
) -> None:
    import train
    from ldm import assemble

    src = sources["sd1"]
    args = run_args(
        src["yaml"],
        shapes_data["train"],
        tmp_path,
        "lora",
        f"model.init_from.path={src['file']}",
        "model.init_from.weights=raw",
        f"model.autoencoder_ckpt={src['file']}",
        "optim.lr=1e-2",
        "model.lora.rank=2",
        "model.lora.alpha=4",
        "model.lora.text_encoder=true",  # the export must merge these too
        "optim.text_encoder_lr=3e-2",
        "trainer.max_steps=2",
    )
    assert train.main(args) == 0
    trained, start = unet_of(tmp_path / "lora"), src["model"].unet.state_dict()
    lora = {k for k in trained if ".lora_" in k}
    assert lora and set(trained) - lora == set(start)
    assert all(torch.equal(trained[k], start[k]) for k in start)  # the base stays
    assert any(trained[k].abs().sum() > 0 for k in lora if ".lora_up." in k)  # adapters moved

    # one step, then --resume to two: the same adapters as the straight run
    assert train.main([*args[:-1], "trainer.max_steps=1", "run.name=half"]) == 0
    resume_state = torch.load(tmp_path / "half" / "checkpoints" / "resume.ckpt", weights_only=True)[
        "state_dict"
    ]
    unet_keys = {k for k in resume_state if k.startswith(("model.unet.", "ema.model."))}
    assert unet_keys and all(".lora_" in k for k in unet_keys)  # the frozen base is left out
    assert train.main(["--resume", str(tmp_path / "half"), "trainer.max_steps=2"]) == 0
    for key in ("unet", "unet_ema"):
        resumed, straight = unet_of(tmp_path / "half", key), unet_of(tmp_path / "lora", key)
        for k in lora:
            torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)

    model, cfg = assemble.load_for_sampling(tmp_path / "lora" / "checkpoints" / "last.safetensors")
    assert cfg.model.lora.rank == 2
    assert_equal_states(
        {k: v for k, v in model.unet.state_dict().items() if ".lora_" in k},
        {k: v for k, v in unet_of(tmp_path / "lora", "unet_ema").items() if ".lora_" in k},
    )

    # merge on export: the diffusers folder's plain U-Net computes what the adapted one does
    from ldm.export import main as export

    out = tmp_path / "merged"
    assert (
        export(
            [
                "--ckpt",
                str(tmp_path / "lora" / "checkpoints" / "last.safetensors"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    plain, _ = assemble.load_for_sampling(out)
    assert not any(".lora_" in k for k in plain.unet.state_dict())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 16, 32, generator=g)
    t = torch.tensor([10.0, 600.0])
    with torch.no_grad():
        adapted = model.unet(x, t, context=ctx)
        torch.testing.assert_close(plain.unet(x, t, context=ctx), adapted, rtol=1e-5, atol=1e-5)
        # ... and its plain text encoder what the adapted one does (the adapters moved)
        prompts = ["a red square", ""]
        exported, _ = plain.text_encoder.encode(prompts)
        trained_text, _ = model.text_encoder.encode(prompts)
        torch.testing.assert_close(exported, trained_text, rtol=1e-5, atol=1e-5)
        unadapted, _ = base_text_encoder(src).encode(prompts)
        assert (trained_text - unadapted).abs().max() > 1e-4

    # the small LoRA file, merged into the base by sample.py --lora, gives the same U-Net
    import sample
    from ldm.checkpoint.lora_keys import main as extract
    from ldm.lora_files import apply_lora_files

    small = tmp_path / "adapters.safetensors"
    assert (
        extract(
            [
                "--ckpt",
                str(tmp_path / "lora" / "checkpoints" / "last.safetensors"),
                "--out",
                str(small),
            ]
        )
        == 0
    )
    assert (
        small.stat().st_size
        < (tmp_path / "lora" / "checkpoints" / "last.safetensors").stat().st_size / 10
    )
    base, base_cfg = assemble.load_for_sampling(src["file"], [src["yaml"]], use_ema=False)
    with torch.no_grad():
        # two halves add up
        apply_lora_files(base, base_cfg.model.unet, [f"{small}:0.5", f"{small}:0.5"])
        torch.testing.assert_close(base.unet(x, t, context=ctx), adapted, rtol=1e-5, atol=1e-5)
    common = [
        "--ckpt",
        str(src["file"]),
        "-c",
        str(src["yaml"]),
        "--no-ema",
        "--prompt",
        "red",
        "--steps",
        "2",
        "--outdir",
        str(tmp_path / "samples"),
    ]
    assert sample.main([*common, "--lora", f"{small}:0.7"]) == 0
    assert any((tmp_path / "samples").rglob("*.png"))
    assert sample.main([*common, "--lora", str(tmp_path / "missing.safetensors")]) == 2
