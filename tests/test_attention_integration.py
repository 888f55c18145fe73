"""supergen attention inside diffusers models: tiny Wan (dispatcher backend) and CogVideoX (processor).

Each model's output with our attention must equal its stock output (fp32, tight tolerance) on both the
Triton kernel (interpreter on CPU) and the reference backend; block masks must reach the op; and
enabling must leave no trace (stock processors back, diffusers' global backend untouched).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from helpers import tiny_wan_transformer

import supergen.ops as ops
from supergen import attention as sa

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_dispatch import (  # noqa: E402
    AttentionBackendName,
    _AttentionBackendRegistry,
    attention_backend,
)

BACKENDS = ["reference", "triton"]
ATOL = 2e-5  # fp32 end to end: attention differs from SDPA by rounding only (~5e-7)
#: CUDA when present (the compiled kernel), else the CPU (conftest sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch):
    """One kernel config per launch: autotuning every tiny shape would dominate a GPU run."""
    monkeypatch.setenv("SUPERGEN_NO_AUTOTUNE", "1")


@pytest.fixture(autouse=True)
def global_backend_untouched():
    """diffusers keeps a process-global active backend: no test may leave it changed."""
    before = _AttentionBackendRegistry._active_backend
    yield
    after = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend(before)
    assert after == before, f"diffusers' global attention backend changed from {before} to {after}"


def tiny_wan():
    return tiny_wan_transformer()


def wan_inputs(frames=2, size=16, seed=1):
    """Video (1, 16, T, H, W) → T·(H/2)·(W/2) tokens (128 for the default: two 64-blocks)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 16, frames, size, size), generator=g)
    text = torch.randn((1, 7, 16), generator=g)
    return {"hidden_states": x, "timestep": torch.tensor([500]), "encoder_hidden_states": text}


def tiny_cogvideox(rope: bool):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16 if rope else 8,
        in_channels=16,
        out_channels=16,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=1,
        max_text_seq_length=16,
        sample_height=8,
        sample_width=8,
        sample_frames=5,
        use_rotary_positional_embeddings=rope,
    ).eval()


def cogvideox_inputs(rope: bool, seed=1):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = torch.Generator().manual_seed(seed)
    T, H, W = 2, 8, 8
    inputs = {
        "hidden_states": torch.randn((1, T, 16, H, W), generator=g),  # CogVideoX: (B, T, C, H, W)
        "encoder_hidden_states": torch.randn((1, 16, 16), generator=g),
        "timestep": torch.tensor([500]),
    }
    if rope:
        gh, gw = H // 2, W // 2
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(16, ((0, 0), (gh, gw)), (gh, gw), T)
    return inputs


def forward(model, inputs):
    """The model's output on DEVICE (model and inputs moved there; tuples of tensors too)."""
    inputs = {
        k: dev(v) if isinstance(v, torch.Tensor) else tuple(map(dev, v)) if isinstance(v, tuple) else v
        for k, v in inputs.items()
    }
    with torch.no_grad():
        return model.to(DEVICE)(**inputs, return_dict=False)[0]


# -- same output as stock attention -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_wan_matches_stock_attention(backend):
    model, inputs = tiny_wan(), wan_inputs()
    stock = forward(model, inputs)
    sa.enable_masked_attention(model)
    with ops.backend(backend):
        ours = forward(model, inputs)
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=1e-5)
    sa.disable_masked_attention(model)
    assert torch.equal(forward(model, inputs), stock)


@pytest.mark.parametrize("rope", [False, True], ids=["sincos", "rope"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cogvideox_matches_stock_attention(backend, rope):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    model, inputs = tiny_cogvideox(rope), cogvideox_inputs(rope)
    stock = forward(model, inputs)
    sa.enable_masked_attention(model)
    assert all(isinstance(p, sa.CogVideoXMaskedAttnProcessor) for p in model.attn_processors.values())
    with ops.backend(backend):
        ours = forward(model, inputs)
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=1e-5)
    sa.disable_masked_attention(model)
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in model.attn_processors.values())
    assert torch.equal(forward(model, inputs), stock)


