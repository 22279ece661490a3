"""PSNR/SSIM agree with scikit-image's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm.eval.reconstruction import psnr, ssim


def test_psnr_and_ssim_match_skimage() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    for i in range(2):
        a, b = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        ref_psnr = peak_signal_noise_ratio(
            a.astype(np.float64), b.astype(np.float64), data_range=2.0
        )
        ref_ssim = structural_similarity(
            a,
            b,
            data_range=2.0,
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert psnr(y, x)[i].item() == pytest.approx(ref_psnr, rel=1e-4)
        assert ssim(y, x)[i].item() == pytest.approx(ref_ssim, abs=1e-4)
    assert ssim(x, x).min().item() == pytest.approx(1.0, abs=1e-5)


def test_reconstruction_cli_missing_checkpoint_is_one_line(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from ldm.eval.reconstruction import main

    assert main(["--ckpt", str(tmp_path / "none.safetensors"), "--shards", "x.tar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]
