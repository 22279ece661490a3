"""SDXL LoRA files in our, diffusers' and kohya's layouts, on a tiny random SDXL folder.

A seeded random LoRA on the U-Net and both text encoders (attention, MLP, 1x1-free linear
proj_in, the second encoder's text_projection) is written with our writer in each layout.
diffusers' ``StableDiffusionXLPipeline.from_pretrained(folder)`` + ``load_lora_weights`` and our
``sample.py --ckpt folder --lora file --save-latents`` start from the same latents and agree on
the final ones to ≤ 1e-4 relative (helpers of tests/test_lora_interop.py); ours → diffusers →
ours and ours → kohya → ours are bit-exact; bad files get one line, exit 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint.lora_keys import read_lora, unet_layout, write_lora
from tests.models.sdxl_tiny import build_tiny_refiner, build_tiny_sdxl
from tests.test_lora_interop import assert_close, ours, run_bad, theirs

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore:ClipTextEncoder. prompt of"
)

EULER = ("--sampler", "euler")  # the folder's scheduler (EulerDiscreteScheduler)
TARGETS = {
    "unet": (".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2", ".proj_in"),
    "text_encoder": (".q_proj", ".v_proj", ".fc1"),
    "text_encoder_2": (".k_proj", ".out_proj", ".fc2", "text_projection"),
}
RANK, ALPHA = 2, 4.0  # alpha / r = 2: folding it into B (diffusers files) is exact


def random_parts(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, Any]]:
    from ldm.checkpoint.lora_formats import adaptable_layers

    g = torch.Generator().manual_seed(0)
    parts: dict[str, dict[str, Any]] = {}
    for part, suffixes in TARGETS.items():
        parts[part] = {
            name: (
                torch.randn(RANK, layer.weight.shape[1], generator=g) * 0.3,
                torch.randn(layer.weight.shape[0], RANK, generator=g) * 0.3,
                ALPHA,
            )
            for name, layer in adaptable_layers(modules[part]).items()
            if name.endswith(suffixes)
        }
    return parts


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny SDXL folder, our model's LoRA targets, a random LoRA and its files."""
    from ldm import assemble
    from ldm.lora_files import lora_targets

    root = tmp_path_factory.mktemp("lora_sdxl")
    folder = build_tiny_sdxl(root)
    model, cfg = assemble.load_for_sampling(folder)
    modules, layout = lora_targets(model), unet_layout(cfg.model.unet)
    parts = random_parts(modules)
    files = {
        fmt: write_lora(root / f"{fmt}.safetensors", parts, fmt, layout, sdxl=True)
        for fmt in ("ldm", "diffusers", "kohya")
    }
    return {"folder": folder, "root": root, "modules": modules, "layout": layout,
            "parts": parts, "files": files}  # fmt: skip


