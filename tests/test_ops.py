"""The op contracts: reference semantics checked against independent formulations, invariants,
torch.library registration (opcheck, meta tensors, torch.compile) and input validation.

Per-backend agreement with the reference lives in test_ops_cpp.py and test_kernels_*.py.
"""

import pytest
import torch
import torch.nn.functional as F

import supergen.ops as ops
from supergen import TileGrid, TilingConfig, reference
from supergen.ops import blend_scatter, halo_gather, masked_attention


def rand_canvas(B=2, C=3, T=2, H=12, W=10, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B, C, T, H, W), generator=g).to(dtype)


# -- halo_gather ------------------------------------------------------------------------------------


def test_torus_gather_equals_rolled_crop():
    """Independent formulation: a torus window is a crop of the canvas rolled to the window origin."""
    canvas = rand_canvas()
    origins = torch.tensor([[0, 0], [7, 3], [11, 9], [5, 8]])
    tiles = halo_gather(canvas, origins, (6, 5), halo=2, mode="torus").view(4, 2, 3, 2, 10, 9)
    for n, (oy, ox) in enumerate(origins.tolist()):
        rolled = torch.roll(canvas, shifts=(-(oy - 2), -(ox - 2)), dims=(3, 4))
        assert torch.equal(tiles[n], rolled[..., :10, :9])


@pytest.mark.parametrize("mode", ["zero", "replicate"])
def test_padded_gather_equals_padded_crop(mode):
    """Independent formulation: pad the canvas by `halo` with F.pad, then crop."""
    canvas = rand_canvas()
    halo = 3
    pad_mode = "constant" if mode == "zero" else "replicate"
    flat = canvas.flatten(0, 1)  # (B*C, T, H, W): F.pad replicate needs <= 5 dims
    padded = F.pad(flat, (halo, halo, halo, halo), mode=pad_mode).view(2, 3, 2, 12 + 2 * halo, 10 + 2 * halo)
    origins = torch.tensor([[0, 0], [6, 5], [4, 2]])
    tiles = halo_gather(canvas, origins, (6, 5), halo=halo, mode=mode).view(3, 2, 3, 2, 12, 11)
    for n, (oy, ox) in enumerate(origins.tolist()):
        assert torch.equal(tiles[n], padded[..., oy : oy + 12, ox : ox + 11])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("boundary", ["torus", "clamp"])
def test_gather_then_scatter_reconstructs_exactly_without_overlap(dtype, boundary):
    canvas = rand_canvas(H=24, W=30, dtype=dtype)
    grid = TileGrid((2, 24, 30), TilingConfig(tile=(8, 10), boundary=boundary), multiple=2)
    for step in range(4):
        origins = grid.at_step(step)
        tiles = halo_gather(canvas, origins, grid.tile)
        back = blend_scatter(tiles, origins, (24, 30), wrap=grid.wrap)
        assert torch.equal(back, canvas), f"step {step}"


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
def test_gather_then_scatter_reconstructs_within_rounding_with_overlap(ramp):
    canvas = rand_canvas(H=36, W=40)
    grid = TileGrid((2, 36, 40), TilingConfig(tile=(12, 16), overlap=(4, 4), ramp=ramp), multiple=2)
    for step in range(3):
        origins = grid.at_step(step)
        back = blend_scatter(halo_gather(canvas, origins, grid.tile), origins, (36, 40), grid.overlap, ramp)
        torch.testing.assert_close(back, canvas, atol=1e-6, rtol=1e-6)


def test_scatter_blends_two_overlapping_tiles_by_their_ramps():
    """Two 1-row tiles overlapping by 4 cells on a line: the fused value is the ramp-weighted mean."""
    a, b = torch.full((1, 1, 1, 1, 8), 1.0), torch.full((1, 1, 1, 1, 8), 3.0)
    fused = blend_scatter(torch.cat([a, b]), [[0, 0], [0, 4]], (1, 12), overlap=(0, 4), wrap=False)
    ramp = reference.blend_ramp(8, 4, "linear")  # 1/8, 3/8, 5/8, 7/8, 1, 1, 1, 1 ... reversed
    wa, wb = ramp[4:], ramp[:4]
    expected = torch.cat([torch.ones(4), (wa * 1 + wb * 3) / (wa + wb), torch.full((4,), 3.0)])
    torch.testing.assert_close(fused.flatten(), expected)
    assert torch.allclose(ramp[:4], torch.tensor([0.125, 0.375, 0.625, 0.875]))


