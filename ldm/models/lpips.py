"""LPIPS perceptual distance with a VGG16 backbone (Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", eq. 1), in plain torch.

No torchvision and no downloads: weights come from ONE local file (safetensors, or a
``torch.load(weights_only=True)`` pickle) holding the VGG16 ``features.*`` (torchvision names)
and the linear heads ``lin0..lin4``. Names of the ``lpips`` package / taming-transformers
(``net.sliceK.I.*``, ``linK.model.1.weight``) are accepted too. Build that file once from
torchvision's ``vgg16-397923af.pth`` and LPIPS' ``vgg.pth`` (v0.1) with::

    python -m ldm.models.lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg16.safetensors
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["LPIPS", "convert_lpips_weights", "load_weights_file"]

# torchvision vgg16 ``features``: conv channels, "M" = 2x2 max-pool (indices follow torchvision).
_VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                               512, 512, 512, "M", 512, 512, 512]  # fmt: skip
_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_features() -> nn.Sequential:
    """VGG16 ``features`` up to relu5_3, with torchvision's layer indices (0..29)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in _VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            in_ch = int(item)
    return nn.Sequential(*layers)


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.load(weights_only=True)`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return dict(state.get("state_dict", state))


def _normalise_key(key: str) -> str | None:
    """Map torchvision / lpips / taming names to ours; None for entries we do not use."""
    key = key.removeprefix("module.").removeprefix("perceptual_loss.")
    if m := re.fullmatch(r"(?:net\.slice\d\.|vgg\.features\.|features\.)(\d+)\.(weight|bias)", key):
        return f"features.{m[1]}.{m[2]}" if int(m[1]) <= _TAPS[-1] else None
    if m := re.fullmatch(r"lin(\d)(?:\.model\.1)?\.weight", key):
        return f"lin{m[1]}.weight"
    return None  # classifier.*, scaling_layer.* (constants), ...


def convert_lpips_weights(*state_dicts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Merge VGG16 and LPIPS-head state dicts into our names (``features.I.*``, ``linK.weight``)."""
    out: dict[str, Tensor] = {}
    for state in state_dicts:
        for key, value in state.items():
            if (new := _normalise_key(key)) is not None:
                out[new] = value.detach().float().contiguous()
    return out


class LPIPS(nn.Module):
    """Learned perceptual distance d(x, x0) between images in [-1, 1] (Zhang et al. 2018, eq. 1):
    ``sum_l mean_hw || w_l * (f_l(x) - f_l(x0)) ||^2`` over unit-normalised VGG16 features.

    The module is frozen: parameters never require grad and it stays in eval mode through
    ``train()``. Gradients still flow to the inputs.

    Args:
        weights: Path to the weights file (see module docstring); None leaves random weights
            (tests only).
    """

    def __init__(self, weights: str | Path | None = None) -> None:
        super().__init__()
        # ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.features = _vgg16_features()
        for i, ch in enumerate(_CHANNELS):  # NetLinLayer: 1x1 conv to one channel, no bias
            self.add_module(f"lin{i}", nn.Conv2d(ch, 1, 1, bias=False))
        if weights is not None:
            self.load_file(weights)
        self.requires_grad_(False)
        self.eval()

    def load_file(self, path: str | Path) -> None:
        """Load VGG16 features and linear heads from ``path`` (strict: all must be present)."""
        state = convert_lpips_weights(load_weights_file(path))
        own = {k for k in self.state_dict() if k not in ("shift", "scale")}
        missing = sorted(own - state.keys())
        if missing:
            raise KeyError(f"LPIPS weights file {path} lacks {missing[:4]}... ({len(missing)})")
        self.load_state_dict(state, strict=False)

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode (a frozen metric), whatever ``mode`` says."""
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        """Unit-normalised features at relu1_2 ... relu5_3 of (B, 3, H, W) inputs."""
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        """Distance per image, shape (B, 1, 1, 1), for ``x``, ``x0`` (B, 3, H, W) in [-1, 1]."""
        feats = self._taps(torch.cat([x, x0]))  # one pass over both images
        total = x.new_zeros(x.shape[0], 1, 1, 1)
        for i, f in enumerate(feats):
            fx, fx0 = f.chunk(2)  # 2 x (B, C_l, H_l, W_l)
            lin = getattr(self, f"lin{i}")
            total = total + lin((fx - fx0).pow(2)).mean(dim=(2, 3), keepdim=True)
        return total


def _main() -> None:
    parser = argparse.ArgumentParser(description="Merge VGG16 + LPIPS weights into one file.")
    parser.add_argument("--vgg", required=True, help="torchvision vgg16 state dict (.pth)")
    parser.add_argument("--lin", required=True, help="LPIPS linear heads, e.g. lpips' vgg.pth")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    args = parser.parse_args()
    from safetensors.torch import save_file

    state = convert_lpips_weights(load_weights_file(args.vgg), load_weights_file(args.lin))
    LPIPS().load_state_dict(state, strict=False)  # shape check
    save_file(state, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")


if __name__ == "__main__":
    _main()
