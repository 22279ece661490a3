"""Original SD 1.x/2.x single files: tiny random weights in the CompVis layout load exactly.

Also home of the tiny SD-like set-up (U-Net, autoencoder, CLIP text model + tokenizer saved to
disk, config) that tests/checkpoint/test_diffusers_layout.py and tests/test_pipeline_parity.py
import.
"""

from __future__ import annotations

import copy
import json
import string
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from ldm import assemble, build
from ldm.checkpoint.format import CheckpointError
from ldm.checkpoint.text_keys import convert_hf_clip_to_open_clip
from ldm.config import load
from ldm.diffusion import NoiseSchedule

pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
WIDTH, MAX_LEN = 32, 16
LETTERS = list(string.ascii_lowercase)
PROMPTS = ["the red", "a b c d e f g h i j k l m n o p q r s t"]  # the second is truncated
SD1_UNET = dict(
    model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
    num_heads=4, context_dim=WIDTH,
)  # fmt: skip
SD2_UNET = dict(
    model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
    num_heads=-1, num_head_channels=16, context_dim=WIDTH, use_linear_in_transformer=True,
    upcast_attention=True,
)  # fmt: skip
AUTOENCODER = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=32, scale_factor=0.18215)


# ---------------------------------------------------------------------------------------------
# The tiny set-up (shared with the diffusers and pipeline-parity tests)
# ---------------------------------------------------------------------------------------------


def tiny_clip_dir(
    root: Path, layers: int = 2, hidden_act: str = "quick_gelu", seed: int = 0
) -> Path:
    """A random CLIPTextModel and a byte-less BPE tokenizer over a-z, saved to ``root``."""
    vocab = LETTERS + [c + "</w>" for c in LETTERS]
    vocab += ["th", "the</w>", "re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\nr e\nre d</w>\n")
    tokenizer = transformers.CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=MAX_LEN
    )
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=32, hidden_act=hidden_act,
        bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.CLIPTextModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def tiny_config(clip_dir: Path, sd2: bool = False, prediction: str = "eps") -> dict[str, Any]:
    """A full ldm config (plain dict) for the tiny set-up; ``sd2``: SD2-style U-Net and the
    penultimate CLIP layer."""
    return {
        "task": "ldm",
        "model": {
            "unet": dict(SD2_UNET if sd2 else SD1_UNET),
            "autoencoder": dict(AUTOENCODER),
            "diffusion": {
                "schedule": "scaled_linear",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "num_timesteps": 1000,
                "prediction": prediction,
            },
            "text_encoder": {
                "kind": "clip",
                "name_or_path": str(clip_dir),
                "max_length": MAX_LEN,
                "layer": "penultimate" if sd2 else "last",
            },
            "use_context_mask": False,
        },
        "data": {"image_size": 16},
        "sampling": {"sampler": "ddim", "steps": 10, "guidance": 5.0},
    }