def test_uncovered_cells_are_zero():
    tiles = torch.ones((1, 1, 1, 2, 2))
    fused = blend_scatter(tiles, [[0, 0]], (3, 3), wrap=False)
    assert fused.sum() == 4 and fused[..., 2, :].abs().sum() == 0


# -- masked_attention ---------------------------------------------------------------------------------


def qkv(B=1, H=2, Lq=150, Lk=130, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((B, H, L, D), generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def test_all_active_equals_sdpa():
    q, k, v = qkv()
    out = masked_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_inactive_rows_keep_out_and_invalid_keys_are_excluded():
    q, k, v = qkv()
    qmask = torch.tensor([True, False, True])  # rows 64..127 inactive
    kvmask = torch.tensor([False, True, True])  # keys 0..63 invalid
    sentinel = torch.full_like(q, 7.0)
    out = masked_attention(q, k, v, qmask, kvmask, out=sentinel.clone())
    assert torch.equal(out[:, :, 64:128], sentinel[:, :, 64:128])
    expected = F.scaled_dot_product_attention(q, k[:, :, 64:], v[:, :, 64:])
    torch.testing.assert_close(out[:, :, :64], expected[:, :, :64], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 128:], expected[:, :, 128:], atol=1e-5, rtol=1e-5)


def test_rows_without_valid_keys_are_zero_with_minus_inf_lse():
    q, k, v = qkv(Lk=64)
    lse = torch.zeros(q.shape[:3])
    out = masked_attention(q, k, v, kv_block_mask=torch.tensor([False]), out=torch.ones_like(q), lse=lse)
    assert out.abs().sum() == 0 and bool((lse == float("-inf")).all())


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = qkv(Lq=70, Lk=90, D=12)
    lse = torch.empty(q.shape[:3])
    masked_attention(q, k, v, lse=lse, scale=0.3)
    torch.testing.assert_close(lse, torch.logsumexp(0.3 * q @ k.transpose(-1, -2), -1), atol=1e-5, rtol=1e-5)


# -- torch.library registration --------------------------------------------------------------------------


def test_opcheck_all_ops():
    canvas = rand_canvas()
    origins = torch.tensor([[0, 0], [6, 5]])
    torch.library.opcheck(torch.ops.supergen.halo_gather, (canvas, origins, 6, 5, 1, "zero"))
    tiles = halo_gather(canvas, origins, (6, 5))
    torch.library.opcheck(torch.ops.supergen.blend_scatter, (tiles, origins, 12, 10, 1, 2, "cosine", True))
    q, k, v = qkv(Lq=70, Lk=70)
    masks = torch.ones((1, 2, 2), dtype=torch.bool)
    args = (q, k, v, masks, masks, torch.zeros_like(q), None, 0.25)
    torch.library.opcheck(torch.ops.supergen.masked_attention, args)


def test_meta_tensors_give_shapes_without_work():
    canvas = torch.empty((2, 16, 13, 270, 480), device="meta")
    origins = torch.zeros((9, 2), dtype=torch.int64, device="meta")
    tiles = halo_gather(canvas, origins, (90, 160), halo=8)
    assert tiles.shape == (18, 16, 13, 106, 176) and tiles.device.type == "meta"
    fused = blend_scatter(tiles[..., 8:-8, 8:-8], origins, (270, 480))
    assert fused.shape == (2, 16, 13, 270, 480)


def test_torch_compile_traces_ops_without_graph_breaks():
    canvas = rand_canvas()
    origins = torch.tensor([[0, 0], [6, 5]])

    def roundtrip(x, o):
        return blend_scatter(halo_gather(x, o, (6, 5)) * 2, o, (12, 10)) + 1

    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(canvas, origins), roundtrip(canvas, origins))


def test_forced_backend_and_unknown_backend():
    canvas = rand_canvas()
    with ops.backend("reference"):
        assert ops.selected_backend("halo_gather", "cpu") == "reference"
        halo_gather(canvas, [[0, 0]], (4, 4))
    with pytest.raises(ValueError, match="`backend` must be one of"):
        with ops.backend("cuda-magic"):
            pass
    assert set(ops.availability(load=False)) == {"reference", "cpp", "triton"}


# -- validation: every public entry rejects bad input before any work ------------------------------------

