"""Tests of the SD1/SD2 text-encoder key mappings on tiny random CLIP text models.

open_clip is not needed: `RefOpenClipText` below re-implements its text tower with its exact
parameter names (`nn.MultiheadAttention` gives `attn.in_proj_weight` etc.), so the SD2 mapping is
checked for meaning (same outputs), not only for being a bijection of names.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ldm.checkpoint.text_keys import (
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    clip_text_config_kwargs,
    convert_hf_clip_to_open_clip,
    convert_open_clip_to_hf_clip,
    detect_text_encoder_layout,
    extract_sd1_clip,
    keys_for_model,
)
from ldm.models.openclip_encoder import open_clip_text_forward

transformers = pytest.importorskip("transformers")

WIDTH, HEADS, LAYERS, CONTEXT, VOCAB, PROJ = 32, 4, 3, 12, 50, 24


def _config(hidden_act: str, layers: int = LAYERS) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=layers,
        num_attention_heads=HEADS, max_position_embeddings=CONTEXT, hidden_act=hidden_act,
        projection_dim=PROJ, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1, pad_token_id=0,
    )  # fmt: skip


def _canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hub-file keys (`text_model.` level) whatever the installed transformers nests."""
    return {
        k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v.clone()
        for k, v in model.state_dict().items()
        if not k.endswith("position_ids")
    }


def _hidden(model: nn.Module, ids: torch.Tensor, layer: str) -> torch.Tensor:
    """HF CLIP output as `ClipTextEncoder` takes it: final norm after the last/penultimate layer."""
    with torch.no_grad():
        if layer == "last":
            return model(input_ids=ids).last_hidden_state
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        return getattr(model, "text_model", model).final_layer_norm(hidden)


class RefBlock(nn.Module):
    """open_clip's `ResidualAttentionBlock` (pre-norm attention and GELU MLP), same names."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=batch_first)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(WIDTH, 4 * WIDTH), gelu=nn.GELU(), c_proj=nn.Linear(4 * WIDTH, WIDTH)
            )
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefOpenClipText(nn.Module):
    """open_clip `CLIP`'s text tower with its parameter names (no vision tower)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, WIDTH)
        self.positional_embedding = nn.Parameter(torch.randn(CONTEXT, WIDTH) * 0.01)
        self.transformer = nn.Module()
        self.transformer.batch_first = batch_first
        self.transformer.resblocks = nn.ModuleList(RefBlock(batch_first) for _ in range(LAYERS))
        self.ln_final = nn.LayerNorm(WIDTH)
        self.text_projection = nn.Parameter(torch.randn(WIDTH, PROJ))
        self.logit_scale = nn.Parameter(torch.ones([]))
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB - 2, (2, CONTEXT), generator=generator)
    ids[:, 0], ids[0, 5], ids[1, -1] = VOCAB - 2, VOCAB - 1, VOCAB - 1  # start / end tokens
    return ids


@pytest.mark.parametrize("old_layout", [False, True])
def test_sd1_clip_extraction(ids: torch.Tensor, old_layout: bool) -> None:
    torch.manual_seed(0)
    source = transformers.CLIPTextModel(_config("quick_gelu")).eval()
    canonical = _canonical_state(source)
    checkpoint = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    for key, value in canonical.items():
        name = key.removeprefix("text_model.") if old_layout else key
        checkpoint[SD1_CLIP_PREFIX + name] = value
    checkpoint[SD1_CLIP_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(CONTEXT)[None]
    assert detect_text_encoder_layout(checkpoint) == "clip"

    extracted = extract_sd1_clip(checkpoint)
    assert extracted.keys() == canonical.keys()
    kwargs = clip_text_config_kwargs(extracted, num_attention_heads=HEADS)
    assert (kwargs["num_hidden_layers"], kwargs["hidden_act"]) == (LAYERS, "quick_gelu")
    target = transformers.CLIPTextModel(_config("quick_gelu")).eval()
    target.load_state_dict(keys_for_model(extracted, target), strict=True)
    for layer in ("last", "penultimate"):
        torch.testing.assert_close(
            _hidden(target, ids, layer), _hidden(source, ids, layer), rtol=0, atol=0
        )
    with pytest.raises(KeyError, match="no text encoder keys"):
        extract_sd1_clip({"model.diffusion_model.x": torch.zeros(1)})


def test_config_kwargs_build_a_loadable_model() -> None:
    torch.manual_seed(0)
    canonical = _canonical_state(transformers.CLIPTextModelWithProjection(_config("gelu")))
    kwargs = clip_text_config_kwargs(canonical, hidden_act="gelu", num_attention_heads=HEADS)
    assert kwargs == {
        "vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": 4 * WIDTH,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "max_position_embeddings": CONTEXT, "hidden_act": "gelu", "projection_dim": PROJ,
    }  # fmt: skip
    model = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**kwargs))
    model.load_state_dict(keys_for_model(canonical, model), strict=True)


