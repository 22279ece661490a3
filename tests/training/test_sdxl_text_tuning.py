"""SDXL's two text encoders trained through train.py (tests/configs/sdxl-tiny.yaml on a tiny random
SDXL folder): LoRA adapters on both (``model.lora.text_encoder``), exported in our, diffusers'
and kohya's layouts, sample in diffusers' ``StableDiffusionXLPipeline`` + ``load_lora_weights``
what our ``sample.py --ckpt`` samples from the run; the whole encoders
(``model.train_text_encoder``) train, resume exactly and sample from the run's checkpoint; cached
embeddings and refiner sources for the base config are refused in one line, exit 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
import train
from ldm.checkpoint.format import load_checkpoint
from tests.models.sdxl_tiny import build_tiny_refiner, build_tiny_sdxl, sdxl_text_towers
from tests.test_lora_interop import assert_close, ours, theirs

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:ClipTextEncoder. prompt of"
)
TINY = Path(__file__).resolve().parents[1] / "configs" / "sdxl-tiny.yaml"
EULER = ("--sampler", "euler")  # the folder's scheduler (EulerDiscreteScheduler)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl_te"))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_refiner(tmp_path_factory.mktemp("sdxl_te_refiner"))


def _args(folder: Path, shards: str, root: Path, *extra: str) -> list[str]:
    return ["-c", str(TINY), f"model.text_encoder.name_or_path={folder}",
            f"data.train_shards={shards}", f"run.root={root}", "logging.logger=csv",
            *extra]  # fmt: skip


def _pipe(folder: Path) -> Any:
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lora_on_both_sdxl_encoders_exports_and_samples_as_diffusers(
    folder: Path, shapes_data: dict[str, str], tmp_path: Path
) -> None:
    args = _args(folder, shapes_data["train"], tmp_path, "model.lora.rank=2",
                 "model.lora.text_encoder=true", f"model.init_from.path={folder}",
                 "optim.text_encoder_lr=3e-2", "trainer.max_steps=2", "run.name=te")  # fmt: skip
    assert train.main(args) == 0
    ckpt = tmp_path / "te" / "checkpoints" / "last.safetensors"
    tensors = load_checkpoint(ckpt).tensors
    for part in ("text_encoder", "text_encoder_2"):  # both encoders' attention, trained from 0
        prefix = f"text_encoder.{part}."
        ups = {k: v for k, v in tensors.items()
               if k.startswith(prefix) and k.endswith("lora_up.weight")}  # fmt: skip
        assert {k.split(".")[-3] for k in ups} == {"q_proj", "k_proj", "v_proj", "out_proj"}
        assert all(v.abs().max() > 0 for v in ups.values()), part
        # the first encoder's last layer is past the penultimate states SDXL takes: none there
        layers = {k.split("layers.")[1].split(".")[0] for k in ups}
        assert layers == ({"0", "1"} if part == "text_encoder" else {"0", "1", "2"}), part
    from ldm.checkpoint.lora_keys import main as export

    files = {fmt: tmp_path / f"{fmt}.safetensors" for fmt in ("ldm", "diffusers", "kohya")}
    for fmt, file in files.items():
        assert export(["--ckpt", str(ckpt), "--out", str(file), "--format", fmt]) == 0
    peft, kohya = load_file(str(files["diffusers"])), load_file(str(files["kohya"]))
    assert any(k.startswith("text_encoder.text_model.") for k in peft)
    assert any(k.startswith("text_encoder_2.text_model.") for k in peft)
    assert any(k.startswith("lora_te1_text_model_") for k in kohya)
    assert any(k.startswith("lora_te2_text_model_") for k in kohya)

    pipe = _pipe(folder)
    pipe.load_lora_weights(str(tmp_path), weight_name=files["diffusers"].name)
    expected = theirs(pipe)  # diffusers' pipeline, the run's diffusers file
    got = ours({"folder": ckpt}, tmp_path, extra=EULER)  # sample.py --ckpt <the run>
    assert_close(got, expected, "sample.py --ckpt the run vs diffusers with its LoRA file")
    for fmt in ("ldm", "kohya"):  # each file on the base folder, in ours
        assert_close(ours({"folder": folder}, tmp_path, files[fmt], extra=EULER), expected, fmt)
    # python -m ldm.export merges the adapters into both encoders (and the U-Net)
    from ldm.export import main as export_folder

    assert export_folder(["--ckpt", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    euler = diffusers.EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    merged = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "merged",
                                                                 scheduler=euler)  # fmt: skip
    merged.set_progress_bar_config(disable=True)
    merged = theirs(merged)
    assert_close(merged, expected, "the run exported by ldm.export vs diffusers with its LoRA")
    # the encoders' adapters matter: without them diffusers samples something else
    unet_only = {k: v for k, v in peft.items() if k.startswith("unet.")}
    save_file(unet_only, str(tmp_path / "unet_only.safetensors"))
    pipe = _pipe(folder)
    pipe.load_lora_weights(str(tmp_path), weight_name="unet_only.safetensors")
    assert (theirs(pipe) - expected).abs().max() > 1e-2 * expected.abs().max()


def _trained(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_checkpoint(run / "checkpoints" / "last.safetensors").tensors
    return {k: v for k, v in tensors.items() if k.startswith(("unet.", "text_encoder."))}


def test_full_sdxl_encoder_training_resumes_exactly_and_samples(
    folder: Path, shapes_data: dict[str, str], tmp_path: Path
) -> None:
    # from the folder's U-Net: a fresh one's zero-initialised proj_out pass the first encoder
    # (which reaches the U-Net only through cross-attention) no gradient at first
    common = _args(folder, shapes_data["train"], tmp_path, "model.train_text_encoder=true",
                   f"model.init_from.path={folder}",
                   "optim.text_encoder_lr=1e-3", "trainer.ckpt_every_n_steps=1",
                   "model.p_uncond=0.5", "model.sdxl.zero_empty_prompt=false")  # fmt: skip
    assert train.main([*common, "trainer.max_steps=2", "run.name=straight"]) == 0
    assert train.main([*common, "trainer.max_steps=1", "run.name=resumed"]) == 0
    assert train.main(["--resume", str(tmp_path / "resumed"), "trainer.max_steps=2"]) == 0
    straight, resumed = _trained(tmp_path / "straight"), _trained(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    first = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    second = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2").state_dict()
    for prefix, source in (("text_encoder.text_encoder.", first),
                           ("text_encoder.text_encoder_2.", second)):  # fmt: skip
        saved = {k[len(prefix) :]: v for k, v in straight.items() if k.startswith(prefix)}
        unused = ("encoder.layers.2.", "final_layer_norm.") if source is first else ("-",)
        assert saved.keys() == {k for k, v in source.items()
                                if v.is_floating_point() and not k.startswith(unused)}  # fmt: skip
        q = next(k for k in saved if k.endswith("layers.0.self_attn.q_proj.weight"))
        assert not torch.equal(saved[q], source[q]), prefix
    # the pooled vector's projection trains with the second encoder
    projection = straight["text_encoder.text_encoder_2.text_projection.weight"]
    assert not torch.equal(projection, second["text_projection.weight"])

    from ldm import assemble

    ckpt = tmp_path / "straight" / "checkpoints" / "last.safetensors"
    model, _ = assemble.load_for_sampling(ckpt)  # what sample.py --ckpt builds
    assert torch.equal(model.text_encoder.text_encoder_2.text_projection.weight, projection)
    assert sample.main(["--ckpt", str(ckpt), "--prompt", "the red", "--device", "cpu",
                        "--steps", "2", "--outdir", str(tmp_path / "s")]) == 0  # fmt: skip
    assert (tmp_path / "s" / "0000-the-red-s0.png").is_file()


def test_sdxl_text_training_refuses_caches_and_refiner_sources(
    folder: Path,
    refiner: Path,
    shapes_data: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    from ldm.checkpoint.sdxl_layout import load_sdxl_folder
    from ldm.checkpoint.sdxl_single_file import save_sdxl_single_file

    refiner_file = save_sdxl_single_file(load_sdxl_folder(refiner), tmp_path / "ref.safetensors")
    base_file = save_sdxl_single_file(load_sdxl_folder(folder), tmp_path / "base.safetensors")
    base = _args(folder, shapes_data["train"], tmp_path, "run.name=bad")
    refiner_cfg = ["-c", str(TINY), f"model.text_encoder.name_or_path={refiner}",
                   f"data.train_shards={shapes_data['train']}", f"run.root={tmp_path}",
                   "run.name=bad", "model.unet.context_dim=48", "model.unet.adm_in_channels=1304",
                   f"model.init_from.path={base_file}"]  # fmt: skip
    cached = "data.cached shards hold the frozen encoder's text embeddings"
    refused = "is the SDXL refiner (second text encoder only, aesthetic-score conditioning) but"
    cases = {
        cached: [*base, "data.cached=true", "model.lora.rank=2", "model.lora.text_encoder=true"],
        f"{cached} ": [*base, "data.cached=true", "model.train_text_encoder=true"],
        f"{refiner_file} {refused}": [*base, f"model.init_from.path={refiner_file}"],
        "-c configs/ldm/sdxl-refiner.yaml --aesthetic-score 6) but does not train here; start "
        "configs/ldm/sdxl.yaml from an SDXL base": [*base, f"model.init_from.path={refiner_file}"],
        f"{refiner} {refused}": [*base, f"model.init_from.path={refiner}"],
        "the refiner samples (sample.py --aesthetic-score) but does not train here; train the "
        "base layout (adm_in_channels=1560, configs/ldm/sdxl.yaml)": refiner_cfg,
    }
    for needle, argv in cases.items():
        capsys.readouterr()
        assert train.main(argv) == 2, needle
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle.strip() in err, err
        assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_sdxl_text_commands_load_with_the_tiny_model(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import re
    import shlex

    text = README.read_text()
    block = text[text.index("<!-- sdxl-text:begin -->") : text.index("<!-- sdxl-text:end -->")]
    swaps = {"configs/ldm/sdxl.yaml": str(TINY), "$SDXL": str(folder), "sdxl/": f"{tmp_path}/",
             "$BUCKETS": "data.buckets.enabled=true data.buckets.resolutions=[32] "
                         "data.buckets.step=8"}  # fmt: skip
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("python ")]
    trains = [c for c in commands if c.startswith("python train.py ")]
    assert len(trains) == 2 and any("lora_keys --ckpt" in c for c in commands)
    for command, key in zip(trains, ("lora.text_encoder", "train_text_encoder"), strict=True):
        for old, new in swaps.items():
            command = command.replace(old, new)
        capsys.readouterr()
        assert train.main([*shlex.split(command)[2:], "--print-config"]) == 0, command
        assert re.search(rf"{key.split('.')[-1]}: true", capsys.readouterr().out), command


def sdxl_unused_modules(first: torch.nn.Module) -> list[torch.nn.Module]:
    """What SDXL never reads of its first encoder (read at its penultimate hidden states): its
    last layer and final norm, as ldm.text_tuning.freeze_unreached finds on real weights (the
    full-training test above checks the saved keys); named here for meta-device counting."""
    text = getattr(first, "text_model", first)  # transformers 5's CLIPTextModel has none
    return [text.encoder.layers[-1], text.final_layer_norm]


def test_readme_text_encoder_memory_rows_follow_the_parameter_counts() -> None:
    from ldm.models.lora import add_lora

    with torch.device("meta"):
        vit_l, vit_g = sdxl_text_towers()

        def count(modules: list[torch.nn.Module]) -> int:
            return sum(p.numel() for m in modules for p in m.parameters())

        unused = sdxl_unused_modules(vit_l)  # what SDXL never reads: frozen, no adapters
        frozen = count(unused)
        trained = count([vit_l, vit_g]) - frozen
        before = count([vit_l]) - frozen, count([vit_g])
        for e in (vit_l, vit_g):  # the default model.lora.text_encoder_targets
            add_lora(e, 16, targets=["*.q_proj", "*.k_proj", "*.v_proj", "*.out_proj"])
        adapters = [count([vit_l]) - count(unused) - before[0], count([vit_g]) - before[1]]
    rows = {line.split("|")[1].strip(): line for line in README.read_text().splitlines()
            if line.startswith("| `model.")}  # fmt: skip
    lora = rows["`model.lora.text_encoder=true`, rank 16 on q/k/v/out_proj of both"]
    assert f"{sum(adapters):,} adapter parameters (ViT-L {adapters[0]:,}, ViT-bigG " in lora
    assert f"{adapters[1]:,})" in lora and lora.endswith(f"+{16 * sum(adapters) / 1e9:.1f} GB |")
    full = rows["`model.train_text_encoder=true`, both encoders"]
    assert f"| {trained:,} |" in full and full.endswith(f"+{12 * trained / 1e9:.1f} GB |")
    assert f"final norm,\n{frozen:,} parameters, stay frozen" in README.read_text()


def test_the_refiner_conditioner_trains_its_one_encoder(refiner: Path) -> None:
    from ldm.config import load
    from ldm.models.conditioner import SDXLConditioner
    from ldm.text_tuning import trainable_text_encoder

    for flag in ("model.train_text_encoder=true", "model.lora.text_encoder=true"):
        cfg = load([TINY], [f"model.text_encoder.name_or_path={refiner}", "model.lora.rank=2",
                            flag], consistency=False)  # fmt: skip
        conditioner = SDXLConditioner.from_diffusers_folder(refiner, 16)
        trainable_text_encoder(conditioner, cfg.model)
        assert conditioner.text_encoder is None and conditioner.trainable
        trained = [n for n, p in conditioner.named_parameters() if p.requires_grad]
        assert trained and all(n.startswith("text_encoder_2.") for n in trained), flag
        assert any("text_projection" in n for n in trained) == flag.startswith("model.train")
        context, pooled = conditioner.encode(["a red"])
        assert context.requires_grad and pooled.requires_grad