def write_yaml(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def perturb(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Add noise to every parameter (SD zero-initialises output layers; parity needs them live)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def tiny_model(config: dict[str, Any], seed: int = 0) -> Any:
    """A ``LatentDiffusion`` with random (perturbed) U-Net and autoencoder weights."""
    torch.manual_seed(seed)
    model = build.build_latent_diffusion(load(base=config))
    perturb(model.unet, seed + 1)
    perturb(model.autoencoder, seed + 2)
    return model.eval()


def hf_text_state(text_model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical transformers CLIP keys (``text_model.`` level, as hub and SD1 files have)."""
    return {
        (k if k.startswith("text_model.") else "text_model." + k): v
        for k, v in text_model.state_dict().items()
    }


def sd_layout(
    model: Any, text: str = "clip", ema_unet: nn.Module | None = None, ema_subset: int | None = None
) -> dict[str, torch.Tensor]:
    """The model's weights as an original SD checkpoint holds them (written out independently
    of the loader: prefixes, LitEma names, schedule buffers, open_clip text tower for SD2)."""
    sd: dict[str, torch.Tensor] = {}
    sd.update({f"model.diffusion_model.{k}": v for k, v in model.unet.state_dict().items()})
    sd.update(
        {
            f"first_stage_model.{k}": v
            for k, v in model.autoencoder.state_dict().items()
            if k != "scale_factor"
        }
    )  # SD v1/v2 keep scale_factor in the YAML
    hf = hf_text_state(model.text_encoder.model)
    if text == "clip":
        sd.update({f"cond_stage_model.transformer.{k}": v for k, v in hf.items()})
        sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(32)[
            None
        ]
    else:
        sd.update(convert_hf_clip_to_open_clip(hf, "cond_stage_model.model."))
        sd["cond_stage_model.model.text_projection"] = torch.randn(WIDTH, 8)
        sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    if ema_unet is not None:
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
        items = list(ema_unet.named_parameters())[:ema_subset]
        sd.update({"model_ema.diffusion_model" + k.replace(".", ""): v.detach() for k, v in items})
    schedule = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)
    sd["alphas_cumprod"] = schedule.alphas_cumprod.clone()
    sd["betas"] = 1 - schedule.alphas_cumprod / torch.cat(
        [torch.ones(1), schedule.alphas_cumprod[:-1]]
    )
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


def save_sd_file(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """``.safetensors`` as is, anything else as a Lightning-style ``{"state_dict": ...}``."""
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 1234, "epoch": 3}, path)
    return path


def unet_inputs(context_dim: int = WIDTH, seed: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return x, torch.tensor([17.0, 903.0]), torch.randn(2, MAX_LEN, context_dim, generator=g)


def assert_same_state(a: nn.Module | dict, b: nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sd1")
    config = tiny_config(tiny_clip_dir(root / "clip"))
    model = tiny_model(config, seed=0)
    ema = perturb(copy.deepcopy(model.unet), seed=9)
    return {
        "root": root,
        "config": config,
        "yaml": write_yaml(config, root / "cfg.yaml"),
        "model": model,
        "ema": ema,
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_file_loads_exactly_with_ema(sd1: dict[str, Any], suffix: str) -> None:
    src, ema = sd1["model"], sd1["ema"]
    path = save_sd_file(sd_layout(src, "clip", ema_unet=ema), sd1["root"] / f"m{suffix}")
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd_layout(src, ema_unet=ema)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, cfg = assemble.load_for_sampling(path, [sd1["yaml"]])
    assert not [w for w in caught if "alphas_cumprod" in str(w.message)]  # schedule matches
    assert cfg.model.autoencoder.scale_factor == pytest.approx(0.18215)
    assert_same_state(model.unet, ema)
    assert_same_state(model.autoencoder, src.autoencoder)
    assert float(model.autoencoder.scale_factor) == pytest.approx(0.18215)
    assert_same_state(model.text_encoder, src.text_encoder)

    x, t, ctx = unet_inputs()
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, context=ctx), ema(x, t, context=ctx))
        assert not torch.equal(model.unet(x, t, context=ctx), src.unet(x, t, context=ctx))
        assert torch.equal(model.decode_latents(x), src.decode_latents(x))
        ours, mask = model.text_encoder.encode(PROMPTS)
        ref, ref_mask = src.text_encoder.encode(PROMPTS)
    assert torch.equal(ours, ref) and torch.equal(mask, ref_mask)

    raw, _ = assemble.load_for_sampling(path, [sd1["yaml"]], use_ema=False)
    assert_same_state(raw.unet, src.unet)


def test_missing_or_partial_ema(sd1: dict[str, Any]) -> None:
    src, root = sd1["model"], sd1["root"]
    no_ema = save_sd_file(sd_layout(src), root / "no_ema.safetensors")
    model, _ = assemble.load_for_sampling(no_ema, [sd1["yaml"]], use_ema=True)
    assert_same_state(model.unet, src.unet)

    partial = save_sd_file(
        sd_layout(src, ema_unet=sd1["ema"], ema_subset=5), root / "partial.safetensors"
    )
    with pytest.raises(CheckpointError, match="partial EMA"):
        assemble.load_for_sampling(partial, [sd1["yaml"]])
    model, _ = assemble.load_for_sampling(partial, [sd1["yaml"]], use_ema=False)
    assert_same_state(model.unet, src.unet)

    only = {
        k: v
        for k, v in sd_layout(src, ema_unet=sd1["ema"]).items()
        if not k.startswith("model.diffusion_model.")
    }
    ema_only = save_sd_file(only, root / "ema_only.safetensors")
    model, _ = assemble.load_for_sampling(ema_only, [sd1["yaml"]])
    assert_same_state(model.unet, sd1["ema"])
    with pytest.raises(CheckpointError, match="no U-Net weights"):
        assemble.load_for_sampling(ema_only, [sd1["yaml"]], use_ema=False)


def test_sd2_open_clip_text_tower(tmp_path: Path) -> None:
    """SD2: open_clip keys → HF CLIP; penultimate of N layers (= last of N − 1), pad id 0."""
    config = tiny_config(tiny_clip_dir(tmp_path / "clip", 3, "gelu"), sd2=True, prediction="v")
    src = tiny_model(config, seed=3)
    path = save_sd_file(sd_layout(src, "openclip"), tmp_path / "sd2.safetensors")
    model, cfg = assemble.load_for_sampling(path, [write_yaml(config, tmp_path / "sd2.yaml")])
    assert cfg.model.diffusion.prediction == "v" and model.prediction == "v"
    assert_same_state(model.unet, src.unet)
    assert_same_state(model.text_encoder, src.text_encoder)

    encoder = model.text_encoder
    assert encoder.tokenizer.pad_token_id == 0  # open_clip pads with 0 ("!"), as SD2 trained
    tokens = encoder.tokenize(PROMPTS)
    assert (tokens.ids[0, tokens.mask[0].sum() :] == 0).all()
    context, _ = encoder.encode(PROMPTS)
    hidden = src.text_encoder.model(input_ids=tokens.ids, output_hidden_states=True)
    body = getattr(src.text_encoder.model, "text_model", src.text_encoder.model)
    expected = body.final_layer_norm(hidden.hidden_states[-2])
    assert (context - expected).abs().max().item() <= 1e-6

    # diffusers' SD2 text encoder layout: N − 1 layers, layer=last, same conditioning
    short = tiny_config(tiny_clip_dir(tmp_path / "clip2", 2, "gelu"), sd2=True, prediction="v")
    short["model"]["text_encoder"]["layer"] = "last"
    model2, _ = assemble.load_for_sampling(path, [write_yaml(short, tmp_path / "short.yaml")])
    assert (model2.text_encoder.encode(PROMPTS)[0] - context).abs().max().item() <= 1e-6

    short["model"]["text_encoder"]["layer"] = "penultimate"
    with pytest.raises(CheckpointError, match="3 layers with layer=penultimate"):
        assemble.load_for_sampling(path, [write_yaml(short, tmp_path / "bad.yaml")])


def test_refuses_pickled_code_and_bad_files(sd1: dict[str, Any], tmp_path: Path) -> None:
    sd = sd_layout(sd1["model"])
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd, "callback": copy.copy}, evil)  # a global: needs unpickling
    with pytest.raises(CheckpointError, match="weights_only=True"):
        assemble.load_for_sampling(evil, [sd1["yaml"]])
    no_vae = save_sd_file(
        {k: v for k, v in sd.items() if not k.startswith("first_stage")},
        tmp_path / "no_vae.safetensors",
    )
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        assemble.load_for_sampling(no_vae, [sd1["yaml"]])
    with pytest.raises(CheckpointError, match="does not fit model.unet"):
        assemble.load_for_sampling(
            save_sd_file(sd, tmp_path / "ok.safetensors"),
            [sd1["yaml"]],
            ["model.unet.num_res_blocks=2"],
        )
    with pytest.warns(UserWarning, match="alphas_cumprod"):
        assemble.load_for_sampling(
            tmp_path / "ok.safetensors", [sd1["yaml"]], ["model.diffusion.beta_end=0.02"]
        )


def test_sd_configs_state_stable_diffusion() -> None:
    """configs/ldm/sd{1,2}.yaml: full ldm configs whose U-Net is unet-sd{1,2}.yaml's."""
    for name, context, prediction, layer in (
        ("sd1", 768, "eps", "last"),
        ("sd2", 1024, "v", "penultimate"),
    ):
        cfg = load([ROOT / "configs" / "ldm" / f"{name}.yaml"])
        unet = load([ROOT / "configs" / "ldm" / f"unet-{name}.yaml"]).model.unet
        assert cfg.task == "ldm" and cfg.model.unet == unet
        assert cfg.model.unet.context_dim == context
        assert cfg.model.autoencoder.scale_factor == 0.18215
        assert list(cfg.model.autoencoder.ch_mult) == [1, 2, 4, 4]
        d = cfg.model.diffusion
        assert (d.schedule, d.beta_start, d.beta_end, d.num_timesteps, d.prediction) == (
            "scaled_linear",
            0.00085,
            0.012,
            1000,
            prediction,
        )
        t = cfg.model.text_encoder
        assert (t.kind, t.layer, t.max_length) == ("clip", layer, 77)
        assert not cfg.model.use_context_mask
        s = cfg.sampling
        assert (s.sampler, s.steps, s.guidance, s.timestep_spacing) == ("ddim", 50, 7.5, "leading")