def test_sd2_open_clip_round_trip_is_exact(ids: torch.Tensor) -> None:
    torch.manual_seed(0)
    source = transformers.CLIPTextModelWithProjection(_config("gelu")).eval()
    canonical = _canonical_state(source)
    open_clip_sd = convert_hf_clip_to_open_clip(canonical)
    open_clip_sd[SD2_OPEN_CLIP_PREFIX + "logit_scale"] = torch.ones([])
    assert detect_text_encoder_layout(open_clip_sd) == "openclip"

    reference = RefOpenClipText(batch_first=True)
    expected_keys = {SD2_OPEN_CLIP_PREFIX + k for k in reference.state_dict()}
    assert open_clip_sd.keys() == expected_keys
    in_proj = open_clip_sd[SD2_OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]
    assert in_proj.shape == (3 * WIDTH, WIDTH)
    assert open_clip_sd[SD2_OPEN_CLIP_PREFIX + "text_projection"].shape == (WIDTH, PROJ)

    back = convert_open_clip_to_hf_clip(open_clip_sd, include_projection=True)
    assert back.keys() == canonical.keys()
    for key, value in canonical.items():
        assert torch.equal(back[key], value), key
    without_projection = convert_open_clip_to_hf_clip(open_clip_sd)
    assert without_projection.keys() == canonical.keys() - {"text_projection.weight"}

    target = transformers.CLIPTextModel(_config("gelu")).eval()
    target.load_state_dict(keys_for_model(without_projection, target), strict=True)
    torch.testing.assert_close(
        _hidden(target, ids, "penultimate"), _hidden(source, ids, "penultimate"), rtol=0, atol=0
    )


def test_sd2_drop_last_layer_is_diffusers_text_encoder(ids: torch.Tensor) -> None:
    """diffusers' SD2 text_encoder (N-1 layers), last layer == full model's penultimate."""
    torch.manual_seed(0)
    source = transformers.CLIPTextModel(_config("gelu")).eval()
    open_clip_sd = convert_hf_clip_to_open_clip(_canonical_state(source))
    cut = convert_open_clip_to_hf_clip(open_clip_sd, drop_last_layer=True)
    target = transformers.CLIPTextModel(_config("gelu", layers=LAYERS - 1)).eval()
    target.load_state_dict(keys_for_model(cut, target), strict=True)
    torch.testing.assert_close(
        _hidden(target, ids, "last"), _hidden(source, ids, "penultimate"), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_open_clip_forward_matches_hf_clip(
    ids: torch.Tensor, batch_first: bool, layer: str
) -> None:
    """SD2 FrozenOpenCLIPEmbedder computation on open_clip weights == HF CLIP on converted ones."""
    torch.manual_seed(0)
    reference = RefOpenClipText(batch_first).eval()
    open_clip_sd = {SD2_OPEN_CLIP_PREFIX + k: v for k, v in reference.state_dict().items()}
    hf = transformers.CLIPTextModel(_config("gelu")).eval()
    hf.load_state_dict(keys_for_model(convert_open_clip_to_hf_clip(open_clip_sd), hf), strict=True)
    with torch.no_grad():
        ours = open_clip_text_forward(reference, ids, layer)
        short = open_clip_text_forward(reference, ids[:, :7], layer)
    expected = _hidden(hf, ids, layer)
    error = (ours - expected).abs().max().item()
    assert error < 1e-5, error
    torch.testing.assert_close(short, ours[:, :7], rtol=1e-5, atol=1e-5)  # causal: prefix-stable


def test_unexpected_keys_are_reported() -> None:
    with pytest.raises(KeyError, match="no open_clip text blocks"):
        convert_open_clip_to_hf_clip({SD2_OPEN_CLIP_PREFIX + "ln_final.weight": torch.ones(2)})
    bad = {
        SD2_OPEN_CLIP_PREFIX + "transformer.resblocks.0.ln_1.weight": torch.ones(2),
        SD2_OPEN_CLIP_PREFIX + "transformer.resblocks.0.ls_1.gamma": torch.ones(2),
    }
    with pytest.raises(KeyError, match="ls_1.gamma"):
        convert_open_clip_to_hf_clip(bad)
