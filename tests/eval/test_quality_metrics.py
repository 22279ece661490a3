"""FID/KID/CLIP score: closed forms, parity with torchmetrics on the same features, the FID
Inception against torch-fidelity's reference extractor on the same (random) weights, and the
one-line errors of the loaders."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldm.eval.fid import FeatureStats, fid_from_features, frechet_distance, kid, load_stats
from ldm.eval.inception import FIDInceptionV3, load_fid_inception, resize_bilinear_tf1

DIM = 6


def random_inception(path: Path) -> Path:
    """FID Inception with random weights and BatchNorm statistics, saved as a state dict."""
    torch.manual_seed(0)
    model = FIDInceptionV3()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
        for p in model.parameters():
            p.normal_(0, 0.05 if p.dim() > 1 else 0.1)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_inception(tmp_path_factory.mktemp("inception") / "pt_inception.pth")


# torch-fidelity is installed outside the import path (make install: `pip install --no-deps
# --target .venv/reference`): its package __init__ imports torchvision, and torchmetrics would
# import it too once it is importable. Its Inception extractor itself needs only torch.
REFERENCE = Path(sys.prefix) / "reference" / "torch_fidelity"


def _torch_fidelity_extractor() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3, imported without the package __init__."""
    if not (REFERENCE / "feature_extractor_inceptionv3.py").is_file():
        pytest.skip(f"torch-fidelity is not at {REFERENCE} (make install puts it there)")
    saved = {k: v for k, v in sys.modules.items() if k.startswith("torch_fidelity")}
    pkg = types.ModuleType("torch_fidelity")
    pkg.__path__ = [str(REFERENCE)]
    sys.modules["torch_fidelity"] = pkg
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:  # leave no half package behind for torchmetrics' import checks
        for k in [k for k in sys.modules if k.startswith("torch_fidelity")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return module.FeatureExtractorInceptionV3


def test_inception_features_equal_torch_fidelity(inception_file: Path) -> None:
    reference = _torch_fidelity_extractor()(
        "inception-v3-compat",
        ["2048", "logits"],
        feature_extractor_weights_path=str(inception_file),
    )
    ours = load_fid_inception(inception_file)
    images = (torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(1)) * 255).byte()
    with torch.no_grad():
        ref_features, ref_logits = reference(images)
        features, logits = ours(images), ours(images, logits=True)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert (features - ref_features).abs().max() <= 1e-5 * ref_features.abs().max()
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    # Our [-1, 1] float convention is quantised to the same 0-255 pixels first.
    with torch.no_grad():
        assert torch.equal(ours(images.float() / 127.5 - 1), features)


