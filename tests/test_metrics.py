"""Fidelity measures: PSNR and SSIM against independent expectations."""

import math

import pytest
import torch

from supergen.metrics import psnr, ssim


def test_psnr_of_known_noise():
    x = torch.zeros(1, 3, 4, 16, 16)
    y = x + 0.1  # mse 0.01 over a data range of 2: 10 log10(4 / 0.01)
    assert psnr(y, x) == pytest.approx(10 * math.log10(400), abs=1e-5)  # 0.1 is not exact in fp32
    assert psnr(x, x) == math.inf


def test_ssim_identity_and_degradation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 3, 2, 32, 32), generator=g) * 2 - 1
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    light = ssim(x + 0.05 * torch.randn(x.shape, generator=g), x)
    heavy = ssim(x + 0.5 * torch.randn(x.shape, generator=g), x)
    assert 1.0 > light > heavy > 0.0
    assert ssim(x + 0.5, x) < 1.0  # a luminance shift alone lowers it


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="must have one shape"):
        psnr(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="must have one shape"):
        ssim(torch.zeros(2, 2), torch.zeros(2, 3))
