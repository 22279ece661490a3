"""ldm.nn.conv.Conv2d: the GEMM path for small CPU maps equals F.conv2d, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn import conv
from ldm.nn.conv import Conv2d


@pytest.mark.parametrize(
    "batch,channels,out,side,kernel,stride,bias",
    [
        (1, 64, 48, 4, 3, 1, True),  # the U-Net's deep levels at batch 1
        (1, 32, 32, 2, 3, 1, False),
        (2, 16, 24, 4, 3, 2, True),  # strided (Downsample), batch > 1
        (3, 8, 8, 3, 3, 1, True),  # odd side
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_path_matches_conv2d(
    batch: int,
    channels: int,
    out: int,
    side: int,
    kernel: int,
    stride: int,
    bias: bool,
    channels_last: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conv, "GEMM_MIN_WEIGHT", 0)  # small layers here; the rule is tested below
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layer = Conv2d(channels, out, kernel, stride=stride, padding=kernel // 2, bias=bias)
    layer.to(memory_format=fmt)
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=fmt).requires_grad_()
    assert layer._gemm_pays(x)
    y = layer(x)
    assert y.is_contiguous(memory_format=fmt)
    reference = F.conv2d(x, layer.weight, layer.bias, stride, kernel // 2)
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *layer.parameters()], grad)
    want = torch.autograd.grad(reference, [x, *layer.parameters()], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_gemm_path_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = conv.gemm_conv2d
    monkeypatch.setattr(conv, "gemm_conv2d", lambda *a: calls.append(1) or original(*a))
    Conv2d(8, 8, 3, padding=1)(torch.randn(1, 8, 8, 8))  # a small weight: F.conv2d
    assert calls == []
    monkeypatch.setattr(conv, "GEMM_MIN_WEIGHT", 8 * 8 * 9)
    layer = Conv2d(8, 8, 3, padding=1)
    layer(torch.randn(1, 8, 8, 8))  # 64 output pixels, a large enough weight: GEMM
    assert calls == [1]
    layer(torch.randn(2, 8, 8, 8))  # 128: F.conv2d
    layer(torch.randn(1, 8, 16, 16))
    Conv2d(8, 8, 1)(torch.randn(1, 8, 2, 2))  # 1x1 kernels gain nothing
    assert calls == [1]


def test_same_parameters_as_nn_conv2d() -> None:
    ours, theirs = Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)
    assert isinstance(ours, nn.Conv2d)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