def test_global_backend_context_routes_any_dispatcher_model():
    """After registration, diffusers' own `attention_backend("supergen")` works like a built-in."""
    model, inputs = tiny_wan(), wan_inputs()
    stock = forward(model, inputs)
    sa.register_backend()
    calls = []
    with ops.backend("reference"), _spy(calls), attention_backend(sa.BACKEND_NAME):
        ours = forward(model, inputs)
    assert len(calls) == 2  # self- and cross-attention of the one block
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=1e-5)


# -- block masks reach the op ---------------------------------------------------------------------------


class _spy:
    """Record the masks every supergen.ops.masked_attention call receives."""

    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        self.original = sa.ops.masked_attention

        def recording(q, k, v, q_block_mask=None, kv_block_mask=None, **kw):
            self.calls.append((tuple(q.shape), tuple(k.shape), q_block_mask, kv_block_mask))
            return self.original(q, k, v, q_block_mask, kv_block_mask, **kw)

        sa.ops.masked_attention = recording
        return self

    def __exit__(self, *exc):
        sa.ops.masked_attention = self.original


def test_masks_apply_to_video_sequences_only():
    model, inputs = tiny_wan(), wan_inputs()  # 128 video tokens, 7 text tokens
    sa.enable_masked_attention(model)
    q_mask = dev(torch.tensor([True, False]))
    kv_mask = dev(torch.tensor([False, True]))
    calls = []
    with ops.backend("reference"), _spy(calls), sa.attention_masks(q_mask, kv_mask, seq_len=128):
        forward(model, inputs)
    (self_q, self_k, sq, sk), (cross_q, cross_k, cq, ck) = calls
    assert self_k[2] == 128 and sq is q_mask and sk is kv_mask
    assert cross_k[2] == 7 and cq is q_mask and ck is None  # text keys: all valid
    calls.clear()
    with ops.backend("reference"), _spy(calls), sa.attention_masks(q_mask, kv_mask, seq_len=100):
        forward(model, inputs)
    assert all(c[2] is None and c[3] is None for c in calls)  # no sequence of 100 tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_outputs_fill_inactive_blocks(backend):
    """Region-cache use: compute all blocks once, then only some; rows of the others come from the cache."""
    model, inputs = tiny_wan(), wan_inputs()
    stock = forward(model, inputs)
    sa.enable_masked_attention(model)
    outputs = []
    with ops.backend(backend):
        with sa.attention_masks(dev(torch.tensor([True, True])), seq_len=128, outputs=outputs):
            first = forward(model, inputs)
        assert len(outputs) == 2
        buffers = [o.data_ptr() for o in outputs]
        with sa.attention_masks(dev(torch.tensor([False, True])), seq_len=128, outputs=outputs):
            second = forward(model, inputs)  # same inputs: cached rows are exact
        other = wan_inputs(seed=7)
        with sa.attention_masks(dev(torch.tensor([False, False])), seq_len=128, outputs=outputs):
            stale = forward(model, other)  # every attention row from the cache of `inputs`
    assert [o.data_ptr() for o in outputs] == buffers, "cache buffers must be updated in place"
    torch.testing.assert_close(first, stock, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(second, stock, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(stale, forward(model, other), atol=1e-3), "masks must reach the kernel"


def test_outputs_of_another_shape_raise():
    model = sa.enable_masked_attention(tiny_wan())
    outputs, two_blocks = [], dev(torch.ones(2, dtype=torch.bool))
    with sa.attention_masks(two_blocks, outputs=outputs):
        forward(model, wan_inputs())  # 2 x 8 x 8 = 128 tokens
    with pytest.raises(ValueError, match="same-shape forwards"), sa.attention_masks(two_blocks, outputs=outputs):
        forward(model, wan_inputs(frames=3, size=12))  # 3 x 6 x 6 = 108 tokens: two blocks again


# -- model masks ----------------------------------------------------------------------------------------


def sdpa_blhd(q, k, v, mask=None):
    """SDPA in diffusers' (B, L, H, D) layout."""
    t = [x.transpose(1, 2) for x in (q, k, v)]
    return torch.nn.functional.scaled_dot_product_attention(*t, attn_mask=mask).transpose(1, 2)


def backend_fn():
    return _AttentionBackendRegistry._backends[sa.register_backend()]


@pytest.mark.parametrize("kind", ["bool-4d", "bool-2d", "additive-inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding_masks_run_on_the_kernel(backend, kind):
    """Padding at the end of the keys (per batch element) is exact as attention over a key prefix."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (dev(torch.randn((2, 130, 2, 12), generator=g)) for _ in range(3))
    keep = dev(torch.ones(2, 130, dtype=torch.bool))
    keep[0, 100:] = False  # batch 0: 100 keys; batch 1: all 130
    mask = {
        "bool-4d": keep[:, None, None, :],
        "bool-2d": keep,
        "additive-inf": dev(torch.zeros(2, 1, 1, 130)).masked_fill(~keep[:, None, None, :], float("-inf")),
    }[kind]
    calls = []
    with warnings.catch_warnings(), ops.backend(backend), _spy(calls):
        warnings.simplefilter("error")  # no SDPA fallback
        out = backend_fn()(q, k, v, attn_mask=mask)
    assert [c[1][2] for c in calls] == [100, 130]  # one call per batch element, on its key prefix
    torch.testing.assert_close(out, sdpa_blhd(q, k, v, keep[:, None, None, :]), atol=2e-6, rtol=1e-5)
    # Block masks combine with key padding: query block 1 of batch 0 inactive, key block 0 invalid.
    q_mask = dev(torch.tensor([[True, False, True], [True, True, True]]))
    kv_mask = dev(torch.tensor([False, True, True]))
    with ops.backend(backend), sa.attention_masks(q_mask, kv_mask):
        out = backend_fn()(q, k, v, attn_mask=mask)
    keep_blocks = keep.clone()
    keep_blocks[:, :64] = False
    expected = sdpa_blhd(q, k, v, keep_blocks[:, None, None, :])
    expected[0, 64:128] = 0  # not computed, no cache: zero
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_other_model_masks_fall_back_to_sdpa_explicitly():
    q, k, v = (dev(torch.randn(1, 70, 2, 12)) for _ in range(3))
    holes = dev(torch.ones(1, 1, 1, 70, dtype=torch.bool))
    holes[..., 10:20] = False  # not a suffix: not expressible
    fn = backend_fn()
    sa._warned.clear()
    with pytest.warns(UserWarning, match="scaled_dot_product_attention instead"):
        out = fn(q, k, v, attn_mask=holes)
    torch.testing.assert_close(out, sdpa_blhd(q, k, v, holes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per kind, not per call
        fn(q, k, v, attn_mask=holes)
    bias = dev(torch.zeros(1, 1, 1, 70)).masked_fill(~holes, -10000.0)  # LTX-style finite bias: not a mask
    with pytest.warns(UserWarning):
        torch.testing.assert_close(fn(q, k, v, attn_mask=bias), sdpa_blhd(q, k, v, bias))
    with (
        pytest.raises(ValueError, match="cannot combine block masks"),
        sa.attention_masks(dev(torch.tensor([True, False]))),
    ):
        fn(q, k, v, attn_mask=holes)
    with pytest.raises(ValueError, match="only for plain attention, but the call passes attn_mask"):
        fn(q, k, v, attn_mask=holes, return_lse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_exp_for_context_parallel_attention(backend):
    """With ``return_lse`` (what diffusers' ring attention asks of a backend to merge the partial results
    of each key/value shard) the backend returns SDPA's output and the rows' natural log-sum-exp in
    diffusers' (B, Lq, H) layout; the backend says diffusers may run it under context parallelism."""
    g = torch.Generator().manual_seed(5)
    q = dev(torch.randn((2, 70, 2, 12), generator=g))
    k, v = (dev(torch.randn((2, 90, 2, 12), generator=g)) for _ in range(2))
    with ops.backend(backend):
        out, lse = backend_fn()(q, k, v, scale=0.3, return_lse=True)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v), atol=ATOL, rtol=0)
    assert lse.shape == (2, 70, 2) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1).transpose(1, 2), atol=ATOL, rtol=0)
    assert _AttentionBackendRegistry._is_context_parallel_available(sa.register_backend())
    with (
        pytest.raises(ValueError, match="cannot apply to a shard"),
        sa.attention_masks(dev(torch.tensor([True, False]))),
    ):
        backend_fn()(q, k, v, return_lse=True)


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 6, 6),
    ).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hunyuan_video_with_text_padding_matches_stock(backend):
    """HunyuanVideo always passes a joint [video; text] key-padding mask: it must run on our kernel."""
    g = torch.Generator().manual_seed(1)
    text_mask = torch.ones(2, 10, dtype=torch.long)
    text_mask[0, 6:] = 0  # batch 0: 6 text tokens, batch 1: 10
    inputs = {
        "hidden_states": torch.randn((2, 4, 2, 16, 16), generator=g),  # 2 x 8 x 8 = 128 video tokens
        "timestep": torch.tensor([500, 500]),
        "encoder_hidden_states": torch.randn((2, 10, 16), generator=g),
        "encoder_attention_mask": text_mask,
        "pooled_projections": torch.randn((2, 8), generator=g),
        "guidance": torch.tensor([3500.0, 3500.0]),
    }
    model = tiny_hunyuan()
    stock = forward(model, inputs)
    sa.enable_masked_attention(model)
    calls = []
    with ops.backend(backend), _spy(calls), warnings.catch_warnings():
        warnings.simplefilter("error")  # no SDPA fallback: the padding is a key suffix per batch element
        ours = forward(model, inputs)
    # Two blocks (dual- and single-stream) x two batch elements, each on its own key prefix; the
    # text-only token refiner keeps its stock SDPA processor.
    assert sorted(c[1][2] for c in calls) == [128 + 6, 128 + 6, 128 + 10, 128 + 10]
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=1e-5)


