"""Triton ``halo_gather`` and ``blend_scatter`` against ``supergen.reference``.

Without a GPU the kernels run in the Triton interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` before they are defined), so shapes are small and blocks are 16-128 wide:
the interpreter's cost is per program, and the multi-block cases force small blocks on purpose to
exercise every edge mask. The gather is a copy and must be bit-exact; the blend must agree with the
fp32-accumulating reference to fp32 rounding (fp16/bf16: one output rounding step, tests/helpers.py).
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
from helpers import assert_verbose_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supergen import ops, reference

pytest.importorskip("triton")
# The package re-exports the launchers under the module names, so fetch the modules themselves.
halo_gather_mod = importlib.import_module("supergen.kernels.halo_gather")
blend_scatter_mod = importlib.import_module("supergen.kernels.blend_scatter")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _seed(*params) -> int:
    """A per-case seed stable across processes (``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(params).encode())


def _canvas(shape, dtype, layout: str, gen: torch.Generator) -> torch.Tensor:
    """A ``(B, C, T, H, W)`` canvas with the requested memory layout (values are what matter)."""
    B, C, T, H, W = shape
    if layout == "contiguous":
        base = torch.randn(shape, generator=gen)
    elif layout == "permuted":  # channels-last-like: W is not the fastest axis in memory
        base = torch.randn((T, B, H, W, C), generator=gen).permute(1, 4, 0, 2, 3)
    else:  # "strided": every other column and frame of a larger tensor
        base = torch.randn((B, C, 2 * T, H, 2 * W + 1), generator=gen)[:, :, ::2, :, 1::2]
    assert base.shape == shape
    return base.to(device=DEVICE, dtype=dtype)


def _origins(n: int, H: int, W: int, h: int, w: int, wrap: bool, gen: torch.Generator) -> torch.Tensor:
    hi_y, hi_x = (H, W) if wrap else (H - h + 1, W - w + 1)
    ys = torch.randint(0, hi_y, (n,), generator=gen)
    xs = torch.randint(0, hi_x, (n,), generator=gen)
    if wrap:  # always include a window that wraps across both axes at once
        ys[0], xs[0] = H - 1, W - 1
    return torch.stack([ys, xs], dim=1).to(DEVICE)


def _gather(canvas, origins, tile_hw, halo, mode, block=None):
    h, w = tile_hw
    B, C, T = canvas.shape[:3]
    out = canvas.new_empty((origins.shape[0] * B, C, T, h + 2 * halo, w + 2 * halo))
    return halo_gather_mod.halo_gather(canvas, origins, tile_hw, halo, mode, out, block=block)