def read(sdxl: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    m = sdxl["modules"]
    return read_lora(path, m["unet"], sdxl["layout"], m["text_encoder"], m["text_encoder_2"])


def test_layouts_hold_sdxl_names_and_round_trip_bit_exact(sdxl: dict[str, Any]) -> None:
    kohya = load_file(str(sdxl["files"]["kohya"]))
    peft = load_file(str(sdxl["files"]["diffusers"]))
    # sd-scripts' names: the SGM U-Net, lora_te1_ (ViT-L), lora_te2_ (ViT-bigG in HF names)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_middle_block_1_proj_in.alpha" in kohya
    assert any(k.startswith("lora_unet_output_blocks_") for k in kohya)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert "lora_te2_text_projection.lora_down.weight" in kohya
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight" in peft
    assert "text_encoder_2.text_model.encoder.layers.2.mlp.fc2.lora_B.weight" in peft
    assert "text_encoder_2.text_projection.lora_A.weight" in peft

    parts, root = sdxl["parts"], sdxl["root"]
    for fmt in ("ldm", "kohya"):  # ours -> fmt -> ours: A, B and alpha bit for bit
        back = read(sdxl, sdxl["files"][fmt])
        again = read(sdxl, write_lora(root / f"again_{fmt}.st", back, "ldm", sdxl["layout"],
                                      sdxl=True))  # fmt: skip
        for got in (back, again):
            assert got.keys() == parts.keys()
            for part, adapters in parts.items():
                assert got[part].keys() == adapters.keys()
                for layer, (down, up, alpha) in adapters.items():
                    d, u, a = got[part][layer]
                    assert torch.equal(d, down) and torch.equal(u, up) and a == alpha, layer
    # kohya SDXL files converted from diffusers name the U-Net as diffusers does
    from ldm.checkpoint.lora_sdxl import sdxl_unet_layer_names

    theirs_names = sdxl_unet_layer_names(parts["unet"], sdxl["layout"])
    renamed = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        layer = next((o for o in parts["unet"] if "lora_unet_" + o.replace(".", "_") == module),
                     None)  # fmt: skip
        if layer is not None:
            module = "lora_unet_" + theirs_names[layer].replace(".", "_")
        renamed[f"{module}.{suffix}"] = value
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in renamed)
    save_file(renamed, str(root / "kohya_diffusers_names.safetensors"))
    back = read(sdxl, root / "kohya_diffusers_names.safetensors")
    assert all(torch.equal(back["unet"][n][1], up) for n, (_, up, _) in parts["unet"].items())
    # older diffusers files may carry network alphas as <module>.alpha keys
    with_alpha = {**peft, "unet.mid_block.attentions.0.proj_in.alpha": torch.tensor(8.0)}
    save_file(with_alpha, str(root / "alpha.safetensors"))
    assert read(sdxl, root / "alpha.safetensors")["unet"]["middle_block.1.proj_in"][2] == 8.0
    # ours -> diffusers -> ours: alpha / r folded into B, the same update bit for bit
    back = read(sdxl, sdxl["files"]["diffusers"])
    again = read(sdxl, write_lora(root / "again.st", back, "diffusers", sdxl["layout"], sdxl=True))
    for part, adapters in parts.items():
        for layer, (down, up, alpha) in adapters.items():
            for got in (back, again):
                d, u, a = got[part][layer]
                assert torch.equal(d, down) and a == RANK, layer
                assert torch.equal(u * (a / RANK), up * (alpha / RANK)), layer


