"""LoRA files travel both ways between us, diffusers/peft and kohya's layout, on a tiny SD1 base.

The base is a tiny random SD1 model saved as a diffusers folder. Our side: a LoRA run through
``train.py`` (``model.init_from`` the folder), exported with ``python -m ldm.checkpoint.lora_keys
--format ldm|diffusers|kohya``, sampled with ``sample.py --ckpt folder --lora file``. diffusers'
side: ``StableDiffusionPipeline.from_pretrained(folder)`` with ``load_lora_weights``, or adapters
added by peft (``add_adapter`` with a ``LoraConfig``) and saved with ``save_lora_weights``. Same
prompt, negative prompt, guidance and initial latents; final latents agree to ≤ 1e-4 relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint.diffusers_export import export_diffusers_folder
from ldm.config import load
from tests.checkpoint.test_stable_diffusion import (
    tiny_clip_dir,
    tiny_config,
    tiny_model,
    write_yaml,
)
from tests.test_pretrained import run_args

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:ClipTextEncoder. prompt of"
)

PROMPT, NEGATIVE, SEED, SIZE, STEPS, GUIDANCE = "the red", "a b", 5, 16, 4, 5.0
FORMATS = ("ldm", "diffusers", "kohya")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, shapes_data: dict) -> dict[str, Any]:
    """The SD1 folder, and the adapters of a two-step LoRA run exported in each format."""
    import train
    from ldm.checkpoint.lora_keys import main as export

    root = tmp_path_factory.mktemp("lora_interop")
    clip = tiny_clip_dir(root / "clip")
    config = tiny_config(clip)
    folder = export_diffusers_folder(tiny_model(config, seed=1), load(base=config), root / "pipe")
    args = run_args(
        write_yaml(config, root / "sd1.yaml"),
        shapes_data["train"],
        root,
        "lora",
        f"model.init_from.path={folder}",
        f"model.autoencoder_ckpt={folder}",
        "optim.lr=3e-2",
        "trainer.max_steps=2",
        "model.lora.rank=2",
        "model.lora.alpha=6",
        "model.lora.targets=['*.to_q','*.to_k','*.to_v',"
        "'*.to_out.0','*.ff.net.0.proj','*.ff.net.2']",
        "model.lora.text_encoder=true",
        "model.lora.text_encoder_targets=['*.q_proj','*.v_proj','*.fc1']",
    )
    assert train.main(args) == 0
    ckpt = root / "lora" / "checkpoints" / "last.safetensors"
    files = {}
    for fmt in FORMATS:
        files[fmt] = root / f"{fmt}.safetensors"
        assert export(["--ckpt", str(ckpt), "--out", str(files[fmt]), "--format", fmt]) == 0
    return {"root": root, "folder": folder, "files": files, "ckpt": ckpt, "args": args}


def initial_latents() -> torch.Tensor:
    return torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(SEED))


def ours(
    base: dict[str, Any], tmp: Path, *loras: Path | str, extra: tuple[str, ...] = ()
) -> torch.Tensor:
    """Final latents of ``sample.py --ckpt folder --lora ... [extra flags]``."""
    import sample

    out = tmp / "latents.safetensors"
    argv = [
        "--ckpt",
        str(base["folder"]),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--guidance",
        str(GUIDANCE),
        "--steps",
        str(STEPS),
        "--seed",
        str(SEED),
        "--height",
        str(SIZE),
        "--outdir",
        str(tmp / "out"),
        "--save-latents",
        str(out),
    ]
    for lora in loras:
        argv += ["--lora", str(lora)]
    assert sample.main([*argv, *extra]) == 0
    return load_file(str(out))["latents"]


def pipeline(base: dict[str, Any]) -> Any:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(base["folder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def theirs(pipe: Any) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            prompt=[PROMPT],
            negative_prompt=[NEGATIVE],
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=initial_latents(),
            output_type="latent",
        ).images


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> float:
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= 1e-4 * scale, f"{what}: final latents differ by {err:.2e} (scale {scale:.3g})"
    return err


def test_our_lora_in_each_format_gives_diffusers_sample(
    base: dict[str, Any], tmp_path: Path
) -> None:
    plain = ours(base, tmp_path)
    assert_close(plain, theirs(pipeline(base)), "no LoRA")
    files = base["files"]
    pipe = pipeline(base)
    pipe.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    assert any("lora_" in n for n, _ in pipe.text_encoder.named_parameters())
    expected = theirs(pipe)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA matters
    for fmt in FORMATS:  # U-Net and text-encoder adapters
        assert_close(
            ours(base, tmp_path, files[fmt]),
            expected,
            f"ours with the {fmt} file vs diffusers with the diffusers file",
        )
    # two halves add up to the whole
    half = ours(base, tmp_path, f"{files['kohya']}:0.5", f"{files['ldm']}:0.5")
    assert_close(half, expected, "two half-scale files")

    # diffusers reads kohya files too (its own conversion; for the text encoder it writes
    # legacy names that transformers 5 rejects, so the U-Net part is compared here)
    kohya = load_file(str(files["kohya"]))
    unet_only = tmp_path / "kohya_unet.safetensors"
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_unet_")}, str(unet_only))
    pipe = pipeline(base)
    pipe.load_lora_weights(str(tmp_path), weight_name=unet_only.name)
    expected = theirs(pipe)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()
    assert_close(ours(base, tmp_path, unet_only), expected, "kohya U-Net file")


def randomise_lora_b(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def test_a_lora_written_by_diffusers_and_peft_loads_into_ours(
    base: dict[str, Any], tmp_path: Path
) -> None:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = pipeline(base)
    unet_config = LoraConfig(
        r=2,
        lora_alpha=6,
        target_modules=["to_q", "to_v", "proj_in"],
        rank_pattern={"attn2.to_q": 3},
        alpha_pattern={"attn1.to_v": 1.5},
    )
    text_config = LoraConfig(
        r=2, lora_alpha=2, use_rslora=True, target_modules=["q_proj", "out_proj", "fc1"]
    )
    pipe.unet.add_adapter(unet_config)
    # (transformers' own add_adapter wants peft >= 0.22; diffusers injects with peft itself)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    randomise_lora_b(pipe.unet, 1)
    randomise_lora_b(pipe.text_encoder, 2)
    expected = theirs(pipe)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    (file,) = (tmp_path / "peft").glob("*.safetensors")
    keys = load_file(str(file))
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(".proj_in.lora_A" in k for k in keys)  # SD1's 1x1 conv
    plain = ours(base, tmp_path)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA matters
    assert_close(ours(base, tmp_path, file), expected, "peft's file in ours")


def run_bad(base: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture, file: Path) -> str:
    import sample

    capsys.readouterr()
    assert (
        sample.main(
            [
                "--ckpt",
                str(base["folder"]),
                "--prompt",
                PROMPT,
                "--steps",
                "1",
                "--outdir",
                str(tmp_path / "bad"),
                "--lora",
                str(file),
            ]
        )
        == 2
    )
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and str(file) in errors[0], errors
    return errors[0]


def test_bad_lora_files_fail_in_one_line(
    base: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    kohya = load_file(str(base["files"]["kohya"]))
    peft_file = load_file(str(base["files"]["diffusers"]))
    down = next(k for k in kohya if k.endswith(".lora_down.weight"))
    cases = {
        "unknown_key": (
            {**kohya, "lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)},
            "hada_w1_a",
        ),
        "other_base": (
            {
                **kohya,
                "lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 64),
            },
            "lora_unet_down_blocks_3_attentions_0_proj_in",
        ),
        "sdxl": (
            {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)},
            "SDXL",
        ),
        "sdxl_te2": (  # SDXL's second encoder, on a model with one
            {**kohya, "lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)},
            "SD 1.x/2.x with one",
        ),
        "sdxl_diffusers": (
            {**peft_file, "text_encoder_2.text_projection.lora_A.weight": torch.zeros(2, 2)},
            "is from an SDXL LoRA",
        ),
        "shape": ({**kohya, down: torch.zeros(2, 7)}, down.removesuffix(".lora_down.weight")),
        "half_pair": (
            {k: v for k, v in peft_file.items() if not k.endswith("lora_B.weight")},
            "no matching up",
        ),
        "not_lora": ({"weight": torch.zeros(1)}, "'weight'"),
    }
    for name, (tensors, needle) in cases.items():
        file = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(file))
        message = run_bad(base, tmp_path, capsys, file)
        assert needle in message, (name, message)
    if_missing = run_bad(base, tmp_path, capsys, tmp_path / "missing.safetensors")
    assert "not found" in if_missing


def text_state(run: Path) -> dict[str, torch.Tensor]:
    from ldm.checkpoint.format import load_checkpoint

    return load_checkpoint(run / "checkpoints" / "last.safetensors").module_state("text_encoder")


def test_text_encoder_lora_resumes_exactly_and_samples_from_our_checkpoint(
    base: dict[str, Any], tmp_path: Path
) -> None:
    import train
    from ldm import assemble

    straight = text_state(base["root"] / "lora")
    assert straight and all(".lora_" in k for k in straight)  # the adapters only, not the base
    assert any(v.abs().sum() > 0 for k, v in straight.items() if ".lora_up." in k)
    args = [a for a in base["args"] if not a.startswith(("run.root=", "run.name="))]
    assert train.main([*args, f"run.root={tmp_path}", "run.name=half", "trainer.max_steps=1"]) == 0
    resume = torch.load(tmp_path / "half" / "checkpoints" / "resume.ckpt", weights_only=True)[
        "state_dict"
    ]
    text_keys = {k for k in resume if k.startswith("model.text_encoder.")}
    assert text_keys == {"model.text_encoder." + k for k in straight}  # frozen base left out
    assert train.main(["--resume", str(tmp_path / "half"), "trainer.max_steps=2"]) == 0
    resumed = text_state(tmp_path / "half")
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=0, atol=1e-6, msg=k)
    # sampling from our checkpoint uses the trained text adapters
    model, _ = assemble.load_for_sampling(base["ckpt"])
    live = model.text_encoder.state_dict()
    for k, v in straight.items():
        assert torch.equal(live[k], v), k


def test_full_text_encoder_fine_tune_at_its_own_learning_rate(
    base: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import train
    from ldm import assemble

    args = [
        a
        for a in base["args"]
        if not a.startswith(("run.root=", "run.name=", "model.lora", "optim.lr="))
    ]
    args += [
        f"run.root={tmp_path}",
        "run.name=full",
        "optim.lr=0",
        "optim.text_encoder_lr=1e-2",
        "model.train_text_encoder=true",
    ]
    assert train.main(args) == 0
    run = tmp_path / "full"
    from ldm.checkpoint.format import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoints" / "last.safetensors")
    start, _ = assemble.load_for_sampling(base["folder"])
    # lr 0: the U-Net is the source's; the text encoder moved at its own rate
    for k, v in start.unet.state_dict().items():
        assert torch.equal(ckpt.module_state("unet")[k], v), k
    trained = ckpt.module_state("text_encoder")
    source = start.text_encoder.state_dict()
    assert set(trained) == {n for n, _ in start.text_encoder.named_parameters()}
    changed = [k for k, v in trained.items() if not torch.equal(v, source[k])]
    assert len(changed) > len(trained) // 2
    model, _ = assemble.load_for_sampling(run / "checkpoints" / "last.safetensors")
    for k, v in trained.items():
        assert torch.equal(model.text_encoder.state_dict()[k], v), k

    capsys.readouterr()
    for bad, needle in (
        (["model.lora.text_encoder=true", "model.lora.rank=2"], "exclude"),
        (["data.cached=true"], "on uncached shards"),
        (["model.train_text_encoder=false", "model.lora.text_encoder=true"], "rank > 0"),
    ):
        assert train.main([*args, "run.name=bad", *bad]) == 2
        errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error")]
        assert len(errors) == 1 and needle in errors[0], errors