def _scatter(tiles, origins, canvas_hw, overlap_hw, ramp, wrap, block=None):
    NB, C, T = tiles.shape[:3]
    out = tiles.new_empty((NB // origins.shape[0], C, T, *canvas_hw))
    return blend_scatter_mod.blend_scatter(tiles, origins, canvas_hw, overlap_hw, ramp, wrap, out, block=block)


def test_mode_and_ramp_tables_equal_the_reference():
    assert halo_gather_mod.GATHER_MODES == reference.GATHER_MODES
    assert blend_scatter_mod.RAMPS == reference.RAMPS


@pytest.mark.parametrize("planes, rows, cols", [(1, 1, 1), (208, 90, 160), (208, 106, 176), (13, 270, 480), (7, 5, 3)])
def test_block_settings_are_powers_of_two_within_budget(planes, rows, cols):
    cfg = halo_gather_mod.block_settings(planes, rows, cols)
    blocks = (cfg["BLOCK_P"], cfg["BLOCK_H"], cfg["BLOCK_W"])
    assert all(b >= 1 and b & (b - 1) == 0 for b in blocks)
    assert blocks[0] * blocks[1] * blocks[2] <= halo_gather_mod.MAX_BLOCK_CELLS
    assert cfg["BLOCK_W"] <= halo_gather_mod.MAX_BLOCK_W and cfg["num_warps"] in (1, 2, 4, 8)
    assert halo_gather_mod.block_settings(planes, rows, cols) == cfg  # deterministic


@pytest.mark.parametrize("cols, block_w", [(76, 128), (60, 64), (128, 128), (129, 16), (160, 32), (3, 4)])
def test_gather_blocks_take_whole_rows_up_to_the_limit(cols, block_w):
    """Windows up to WHOLE_ROW_MAX wide are one column block (row segments whole); wider ones are
    split by the padding rule."""
    cfg = halo_gather_mod.block_settings(208, 106, cols, whole_row=halo_gather_mod.WHOLE_ROW_MAX)
    assert cfg["BLOCK_W"] == block_w
    assert cfg["BLOCK_P"] * cfg["BLOCK_H"] * cfg["BLOCK_W"] <= halo_gather_mod.MAX_BLOCK_CELLS


# --------------------------------------------------------------------------------------------------
# halo_gather
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["torus", "zero", "replicate"])
@pytest.mark.parametrize("layout", ["contiguous", "permuted", "strided"])
def test_gather_is_bit_exact(mode, dtype, layout):
    gen = torch.Generator().manual_seed(_seed(mode, dtype, layout))
    shape = (2, 3, 2, 11, 19)  # odd canvas
    canvas = _canvas(shape, dtype, layout, gen)
    tile_hw, halo = (5, 7), 3
    origins = _origins(4, 11, 19, *tile_hw, wrap=mode == "torus", gen=gen)
    expected = reference.halo_gather(canvas, origins, tile_hw, halo, mode)
    assert torch.equal(_gather(canvas, origins, tile_hw, halo, mode), expected)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_gather_random_shapes_and_blocks(data):
    B, C, T = (data.draw(st.integers(1, 3)) for _ in range(3))
    H, W = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 40))
    h, w = data.draw(st.integers(1, H)), data.draw(st.integers(1, W))
    halo = data.draw(st.integers(0, 5))
    mode = data.draw(st.sampled_from(sorted(reference.GATHER_MODES)))
    block = data.draw(st.sampled_from([None, (2, 8, 16), (1, 4, 32)]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    canvas = _canvas((B, C, T, H, W), torch.float32, data.draw(st.sampled_from(["contiguous", "permuted"])), gen)
    origins = _origins(data.draw(st.integers(1, 4)), H, W, h, w, wrap=mode == "torus", gen=gen)
    expected = reference.halo_gather(canvas, origins, (h, w), halo, mode)
    assert torch.equal(_gather(canvas, origins, (h, w), halo, mode, block), expected)


@pytest.mark.parametrize("dtype, col_multiple, expected", [
    (torch.float32, 2, 2), (torch.float32, 4, 2), (torch.float32, 3, 1), (torch.float32, 0, 2),
    (torch.bfloat16, 4, 4), (torch.bfloat16, 6, 2), (torch.float16, 8, 4), (torch.float16, 1, 1),
])  # fmt: skip
def test_word_cells_packs_what_divides(dtype, col_multiple, expected):
    canvas = torch.zeros((1, 2, 3, 6, 24), dtype=dtype, device=DEVICE)
    out = canvas.new_empty((4, 2, 3, 6, 12))
    assert halo_gather_mod.word_cells(canvas, out, "torus", 4, col_multiple) == expected


def test_word_cells_declines_layouts_a_word_would_break():
    canvas = torch.zeros((1, 2, 3, 6, 24), device=DEVICE)
    out = canvas.new_empty((4, 2, 3, 6, 12))
    cells = halo_gather_mod.word_cells
    assert cells(canvas, out, "zero", 4, 2) == 2
    assert cells(canvas, out, "replicate", 4, 2) == 1  # an edge word is not an edge cell
    assert cells(canvas, out, "torus", 3, 2) == 1  # odd halo
    assert cells(canvas[..., 1:23], out, "torus", 4, 2) == 1  # odd width and odd address
    assert cells(canvas, out.new_empty((4, 2, 3, 12, 6)).transpose(3, 4), "torus", 4, 2) == 1  # W not unit
    assert cells(torch.zeros((1, 2, 3, 6, 25), device=DEVICE)[..., :24], out, "torus", 4, 2) == 1  # odd row stride


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["torus", "zero"])
def test_word_gather_is_bit_exact(mode, dtype):
    """With even column origins, halo and widths the kernel moves multi-cell words; the windows are the
    reference's bit for bit, across the torus wrap on both axes and with negative window starts."""
    gen = torch.Generator().manual_seed(_seed("words", mode, dtype))
    H, W, (h, w), halo = 10, 24, (4, 8), 4
    canvas = _canvas((2, 3, 2, H, W), dtype, "contiguous", gen)
    ys = torch.tensor([9, 0, 3, 6])
    xs = torch.tensor([20, 0, 8, 12]) if mode == "torus" else torch.tensor([4, 0, 16, 8])
    origins = torch.stack([ys if mode == "torus" else torch.tensor([6, 0, 3, 2]), xs], 1).to(DEVICE)
    pack = halo_gather_mod.word_cells(canvas, canvas.new_empty((8, 3, 2, 12, 16)), mode, halo, 4)
    assert pack == 8 // canvas.element_size()
    expected = reference.halo_gather(canvas, origins, (h, w), halo, mode)
    out = canvas.new_empty(expected.shape)
    got = halo_gather_mod.halo_gather(canvas, origins, (h, w), halo, mode, out, col_multiple=4)
    assert torch.equal(got, expected)
    # Through the op: supergen.ops finds the column multiple itself.
    with ops.backend("triton"):
        assert torch.equal(ops.halo_gather(canvas, origins.cpu(), (h, w), halo, mode), expected)


@pytest.mark.parametrize("planes", [1, 3, 16, 208])
@pytest.mark.parametrize("pack", [2, 4])
def test_word_blend_blocks_hold_as_many_cells_and_warps_as_cell_blocks(planes, pack):
    cells = blend_scatter_mod._block_settings(planes, 270, 480, 1)
    words = blend_scatter_mod._block_settings(planes, 270, 480 // pack, pack)
    assert words["BLOCK_W"] * pack == cells["BLOCK_W"] and words["BLOCK_H"] == cells["BLOCK_H"]
    assert words["BLOCK_P"] == cells["BLOCK_P"] and words["num_warps"] == cells["num_warps"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "wrap, overlap, ramp", [(True, (0, 0), "linear"), (True, (2, 4), "cosine"), (False, (1, 2), "linear")]
)
def test_word_scatter_equals_the_cell_scatter_bit_for_bit(dtype, wrap, overlap, ramp, monkeypatch):
    """With even column origins and widths the blend reads and writes multi-cell words, splits them into
    cells in registers and blends each as the cell path does: the same bits, and the reference's values
    within rounding. Overlapping tiles, a torus wrap across both axes, tiles past the canvas dropped."""
    monkeypatch.setattr(ops, "SCATTER_WORDS", True)
    gen = torch.Generator().manual_seed(_seed("word scatter", dtype, wrap, overlap, ramp))
    H, W, (h, w) = 10, 24, (6, 8)
    if wrap:
        origins = torch.tensor([[8, 20], [0, 0], [3, 4], [6, 12], [2, 16]])
    else:
        origins = torch.tensor([[4, 16], [0, 0], [3, 4], [1, 12], [0, 8]])
    tiles = torch.randn((5 * 2, 3, 2, h, w), generator=gen).to(device=DEVICE, dtype=dtype)
    origins = origins.to(DEVICE)
    pack = halo_gather_mod.word_cells(tiles, tiles.new_empty((2, 3, 2, H, W)), "torus", 0, 4)
    assert pack == 8 // tiles.element_size()
    cells = _scatter(tiles, origins, (H, W), overlap, ramp, wrap)
    out = tiles.new_empty(cells.shape)
    words = blend_scatter_mod.blend_scatter(tiles, origins, (H, W), overlap, ramp, wrap, out, col_multiple=4)
    assert torch.equal(words, cells)
    expected = reference.blend_scatter(tiles, origins, (H, W), overlap, ramp, wrap)
    assert_verbose_close(words, expected, what=f"word scatter {dtype}")
    with ops.backend("triton"):  # supergen.ops finds the column multiple itself where words are on
        assert torch.equal(ops.blend_scatter(tiles, origins.cpu(), (H, W), overlap, ramp, wrap), cells)


def test_gather_window_larger_than_canvas_wraps_repeatedly():
    gen = torch.Generator().manual_seed(1)
    canvas = _canvas((1, 2, 1, 5, 6), torch.float32, "contiguous", gen)
    origins = torch.tensor([[0, 0], [4, 5], [2, 3]], device=DEVICE)
    for mode in ("torus", "zero", "replicate"):
        expected = reference.halo_gather(canvas, origins, (3, 4), 7, mode)  # 17 x 18 windows on 5 x 6
        assert torch.equal(_gather(canvas, origins, (3, 4), 7, mode, block=(2, 8, 16)), expected), mode


def test_zero_padding_is_zero_even_next_to_non_finite_edge_cells():
    # The contract says off-canvas cells "are zero". (reference.halo_gather multiplies the clamped
    # window by a 0/1 mask, so it yields inf * 0 = nan there; the kernel does not.)
    canvas = torch.zeros(1, 1, 1, 4, 4, device=DEVICE)
    canvas[..., 0, 0], canvas[..., 0, 3] = float("inf"), float("nan")
    out = _gather(canvas, torch.tensor([[0, 0], [0, 2]], device=DEVICE), (2, 2), 1, "zero")
    assert not out[0, 0, 0, 0, :].any() and not out[1, 0, 0, :, 3].any()
    assert out[0, 0, 0, 1, 1] == float("inf") and out[1, 0, 0, 1, 2].isnan()


def test_gather_writes_through_out_strides():
    gen = torch.Generator().manual_seed(2)
    canvas = _canvas((2, 3, 2, 9, 14), torch.float16, "strided", gen)
    origins = _origins(3, 9, 14, 4, 6, wrap=True, gen=gen)
    expected = reference.halo_gather(canvas, origins, (4, 6), 1, "torus")
    storage = torch.full((6, 2, 3, 8, 6), float("nan"), dtype=torch.float16, device=DEVICE)
    out = storage.permute(0, 2, 1, 4, 3)[..., :6, :]  # (6, 3, 2, 6, 8), W not the fast axis
    halo_gather_mod.halo_gather(canvas, origins, (4, 6), 1, "torus", out)
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------------
# blend_scatter
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ramp", ["linear", "cosine"])
@pytest.mark.parametrize("overlap", [(0, 0), (2, 3)])
@pytest.mark.parametrize("wrap", [True, False], ids=["torus", "clamp"])
def test_scatter_matches_reference(wrap, overlap, ramp, dtype):
    gen = torch.Generator().manual_seed(_seed(wrap, overlap, ramp, dtype))
    H, W, h, w = 13, 21, 6, 9
    origins = _origins(5, H, W, h, w, wrap=wrap, gen=gen)
    tiles = _canvas((5 * 2, 3, 2, h, w), dtype, "permuted", gen)
    expected = reference.blend_scatter(tiles, origins, (H, W), overlap, ramp, wrap)
    actual = _scatter(tiles, origins, (H, W), overlap, ramp, wrap)
    assert_verbose_close(actual, expected, what=f"blend_scatter wrap={wrap} overlap={overlap} {ramp} {dtype}")


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_scatter_random_shapes_and_blocks(data):
    B, C, T = (data.draw(st.integers(1, 2)) for _ in range(3))
    H, W = data.draw(st.integers(2, 20)), data.draw(st.integers(2, 36))
    h, w = data.draw(st.integers(1, H)), data.draw(st.integers(1, W))
    overlap = (data.draw(st.integers(0, h // 2)), data.draw(st.integers(0, w // 2)))
    wrap = data.draw(st.booleans())
    ramp = data.draw(st.sampled_from(sorted(reference.RAMPS)))
    block = data.draw(st.sampled_from([None, (1, 8, 16), (4, 2, 16)]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    N = data.draw(st.integers(1, 5))
    origins = _origins(N, H, W, h, w, wrap=wrap, gen=gen)
    tiles = _canvas((N * B, C, T, h, w), torch.float32, data.draw(st.sampled_from(["contiguous", "strided"])), gen)
    expected = reference.blend_scatter(tiles, origins, (H, W), overlap, ramp, wrap)
    assert_verbose_close(_scatter(tiles, origins, (H, W), overlap, ramp, wrap, block), expected, what="blend_scatter")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_is_deterministic_and_writes_through_out_strides(dtype):
    gen = torch.Generator().manual_seed(3)
    origins = _origins(6, 10, 15, 5, 7, wrap=True, gen=gen)
    tiles = _canvas((6, 2, 3, 5, 7), dtype, "strided", gen)
    first = _scatter(tiles, origins, (10, 15), (2, 2), "cosine", True, block=(4, 8, 16))
    out = torch.full((1, 3, 2, 15, 10), float("nan"), dtype=dtype, device=DEVICE).permute(0, 2, 1, 4, 3)
    again = blend_scatter_mod.blend_scatter(tiles, origins, (10, 15), (2, 2), "cosine", True, out, block=(4, 8, 16))
    assert torch.equal(first, again)


def test_uncovered_cells_are_zero_and_a_partition_is_copied_exactly():
    tiles = torch.randn(2, 2, 1, 4, 5, device=DEVICE)
    origins = torch.tensor([[0, 0], [6, 7]], device=DEVICE)  # two disjoint tiles on a 10 x 12 canvas
    out = _scatter(tiles, origins, (10, 12), (0, 0), "linear", False)
    cover = torch.zeros(10, 12, dtype=torch.bool)
    cover[0:4, 0:5] = cover[6:10, 7:12] = True
    assert torch.equal(out[..., ~cover], torch.zeros_like(out[..., ~cover]))
    assert torch.equal(out[..., 0:4, 0:5], tiles[0:1]) and torch.equal(out[..., 6:10, 7:12], tiles[1:2])


def test_index_64_paths_match_the_int32_paths(monkeypatch):
    """The 64-bit in-plane offsets (planes of >= 2**31 elements) give the same results; forced here
    because such planes do not fit in a test."""
    assert halo_gather_mod.needs_index_64((2**16, 2**15 + 1, 2**15 + 1, 1))
    assert not halo_gather_mod.needs_index_64((270, 480, 480, 1), (106, 176, 176, 1))
    gen = torch.Generator().manual_seed(7)
    canvas = _canvas((1, 2, 2, 9, 13), torch.float16, "permuted", gen)
    origins = _origins(3, 9, 13, 4, 5, wrap=True, gen=gen)
    tiles32 = _gather(canvas, origins, (4, 5), 2, "torus")
    fused32 = _scatter(tiles32[..., 2:-2, 2:-2], origins, (9, 13), (1, 2), "linear", True)
    monkeypatch.setattr(halo_gather_mod, "needs_index_64", lambda *planes: True)
    monkeypatch.setattr(blend_scatter_mod, "needs_index_64", lambda *planes: True)
    tiles64 = _gather(canvas, origins, (4, 5), 2, "torus")
    assert torch.equal(tiles64, tiles32)
    assert torch.equal(_scatter(tiles64[..., 2:-2, 2:-2], origins, (9, 13), (1, 2), "linear", True), fused32)


# --------------------------------------------------------------------------------------------------
# gather -> scatter round trips
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torus_gather_then_scatter_reconstructs_the_canvas_exactly(dtype):
    gen = torch.Generator().manual_seed(4)
    canvas = _canvas((1, 2, 2, 12, 20), dtype, "permuted", gen)
    shift = (5, 3)  # shifted 3 x 4 partition: every tile but the first row/col wraps
    origins = torch.tensor([((r * 4 + shift[0]) % 12, (c * 5 + shift[1]) % 20) for r in range(3) for c in range(4)])
    origins = origins.to(DEVICE)
    tiles = _gather(canvas, origins, (4, 5), 0, "torus")
    assert torch.equal(_scatter(tiles, origins, (12, 20), (0, 0), "linear", True), canvas)


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
def test_overlapping_gather_then_scatter_reconstructs_within_rounding(ramp):
    gen = torch.Generator().manual_seed(5)
    canvas = _canvas((1, 2, 1, 12, 20), torch.float32, "contiguous", gen)
    origins = torch.tensor([(r * 4, c * 5) for r in range(3) for c in range(4)], device=DEVICE)
    tiles = _gather(canvas, origins, (6, 7), 0, "torus")  # stride (4, 5), overlap (2, 2)
    out = _scatter(tiles, origins, (12, 20), (2, 2), ramp, True)
    assert_verbose_close(out, canvas, what=f"round trip {ramp}")


# --------------------------------------------------------------------------------------------------
# Through supergen.ops and bad input
# --------------------------------------------------------------------------------------------------


def test_ops_dispatch_to_the_kernels_when_triton_is_forced():
    gen = torch.Generator().manual_seed(6)
    canvas = _canvas((2, 2, 1, 10, 14), torch.bfloat16, "strided", gen)
    origins = _origins(3, 10, 14, 4, 6, wrap=True, gen=gen)
    with ops.backend("triton"):
        tiles = ops.halo_gather(canvas, origins, (4, 6), halo=2, mode="torus")
        fused = ops.blend_scatter(tiles[..., 2:-2, 2:-2], origins, (10, 14), overlap=(1, 2), ramp="cosine")
    assert torch.equal(tiles, reference.halo_gather(canvas, origins, (4, 6), 2, "torus"))
    expected = reference.blend_scatter(tiles[..., 2:-2, 2:-2], origins, (10, 14), (1, 2), "cosine", True)
    assert_verbose_close(fused, expected, what="ops.blend_scatter(triton)")


def _gather_args(**change):
    canvas = torch.randn(1, 2, 1, 8, 8, device=DEVICE)
    args = {
        "canvas": canvas,
        "origins": torch.tensor([[0, 0]], device=DEVICE),
        "tile_hw": (4, 4),
        "halo": 1,
        "mode": "torus",
        "out": torch.empty(1, 2, 1, 6, 6, device=DEVICE),
    }
    args.update(change)
    return args


def _scatter_args(**change):
    args = {
        "tiles": torch.randn(2, 2, 1, 4, 4, device=DEVICE),
        "origins": torch.tensor([[0, 0], [4, 4]], device=DEVICE),
        "canvas_hw": (8, 8),
        "overlap_hw": (0, 0),
        "ramp": "linear",
        "wrap": True,
        "out": torch.empty(1, 2, 1, 8, 8, device=DEVICE),
    }
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"canvas": torch.randn(1, 2, 1, 8, 8, dtype=torch.float64)}, TypeError, "float64"),
        ({"out": torch.empty(1, 2, 1, 6, 6, dtype=torch.float16)}, TypeError, "float16"),
        ({"out": torch.empty(1, 2, 1, 6, 5)}, ValueError, r"\(1, 2, 1, 6, 6\)"),
        ({"origins": torch.tensor([[0.0, 0.0]])}, TypeError, "float32"),
        ({"origins": torch.tensor([0, 0])}, ValueError, r"\(2,\)"),
        ({"mode": "reflect"}, ValueError, "reflect"),
        ({"canvas": torch.randn(1, 2, 1, 8, 8, device="meta")}, ValueError, "one device"),
        (
            {
                "canvas": torch.randn(1, 2, 1, 8, 8, device="meta"),
                "origins": torch.zeros(1, 2, dtype=torch.int64, device="meta"),
                "out": torch.empty(1, 2, 1, 6, 6, device="meta"),
            },
            ValueError,
            "must be on a CUDA device.*meta",
        ),
        ({"canvas": torch.randn(2, 8, 8)}, ValueError, r"\(2, 8, 8\)"),
    ],
)
def test_gather_launcher_rejects_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        halo_gather_mod.halo_gather(**_gather_args(**change))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"tiles": torch.randn(2, 2, 1, 4, 4).int()}, TypeError, "int32"),
        ({"out": torch.empty(1, 2, 1, 8, 9)}, ValueError, r"\(1, 2, 1, 8, 8\)"),
        ({"origins": torch.tensor([[0, 0], [4, 4], [1, 1]])}, ValueError, "multiple of the 3"),
        ({"ramp": "hann"}, ValueError, "hann"),
        ({"out": torch.empty(1, 2, 1, 8, 8, device="meta")}, ValueError, "meta"),
    ],
)
def test_scatter_launcher_rejects_bad_input(change, exc, match):
    with pytest.raises(exc, match=match):
        blend_scatter_mod.blend_scatter(**_scatter_args(**change))


