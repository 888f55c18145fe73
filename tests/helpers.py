"""Shared test utilities."""

from __future__ import annotations

import torch

#: (atol, rtol) per dtype for comparing a backend with the fp32-accumulating reference: fp32 agrees
#: to rounding; half types differ by about one output rounding step (2^-11 fp16, 2^-8 bf16).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_verbose_close(actual: torch.Tensor, expected: torch.Tensor, atol=None, rtol=None, what: str = ""):
    """``torch.testing.assert_close`` that also reports the mismatch count and first indices."""
    atol_d, rtol_d = TOLERANCES.get(expected.dtype, (1e-5, 1e-5))
    atol = atol_d if atol is None else atol
    rtol = rtol_d if rtol is None else rtol
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double().cpu(), expected.double().cpu()
    bad = ~((a - e).abs() <= atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs diff {float((a - e).abs().nan_to_num(float('inf')).max()):.3e}; first at {idx}: "
            f"{[(float(a[tuple(i)]), float(e[tuple(i)])) for i in idx]}"
        )


def tiny_wan_transformer(**overrides):
    """A unit-test-sized WanTransformer3DModel (random weights, seed 0, eval mode)."""
    from diffusers import WanTransformer3DModel

    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=16,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
    )
    config.update(overrides)
    torch.manual_seed(0)
    return WanTransformer3DModel(**config).eval()
