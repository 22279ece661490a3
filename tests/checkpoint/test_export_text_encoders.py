"""Export of non-CLIP text encoders and layer choices: diffusers' StableDiffusionPipeline, loaded
from our export, conditions exactly as we do; masked models are refused in one line saying why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ldm.checkpoint.diffusers_layout import export_diffusers_folder
from ldm.config import load
from ldm.export import main
from tests.checkpoint.test_stable_diffusion import (
    LETTERS,
    WIDTH,
    tiny_clip_dir,
    tiny_config,
    tiny_model,
)

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:ClipTextEncoder. prompt of")


def tiny_bert_dir(root: Path) -> Path:
    """A random 3-layer BertModel and a word-piece tokenizer over a-z, saved to ``root``."""
    root.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, "probe", "prompt"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(root / "vocab.txt"), model_max_length=12).save_pretrained(root)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(root)
    return root


def pipeline_embeddings(folder: Path, prompts: list[str]) -> torch.Tensor:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return embeds


@pytest.mark.parametrize(
    ("kind", "layer"), [("hf", "last"), ("hf", "penultimate"), ("hf", "1"), ("clip", "penultimate")]
)
def test_exported_text_encoder_conditions_as_ours(tmp_path: Path, kind: str, layer: str) -> None:
    config: dict[str, Any] = tiny_config(tiny_clip_dir(tmp_path / "clip"))
    if kind == "hf":
        config["model"]["text_encoder"] = {
            "kind": "hf",
            "name_or_path": str(tiny_bert_dir(tmp_path / "bert")),
            "max_length": 12,
            "layer": layer,
        }
    else:
        config["model"]["text_encoder"]["layer"] = layer
    model = tiny_model(config)
    folder = export_diffusers_folder(model, load(base=config), tmp_path / "pipe")
    prompts = ["a b c", "probe prompt z"]
    theirs = pipeline_embeddings(folder, prompts)
    ours, _ = model.text_encoder.encode(prompts)
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() <= 1e-5


def test_masked_model_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's set-up (a BERT-like encoder, penultimate layer, context mask): the mask is why."""
    from ldm.checkpoint.format import save_checkpoint

    config: dict[str, Any] = tiny_config(tiny_clip_dir(tmp_path / "clip"))
    config["model"]["text_encoder"] = {
        "kind": "hf",
        "name_or_path": str(tiny_bert_dir(tmp_path / "bert")),
        "max_length": 12,
        "layer": "penultimate",
    }
    config["model"]["use_context_mask"] = True
    model = tiny_model(config)
    ckpt = save_checkpoint(
        tmp_path / "m.safetensors",
        {"unet": model.unet.state_dict(), "autoencoder": model.autoencoder.state_dict()},
        config,
        "ldm",
    )
    # an override of the mask cannot help: the model is rebuilt from the checkpoint's config
    assert (
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "model.use_context_mask=false"])
        == 2
    )
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1
    assert "trained with model.use_context_mask=true" in err[0]
    assert "passes no encoder_attention_mask" in err[0]