def test_sdxl_lora_in_each_layout_gives_diffusers_sample(
    sdxl: dict[str, Any], tmp_path: Path
) -> None:
    files = sdxl["files"]
    pipe = pipeline_xl(sdxl)
    plain = theirs(pipe)
    pipe.load_lora_weights(str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    counts = lora_counts(pipe)
    assert counts == {p: 2 * len(a) for p, a in sdxl["parts"].items()}, counts  # all loaded
    expected = theirs(pipe)
    assert (expected - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA matters
    for fmt in ("ldm", "diffusers", "kohya"):
        got = ours(sdxl, tmp_path, files[fmt], extra=EULER)
        assert_close(got, expected, f"ours with the {fmt} file vs diffusers' load_lora_weights")


def old_diffusers_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our diffusers file in the older forms load_lora_weights accepts: U-Net attention as
    ``attn1.processor.to_q_lora.down.weight``, other U-Net layers ``.lora.down.weight``, the
    second encoder's attention ``self_attn.to_k_lora.up.weight``, MLPs ``lora_linear_layer``."""
    out = {}
    for key, value in tensors.items():
        ab = "down" if ".lora_A." in key else "up"
        attn = re.match(r"(.*\.attn[12])\.(to_[qkv]|to_out)(\.0)?\.lora_[AB]\.weight$", key)
        te_attn = re.match(r"(text_encoder_2\..*self_attn)\.([qkv]|out)_proj\.lora_[AB]", key)
        if key.startswith("unet.") and attn:
            new = f"{attn[1]}.processor.{attn[2]}_lora.{ab}.weight"
        elif key.startswith("unet."):
            new = re.sub(r"\.lora_[AB]\.weight$", f".lora.{ab}.weight", key)
        elif te_attn:
            new = f"{te_attn[1]}.to_{te_attn[2]}_lora.{ab}.weight"
        else:
            new = re.sub(r"\.lora_[AB]\.weight$", f".lora_linear_layer.{ab}.weight", key)
        out[new] = value
    return out


def test_diffusers_reads_our_kohya_file_and_we_read_older_diffusers_files(
    sdxl: dict[str, Any], tmp_path: Path
) -> None:
    # diffusers' kohya conversion names the first encoder's attention adapters so that
    # transformers 5's CLIPTextModel drops them (it keeps its MLPs, the U-Net and the second
    # encoder), so that file's first-encoder adapters are its MLPs here.
    kohya = load_file(str(sdxl["files"]["kohya"]))
    mlp_only = {k: v for k, v in kohya.items() if not k.startswith("lora_te1_") or "_mlp_" in k}
    save_file(mlp_only, str(tmp_path / "kohya.safetensors"))
    old = old_diffusers_names(load_file(str(sdxl["files"]["diffusers"])))
    assert any(".processor.to_out_lora.up.weight" in k for k in old)
    assert any(".self_attn.to_k_lora.down.weight" in k for k in old)
    save_file(old, str(tmp_path / "old.safetensors"))
    for name in ("kohya", "old"):
        pipe = pipeline_xl(sdxl)
        pipe.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors")
        counts = lora_counts(pipe)
        want = sum(1 for k in (mlp_only if name == "kohya" else old) if "alpha" not in k)
        assert sum(counts.values()) == want and all(counts.values()), (name, counts)
        got = ours(sdxl, tmp_path, tmp_path / f"{name}.safetensors", extra=EULER)
        assert_close(got, theirs(pipe), f"{name} file, ours vs diffusers")


def test_bad_sdxl_lora_files_fail_in_one_line(
    sdxl: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    kohya = load_file(str(sdxl["files"]["kohya"]))
    bogus = {f"lora_unet_input_blocks_{i}_1_proj_in.lora_down.weight": torch.zeros(2, 2)
             for i in (7, 8, 9, 10)}  # fmt: skip
    cases = {
        "sd1_kohya": (
            {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 2)},
            "is from an SD 1.x/2.x kohya LoRA (lora_te_) but this model is SDXL",
        ),
        "sd1_diffusers": (  # SD1 puts attention at the first level, SDXL does not
            {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32)},
            "name no layer of this SDXL model's U-Net: 'unet.down_blocks.0.attentions.0.proj_in",
        ),
        "no_module": (
            {**kohya, **bogus},
            "4 key(s) name no layer of this SDXL model's U-Net: "
            "'lora_unet_input_blocks_10_1_proj_in.lora_down.weight'",
        ),  # fmt: skip
    }
    for name, (tensors, needle) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        message = run_bad(sdxl, tmp_path, capsys, tmp_path / f"{name}.safetensors")
        assert needle in message, (name, message)
    assert "(and 1 more)" in message  # no_module: three keys named, the count of the rest
    # the refiner has the second encoder only: first-encoder adapters are refused, the
    # second's merge into it
    refiner = {"folder": build_tiny_refiner(tmp_path / "refiner")}
    message = run_bad(refiner, tmp_path, capsys, sdxl["files"]["kohya"])
    assert "lora_te1_" in message and "SDXL refiner does not have" in message, message
    from ldm import assemble
    from ldm.lora_files import apply_lora_files

    te2 = tmp_path / "te2.safetensors"
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_te2_")}, str(te2))
    model, cfg = assemble.load_for_sampling(refiner["folder"])
    before = {k: v.clone() for k, v in model.text_encoder.text_encoder_2.state_dict().items()}
    apply_lora_files(model, cfg.model.unet, [str(te2)])
    after = model.text_encoder.text_encoder_2.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert len(changed) == len(sdxl["parts"]["text_encoder_2"]), changed  # each adapted weight


def pipeline_xl(sdxl: dict[str, Any]) -> Any:
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl["folder"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_counts(pipe: Any) -> dict[str, int]:
    return {
        part: sum("lora_" in n for n, _ in getattr(pipe, part).named_parameters())
        for part in ("unet", "text_encoder", "text_encoder_2")
    }