C = rand_canvas()
Q, K, V = qkv(Lq=70, Lk=70)
BAD_CALLS = [
    (lambda: halo_gather(C[0], [[0, 0]], 4), ValueError, r"`canvas` must have 5 dims"),
    (lambda: halo_gather(C.long(), [[0, 0]], 4), TypeError, r"`canvas` must be float32"),
    (lambda: halo_gather([1, 2], [[0, 0]], 4), TypeError, r"`canvas` must be a torch.Tensor"),
    (lambda: halo_gather(C, [[0, 0]], 0), ValueError, r"`tile_hw` must be >= 1"),
    (lambda: halo_gather(C, [[0, 0]], (4, 2.5)), TypeError, r"`tile_hw` must be an int or a pair"),
    (lambda: halo_gather(C, [[0, 0]], (13, 4)), ValueError, r"must not exceed the canvas 12x10"),
    (lambda: halo_gather(C, [[0, 0]], 4, halo=-1), ValueError, r"`halo` must be an int >= 0 but is -1"),
    (lambda: halo_gather(C, [[0, 0]], 4, mode="wrap"), ValueError, r"`mode` must be one of .* 'wrap'"),
    (lambda: halo_gather(C, [[0, 12]], 4), ValueError, r"`origins\[0\]` = \(0, 12\) is out of range"),
    (lambda: halo_gather(C, [[9, 0]], 4, mode="zero"), ValueError, r"row in \[0, 8\]"),
    (lambda: halo_gather(C, [[-1, 0]], 4), ValueError, r"out of range"),
    (lambda: halo_gather(C, [[0.5, 0]], 4), TypeError, r"`origins` must hold integers"),
    (lambda: halo_gather(C, [0, 0], 4), ValueError, r"`origins` must have shape \(N, 2\)"),
    (lambda: blend_scatter(C, [[0, 0]], (12, 10), overlap=(7, 1)), ValueError, r"at most half the tile"),
    (lambda: blend_scatter(C, [[0, 0]], (6, 10)), ValueError, r"must not exceed `canvas_hw`"),
    (lambda: blend_scatter(C, [[0, 0]] * 3, (12, 10)), ValueError, r"2 rows, which is not a multiple of the 3"),
    (lambda: blend_scatter(C, [[0, 0]], (12, 10), ramp="hann"), ValueError, r"`ramp` must be one of"),
    (lambda: blend_scatter(C, [[0, 0]], (12, 10), wrap=1), TypeError, r"`wrap` must be a bool"),
    (lambda: blend_scatter(C, [[0, 1]], (12, 10), wrap=False), ValueError, r"col in \[0, 0\]"),
    (lambda: blend_scatter(C, [[0, 0]], (12, -1)), ValueError, r"`canvas_hw` must be >= 1"),
    (lambda: masked_attention(Q[0], K, V), ValueError, r"`q` must have 4 dims"),
    (lambda: masked_attention(Q, K[:, :, :, :8], V), ValueError, r"`k` and `v` must both have shape"),
    (lambda: masked_attention(Q, K.half(), V), TypeError, r"must share one dtype"),
    (lambda: masked_attention(Q, K, V, torch.ones(3, dtype=torch.bool)), ValueError, r"one entry per 64-token"),
    (lambda: masked_attention(Q, K, V, torch.ones(2)), TypeError, r"`q_block_mask` must be a bool tensor"),
    (lambda: masked_attention(Q, K, V, None, torch.ones(2, 2, dtype=torch.bool)), ValueError, r"does not broadcast"),
    (lambda: masked_attention(Q, K, V, out=torch.zeros(1, 2, 70, 8)), ValueError, r"`out` must match `q`"),
    (lambda: masked_attention(Q, K, V, lse=torch.zeros(1, 2, 70).double()), ValueError, r"`lse` must be float32"),
    (lambda: masked_attention(Q, K, V, out=K), ValueError, r"`out` must not share memory with `k`"),
    (lambda: masked_attention(Q, K, V, scale=float("nan")), ValueError, r"`scale` must be a finite number"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS, ids=[f"bad{i}" for i in range(len(BAD_CALLS))])
def test_bad_input_raises_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_validation_happens_before_any_backend_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "halo_gather", lambda *a: calls.append(a))
    with ops.backend("reference"), pytest.raises(ValueError):
        halo_gather(C, [[0, 99]], 4)
    assert calls == []