# --------------------------------------------------------------------------------------------------
# the compiled GPU path, without a GPU
# --------------------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

hg = importlib.import_module("supergen.kernels.halo_gather")
bs = importlib.import_module("supergen.kernels.blend_scatter")


def global_loads(fn, pointers, constexprs, floats=()):
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in floats else "i32")
        for name in fn.arg_names
    }
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
    loads = [line for line in ptx.splitlines() if "ld.global" in line]
    return {width: sum(f".b{width}" in line for line in loads) for width in (16, 32, 64)}


blocks = dict(BLOCK_P=4, BLOCK_H=8, BLOCK_W=32)
facts = {}
for label, elem, pack, index_64, mode in (
    ("cells", "*fp32", 1, False, 0), ("cells, int64 offsets", "*bf16", 1, True, 2),
    ("words", "*i64", 2, False, 0), ("words, zero padding", "*i64", 4, False, 1),
):
    pointers = {"canvas_ptr": elem, "origins_ptr": "*i64", "out_ptr": elem}
    consts = dict(MODE=mode, MULTI_WRAP=False, INDEX_64=index_64, PACK=pack, **blocks)
    facts["gather " + label] = global_loads(hg._halo_gather_kernel, pointers, consts)
for label, elem, index_64, pack in (
    ("blend", "*bf16", False, 1), ("blend, int64 offsets", "*bf16", True, 1), ("blend words", "*i64", False, 4),
):
    pointers = {"tiles_ptr": elem, "origins_ptr": "*i64", "out_ptr": elem}
    consts = dict(RAMP=1, WRAP=True, HAS_RAMP_H=True, HAS_RAMP_W=True, INDEX_64=index_64, PACK=pack,
                  CELL_BITS=16, CELL_KIND=2, **blocks)
    ramps = ("inv_overlap_h", "inv_overlap_w")
    facts["scatter " + label] = global_loads(bs._blend_scatter_kernel, pointers, consts, ramps)
print(json.dumps(facts))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests above run the compiled kernels themselves")
def test_sm90_builds_compile_and_words_load_64_bits(tmp_path):
    """Compile both kernels for sm_90 ahead of time (no GPU needed). The interpreter does not type-check
    like the compiler (a helper returning int32 in one constexpr branch and int64 in the other ran here
    and failed to compile on an H100), and it cannot show codegen: the word copy must load only 64-bit
    words (2 of the 64-bit loads are the origins), the cell copy cells; likewise the blend's words."""
    import json
    import os
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    cells = facts["gather cells"]
    assert cells["16"] == 0 and cells["32"] > 0 and cells["64"] == 2, facts
    for words in ("gather words", "gather words, zero padding", "scatter blend words"):
        assert facts[words]["16"] == facts[words]["32"] == 0 and facts[words]["64"] > 2, facts
    assert facts["gather cells, int64 offsets"]["16"] > 0, facts
    assert all(facts[k]["16"] > 0 for k in ("scatter blend", "scatter blend, int64 offsets")), facts