def test_inception_layout_is_the_reference_file_layout() -> None:
    state = FIDInceptionV3().state_dict()
    assert (
        sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)
        == 23_850_960
    )  # pt_inception-2015-12-05, 1008 classes
    assert state["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state and "AuxLogits.fc.weight" not in state


def test_tf1_resize_is_asymmetric_and_exact_on_integer_scales() -> None:
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    up = resize_bilinear_tf1(x, 8)  # source = destination * 4/8, no half-pixel shift
    assert torch.allclose(up[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    assert torch.equal(resize_bilinear_tf1(x, 4), x)


def test_inception_load_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05") as e:
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception layout"):
        load_fid_inception(tmp_path / "other.pth")

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True") as e:
        load_fid_inception(tmp_path / "evil.pth")
    assert "\n" not in str(e.value)


def _gaussian(n: int, mu: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.multivariate_normal(mu, cov, size=n))


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt a - sqrt b)^2.
    a, b = rng.uniform(0.1, 2, DIM), rng.uniform(0.1, 2, DIM)
    mu1, mu2 = rng.normal(size=DIM), rng.normal(size=DIM)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # General (non-commuting) covariances: Tr((S1 S2)^1/2) = sum sqrt eig(S1^1/2 S2 S1^1/2).
    m1, m2 = rng.normal(size=(DIM, DIM)), rng.normal(size=(DIM, DIM))
    s1, s2 = m1 @ m1.T, m2 @ m2.T
    w1, v1 = np.linalg.eigh(s1)
    root1 = (v1 * np.sqrt(w1)) @ v1.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)
    # Near-singular (rank 2 of 6, as with fewer samples than dimensions): finite, >= 0, and
    # equal to the same distance computed in the 2-d subspace the covariances live in.
    basis = np.linalg.qr(rng.normal(size=(DIM, 2)))[0]
    c1, c2 = np.diag([1.0, 0.5]), np.diag([2.0, 0.25])
    zero = np.zeros(DIM)
    d = frechet_distance(zero, basis @ c1 @ basis.T, zero, basis @ c2 @ basis.T)
    # Round-off eigenvalues (~1e-16) of the null space contribute their square roots (~1e-8).
    assert d == pytest.approx(((np.sqrt([1.0, 0.5]) - np.sqrt([2.0, 0.25])) ** 2).sum(), abs=1e-6)
    with pytest.raises(ValueError, match="statistics do not match"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_sampled_fid_converges_to_the_closed_form() -> None:
    mu2 = np.full(DIM, 0.5)
    a = _gaussian(20000, np.zeros(DIM), np.eye(DIM), 0)
    b = _gaussian(20000, mu2, 4 * np.eye(DIM), 1)
    expected = DIM * 0.25 + DIM * (1 - 2) ** 2  # ||mu||^2 + sum (1 - 2)^2
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.03)


class _Passthrough(nn.Module):
    """A 'feature extractor' for torchmetrics that hands the features through unchanged."""

    num_features = DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fid_and_kid_equal_torchmetrics_on_the_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _gaussian(300, np.zeros(DIM), np.eye(DIM), 2).float()
    fake = _gaussian(200, np.full(DIM, 0.3), 1.5 * np.eye(DIM), 3).float()
    metric = FrechetInceptionDistance(feature=_Passthrough(), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(float(metric.compute()), rel=1e-4)
    # One subset of the whole smaller set: no random choice on either side for the fake set.
    k = KernelInceptionDistance(feature=_Passthrough(), subsets=1, subset_size=200, normalize=True)
    k.update(real[:200], real=True)
    k.update(fake, real=False)
    theirs, _ = k.compute()
    ours, std = kid(real[:200], fake, subsets=1, subset_size=200)
    assert ours == pytest.approx(float(theirs), rel=1e-4) and std == 0.0


def test_kid_is_unbiased_for_equal_distributions() -> None:
    values = [
        kid(
            _gaussian(100, np.zeros(DIM), np.eye(DIM), s),
            _gaussian(100, np.zeros(DIM), np.eye(DIM), 100 + s),
            subsets=1,
        )[0]
        for s in range(40)
    ]
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    shifted = kid(
        _gaussian(100, np.zeros(DIM), np.eye(DIM), 0),
        _gaussian(100, np.ones(DIM), np.eye(DIM), 1),
        subsets=10,
    )
    assert shifted[0] > 10 * np.std(values)


def test_feature_stats_stream_and_save(tmp_path: Path) -> None:
    x = _gaussian(50, np.zeros(DIM), np.eye(DIM), 4)
    stats = FeatureStats(DIM)
    for chunk in x.split(7):
        stats.update(chunk)
    mu, sigma = stats.mean_cov()
    assert np.allclose(mu, x.numpy().mean(0)) and np.allclose(sigma, np.cov(x.numpy().T))
    mu2, sigma2 = load_stats(stats.save(tmp_path / "ref.npz"))
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="ldm.eval.stats"):
        load_stats(tmp_path / "none.npz")
    np.savez(tmp_path / "bad.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="lacks 'mu'"):
        load_stats(tmp_path / "bad.npz")


def tiny_clip(root: Path) -> Path:
    import transformers

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    tokenizer.save_pretrained(root)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(root)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": len(vocab) - 2,
            "eos_token_id": len(vocab) - 1,
            "pad_token_id": len(vocab) - 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(root)
    return root


def test_clip_score_matches_the_clip_model_forward(tmp_path: Path) -> None:
    """Our score against CLIPModel's own forward (image_embeds/text_embeds, both normalised)
    with CLIPProcessor's preprocessing: torchmetrics' definition, max(100 cos, 0). (torchmetrics
    1.9's clip_score itself does not run on transformers 5: get_image_features' return type.)"""
    import transformers

    from ldm.eval.clip_score import CLIPScorer, clip_score_from_embeddings

    path = tiny_clip(tmp_path / "clip")
    images = (torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 255).byte()
    prompts = ["a red circle", "the blue square", "green"]
    ours = CLIPScorer(path).scores(images, prompts)
    model = transformers.CLIPModel.from_pretrained(path).eval()
    processor = transformers.CLIPProcessor.from_pretrained(path)
    inputs = processor(
        text=prompts,
        images=[im.permute(1, 2, 0).numpy() for im in images],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model(**inputs)
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    assert torch.allclose(ours, (100 * cos).clamp_min(0), atol=1e-4)
    assert (ours > 0).any()
    # Closed form on constructed embeddings: 100 cos, clipped at 0.
    e = torch.eye(3)
    text = torch.stack([e[0], (e[0] + e[1]) / 2**0.5, -e[2]])
    assert torch.allclose(clip_score_from_embeddings(e, text), torch.tensor([100, 100 / 2**0.5, 0]))
    with pytest.raises(FileNotFoundError, match="CLIPModel.save_pretrained"):
        CLIPScorer(tmp_path / "nothing")
