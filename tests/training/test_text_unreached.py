"""Text-encoder training freezes what the output never reaches (a pooler; with a penultimate
layer, the last block), so every trained weight gets a gradient each step, as DDP's default
find_unused_parameters=False requires; older checkpoints with never-trained adapters there load."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ldm import build
from ldm.checkpoint.format import CheckpointError, load_checkpoint, save_checkpoint
from ldm.config import load
from ldm.models.lora import add_lora
from ldm.text_tuning import load_text_encoder_weights, trainable_text_encoder

ROOT = Path(__file__).resolve().parents[2]
OWN = ROOT / "configs" / "examples" / "own-images" / "ldm.yaml"  # the shipped MiniLM, 6 layers
LORA = ["model.lora.text_encoder=true", "model.lora.rank=4",
        "model.lora.text_encoder_targets=['*.query','*.key','*.value']"]  # fmt: skip


def encoder(overrides: list[str], layer: str) -> torch.nn.Module:
    cfg = load([OWN], [*overrides, f"model.text_encoder.layer={layer}", "data.cached=false",
                       "model.autoencoder_ckpt=x", "data.train_shards=x"])  # fmt: skip
    return trainable_text_encoder(build.build_text_encoder(cfg.model.text_encoder), cfg.model)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_every_trained_weight_gets_a_gradient(mode: str, layer: str) -> None:
    te = encoder(["model.train_text_encoder=true"] if mode == "full" else LORA, layer)
    trained = {n for n, p in te.named_parameters() if p.requires_grad}
    te.encode(["a photo of a cat", "two dogs"])[0].sum().backward()
    assert trained and all(p.grad is not None for p in te.parameters() if p.requires_grad)
    assert not any("pooler" in n for n in trained)
    last_block = [n for n in trained if ".layer.5." in n]
    assert bool(last_block) is (layer == "last")  # the penultimate layer never reads block 6
    if mode == "lora":
        assert all("lora_" in n for n in trained)


def test_untrained_adapters_of_older_checkpoints_load(tmp_path: Path) -> None:
    te = encoder(LORA, "penultimate")
    old = encoder(["model.train_text_encoder=false"], "penultimate")  # as before: adapters on
    add_lora(old.model, 4, 4.0, targets=["*.query", "*.key", "*.value"])  # every layer
    state = {k: v for k, v in old.state_dict().items() if "lora_" in k}
    assert any(".layer.5." in k for k in state) and not any(".layer.5." in k and "lora_" in k
                                                            for k in te.state_dict())  # fmt: skip
    path = save_checkpoint(tmp_path / "old.safetensors", {"text_encoder": state}, {}, "ldm")
    load_text_encoder_weights(SimpleNamespace(text_encoder=te), load_checkpoint(path))
    key = next(k for k in state if ".layer.5." in k and k.endswith("lora_up.weight"))
    state[key] = torch.ones_like(state[key])  # a trained adapter there would be lost: refused
    path = save_checkpoint(tmp_path / "bad.safetensors", {"text_encoder": state}, {}, "ldm")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_text_encoder_weights(SimpleNamespace(text_encoder=te), load_checkpoint(path))


def test_clip_at_penultimate_freezes_its_last_layer(tmp_path: Path) -> None:
    """SD2's layout: CLIP (OpenCLIP converted) read at its penultimate layer, then the norm."""
    from omegaconf import OmegaConf

    from ldm.models.text_encoders import build_text_encoder
    from tests.models.test_text_encoders import _tiny_clip

    te = build_text_encoder("clip", name_or_path=str(_tiny_clip(tmp_path / "clip")),
                            max_length=16, layer="penultimate")  # fmt: skip
    m = OmegaConf.create({"train_text_encoder": True, "lora": {"text_encoder": False},
                          "text_encoder": {"kind": "clip"}})  # fmt: skip
    te = trainable_text_encoder(te, m)
    frozen = {n for n, p in te.named_parameters() if not p.requires_grad}
    assert frozen and all(".layers.1." in n for n in frozen)  # the last of 2 layers, not the norm
    te.encode(["the red"])[0].sum().backward()
    assert all(p.grad is not None for p in te.parameters() if p.requires_grad)


def test_text_lora_at_penultimate_trains_resumes_and_samples(
    shapes_data: dict[str, str], tmp_path: Path
) -> None:
    """The user's path: train.py with text-encoder LoRA on the MiniLM read at its penultimate
    layer (adapters of the unreached last block folded away), then --resume, then sample.py."""
    import sample
    import train

    args = ["-c", str(ROOT / "configs" / "ldm" / "tiny.yaml"), *LORA,
            "model.text_encoder.layer=penultimate", f"data.train_shards={shapes_data['train']}",
            "data.num_workers=0", "logging.logger=csv", "logging.image_every_n_steps=0",
            "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            f"run.root={tmp_path}", "run.name=te", "trainer.max_steps=2"]  # fmt: skip
    assert train.main(args) == 0
    assert train.main(["--resume", str(tmp_path / "te"), "trainer.max_steps=3"]) == 0
    ckpt = tmp_path / "te" / "checkpoints" / "last.safetensors"
    keys = [k for k in load_checkpoint(ckpt).tensors if k.startswith("text_encoder.")]
    assert keys and all("lora_" in k and ".layer.5." not in k for k in keys)
    out = tmp_path / "samples"
    assert sample.main(["--ckpt", str(ckpt), "--prompt", "a red circle", "--steps", "2",
                        "--outdir", str(out)]) == 0  # fmt: skip
    assert (out / "grid.png").is_file()
