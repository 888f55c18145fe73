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


LTX_CHANNELS, LTX_TEXT_LEN, LTX_TEXT_DIM = 8, 8, 16


def tiny_ltx_pipeline(cls=None, timestep_conditioning: bool = False):
    """A tiny LTX-Video pipeline (``cls``, default ``LTXPipeline``): VAE 4x spatial and temporal (two
    scaling levels), one transformer block, random weights (seed 0). Its scheduler records what each
    step is given in ``scheduler.seen`` (the guided prediction, t, x_t)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    class RecordingFlowMatchEuler(FlowMatchEulerDiscreteScheduler):
        def step(self, model_output, timestep, sample, *args, **kwargs):
            self.seen.append((model_output.clone(), timestep, sample.clone()))
            return super().step(model_output, timestep, sample, *args, **kwargs)

    C = LTX_CHANNELS
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        latent_channels=C, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        patch_size=1, patch_size_t=1, timestep_conditioning=timestep_conditioning,
    )  # fmt: skip
    with torch.no_grad():  # non-trivial normalisation, so that a missing (de)normalisation shows
        vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, C))
        vae.latents_std.copy_(torch.linspace(0.5, 2.0, C))
    transformer = LTXVideoTransformer3DModel(
        in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        num_layers=1, caption_channels=LTX_TEXT_DIM,
    )  # fmt: skip
    # LTX-Video's scheduler shifts by the sequence length (its base length lowered to a tiny video's)
    scheduler = RecordingFlowMatchEuler(use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=4096,
                                        base_shift=0.95, max_shift=2.05, shift_terminal=0.1)  # fmt: skip
    scheduler.seen = []
    cls = LTXPipeline if cls is None else cls
    return cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)


def ltx_text() -> dict:
    """Prompt and negative-prompt embeddings (and masks) for :func:`tiny_ltx_pipeline`, seeded."""
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(1, LTX_TEXT_LEN)
    mask[:, 6:] = 0  # padded prompt tokens, as the T5 encoder returns them
    return dict(
        prompt_embeds=torch.randn(1, LTX_TEXT_LEN, LTX_TEXT_DIM, generator=g),
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(1, LTX_TEXT_LEN, LTX_TEXT_DIM, generator=g),
        negative_prompt_attention_mask=torch.ones(1, LTX_TEXT_LEN),
    )