def test_ltx_video_matches_stock_with_explicit_fallback_for_its_bias():
    """LTX self-attention runs on the kernel; its cross-attention text bias (-10000, per head) is not
    a mask the kernel can express, so those calls go to SDPA with a warning, and the output is stock."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    ).eval()
    g = torch.Generator().manual_seed(1)
    T, H, W = 2, 8, 8
    inputs = {
        "hidden_states": torch.randn((1, T * H * W, 8), generator=g),  # LTX: packed (B, T*H*W, C)
        "encoder_hidden_states": torch.randn((1, 7, 16), generator=g),
        "timestep": torch.tensor([500]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]]),
        "num_frames": T,
        "height": H,
        "width": W,
    }
    stock = forward(model, inputs)
    sa.enable_masked_attention(model)
    sa._warned.clear()
    calls = []
    with ops.backend("triton"), _spy(calls), pytest.warns(UserWarning, match="not key padding"):
        ours = forward(model, inputs)
    assert [c[1][2] for c in calls] == [T * H * W]  # the self-attention
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=1e-5)


# -- switching on and off ----------------------------------------------------------------------------------


def test_enable_is_idempotent_and_disable_restores_stock():
    model = tiny_wan()
    before = [p._attention_backend for p in model.attn_processors.values()]
    sa.enable_masked_attention(model)
    sa.enable_masked_attention(model)
    assert sa.is_enabled(model)
    assert all(p._attention_backend == AttentionBackendName(sa.BACKEND_NAME) for p in model.attn_processors.values())
    sa.disable_masked_attention(model)
    sa.disable_masked_attention(model)
    assert not sa.is_enabled(model)
    assert [p._attention_backend for p in model.attn_processors.values()] == before
    assert sa.register_backend() is sa.register_backend()
    assert list(AttentionBackendName).count(AttentionBackendName(sa.BACKEND_NAME)) == 1


def test_unsupported_models_raise():
    with pytest.raises(TypeError, match="no diffusers attention modules"):
        sa.enable_masked_attention(torch.nn.Linear(2, 2))
    cog = tiny_cogvideox(rope=False)
    cog.fuse_qkv_projections()
    with pytest.raises(TypeError, match="unfuse"):
        sa.enable_masked_attention(cog)


def test_import_supergen_does_not_import_diffusers():
    code = "import sys, supergen, supergen.attention; sys.exit('diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
