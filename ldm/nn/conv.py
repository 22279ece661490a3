"""A ``Conv2d`` that runs weight-bound convolutions on the CPU as one GEMM.

At batch 1 the U-Net's deepest levels are 1280-2560 channels on 2×2 to 8×8 maps: each 3×3
convolution reads a 15-30M-parameter weight to produce 4-64 output pixels. PyTorch sends those
with at most 20,480 input elements to its native kernel (``_slow_conv2d``, whose backward
zero-fills the weight gradient before accumulating into it) and larger ones to oneDNN, which
reorders the weight into its blocked layout on every call. Written as im2col and one GEMM —
``out = W · unfold(x)`` with ``W`` the (C_out, C_in·k·k) weight matrix (Chellapilla et al. 2006,
"High Performance Convolutional Neural Networks for Document Processing", Sec. 2) — the weight is
read once in its own layout, and the backward is two GEMMs written straight into fresh gradients.
Measured on the 2-core sandbox (fp32, one thread, forward + backward): 2560→1280 channels at
4×4, 157 → 74 ms; 1280→1280 at 8×8, 98 → 72 ms; at 2×2, 38 → 30 ms; forward alone equal or
faster. 1×1 kernels gain nothing and keep ``F.conv2d``.

The path is taken only where it pays — CPU, ``groups == 1``, zero padding, a kernel larger than
1×1, a weight of at least :data:`GEMM_MIN_WEIGHT` elements and at most
:data:`GEMM_MAX_PIXELS` output pixels over the batch — elsewhere (GPUs, large
maps) this is ``nn.Conv2d``. Parameters and their names are ``nn.Conv2d``'s, so checkpoints are
unchanged; results equal ``F.conv2d``'s up to float summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Largest batch × output height × width sent to the GEMM path (the 8×8 level at batch 1).
GEMM_MAX_PIXELS = 64
#: Smallest weight (elements) sent to the GEMM path: only weight-bound layers gain (SD1's
#: smallest at ≤ 64 output pixels is 640→640 3×3, 3.7M); small models (the demo, tests) keep
#: F.conv2d and its rounding, which sampling with x̂0 clipping amplifies step after step.
GEMM_MIN_WEIGHT = 2**20


def gemm_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (groups 1) as im2col + GEMM.

    Args:
        x: Input (N, C_in, H, W).
        weight: (C_out, C_in, kh, kw).
        bias: (C_out,) or None.
        stride, padding, dilation: As ``F.conv2d`` (pairs).

    Returns:
        (N, C_out, H_out, W_out).
    """
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, K, L)
    if weight.is_contiguous() or not weight.is_contiguous(memory_format=torch.channels_last):
        matrix = weight.flatten(1)  # (C_out, K), K = C_in·kh·kw: a view of an NCHW weight
    else:  # a channels-last weight is (C_out, kh, kw, C_in) in memory: match its order
        matrix = weight.permute(0, 2, 3, 1).flatten(1)  # a view, K = kh·kw·C_in
        cols = cols.unflatten(1, (x.shape[1], kh * kw)).transpose(1, 2).flatten(1, 2)
    cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (K, N·L): a view at batch 1
    out = matrix @ cols if bias is None else torch.addmm(bias[:, None], matrix, cols)
    return out.view(-1, n, h_out, w_out).transpose(0, 1).contiguous()  # no copy at batch 1


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that takes :func:`gemm_conv2d` for small, weight-bound CPU convolutions."""

    def _gemm_pays(self, x: torch.Tensor) -> bool:
        if (
            x.device.type != "cpu"
            or x.dim() != 4
            or self.groups != 1
            or self.padding_mode != "zeros"
            or isinstance(self.padding, str)
            or self.kernel_size == (1, 1)
            or self.weight.numel() < GEMM_MIN_WEIGHT
        ):
            return False
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        dh, dw = self.dilation
        h_out = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w_out = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return x.shape[0] * h_out * w_out <= GEMM_MAX_PIXELS

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self._gemm_pays(input):
            # im2col of a channels-last input is slow; these maps are small, so reorder them.
            last = (
                input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
            )
            out = gemm_conv2d(
                input.contiguous(), weight, bias, self.stride, self.padding, self.dilation
            )
            return out.contiguous(memory_format=torch.channels_last) if last else out
        return super()._conv_forward(input, weight, bias)
