"""The C++ CPU backend (``supergen._C``) against ``supergen.reference``.

Both faces are checked: the loaded kernels called directly (``_ext.load()``) and the public ops forced
onto the backend (``ops.backend("cpp")``). Gather must be bit-for-bit equal to the reference; blend
within 1e-6 relative in fp32 and one rounding step in fp16/bf16 (the kernels compute the reference's
fp32 weights and sums in the reference's order, so in practice they agree exactly), and bitwise
reproducible from run to run and across thread counts.
"""

import pytest
import torch
from helpers import TOLERANCES, assert_verbose_close
from hypothesis import given, settings
from hypothesis import strategies as st

import supergen.ops as ops
from supergen import TileGrid, TilingConfig, _ext, reference

try:
    CPP = _ext.load()
except ImportError as e:  # only a machine without a working C++ toolchain gets here
    pytest.skip(f"supergen._C cannot be built on this machine: {e}", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "reversed", "sliced"]
#: blend in fp32: the contract's 1e-6 relative (atol for values near zero after cancellation).
FP32_BLEND_TOL = (1e-6, 1e-6)


def as_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in a ``layout`` view: ``reversed`` strides (no unit W stride) or a
    ``sliced`` view of a larger buffer (W stride 2, offset storage)."""
    if layout == "reversed":
        dims = tuple(reversed(range(x.dim())))
        return x.permute(dims).contiguous().permute(dims)
    if layout == "sliced":
        big = torch.zeros(x.shape[:-2] + (x.shape[-2] + 2, 2 * x.shape[-1]), dtype=x.dtype)
        view = big[..., 1:-1, ::2]
        view.copy_(x)
        return view
    return x


def randn(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def gather_both(canvas, origins, tile_hw, halo, mode, out_layout="contiguous"):
    """(direct kernel writing an ``out_layout`` view, public op on the cpp backend, reference)."""
    N, (B, C, T) = origins.shape[0], canvas.shape[:3]
    shape = (N * B, C, T, tile_hw[0] + 2 * halo, tile_hw[1] + 2 * halo)
    direct = as_layout(canvas.new_empty(shape), out_layout)
    CPP.halo_gather(canvas, origins, tile_hw, halo, mode, direct)
    with ops.backend("cpp"):
        public = ops.halo_gather(canvas, origins, tile_hw, halo, mode)
    return direct, public, reference.halo_gather(canvas, origins, tile_hw, halo, mode)


def blend_both(tiles, origins, canvas_hw, overlap_hw, ramp, wrap, out_layout="contiguous"):
    """(direct kernel writing an ``out_layout`` view, public op on the cpp backend, reference)."""
    B, (C, T) = tiles.shape[0] // origins.shape[0], tiles.shape[1:3]
    direct = as_layout(tiles.new_empty((B, C, T) + tuple(canvas_hw)), out_layout)
    CPP.blend_scatter(tiles, origins, canvas_hw, overlap_hw, ramp, wrap, direct)
    with ops.backend("cpp"):
        public = ops.blend_scatter(tiles, origins, canvas_hw, overlap_hw, ramp, wrap)
    return direct, public, reference.blend_scatter(tiles, origins, canvas_hw, overlap_hw, ramp, wrap)


def assert_blend_close(actual, expected, what):
    atol, rtol = FP32_BLEND_TOL if expected.dtype == torch.float32 else TOLERANCES[expected.dtype]
    assert_verbose_close(actual, expected, atol=atol, rtol=rtol, what=what)


def test_cpp_is_the_default_cpu_backend(monkeypatch):
    monkeypatch.delenv("SUPERGEN_BACKEND", raising=False)
    assert ops.selected_backend("halo_gather", "cpu") == "cpp"
    assert ops.selected_backend("blend_scatter", "cpu") == "cpp"
    assert _ext.load() is CPP  # built and loaded once per process


# -- halo_gather ------------------------------------------------------------------------------------


@st.composite
def gather_cases(draw):
    H, W = draw(st.integers(1, 19)), draw(st.integers(1, 19))
    h, w = draw(st.integers(1, H)), draw(st.integers(1, W))
    mode = draw(st.sampled_from(list(reference.GATHER_MODES)))
    # Halos up to past the whole canvas: several torus laps, windows that start or end off the canvas.
    halo = draw(st.integers(0, max(H, W) + 2))
    hi = (H - 1, W - 1) if mode == "torus" else (H - h, W - w)
    origins = draw(st.lists(st.tuples(st.integers(0, hi[0]), st.integers(0, hi[1])), min_size=1, max_size=4))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), H, W)
    return shape, torch.tensor(origins), (h, w), halo, mode


@settings(max_examples=40, deadline=None)
@given(
    case=gather_cases(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    out_layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_gather_random_shapes_bit_exact(case, dtype, layout, out_layout, seed):
    shape, origins, tile_hw, halo, mode = case
    canvas = as_layout(randn(shape, dtype, seed), layout)
    direct, public, expected = gather_both(canvas, origins, tile_hw, halo, mode, out_layout)
    assert torch.equal(direct, expected)
    assert torch.equal(public, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(reference.GATHER_MODES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_halos_cross_both_borders(mode, dtype, layout):
    """Corner tiles whose halos leave the canvas on all four sides; torus tiles wrap on both axes."""
    canvas = as_layout(randn((2, 3, 2, 13, 17), dtype, seed=1), layout)
    if mode == "torus":
        origins = torch.tensor([[0, 0], [12, 16], [10, 14], [6, 0]])  # wrap bottom-right, both axes
    else:
        origins = torch.tensor([[0, 0], [8, 11], [0, 11], [8, 0]])  # the four corners
    direct, public, expected = gather_both(canvas, origins, (5, 6), 4, mode)
    assert torch.equal(direct, expected)
    assert torch.equal(public, expected)


# -- blend_scatter ----------------------------------------------------------------------------------


@st.composite
def blend_cases(draw):
    H, W = draw(st.integers(1, 19)), draw(st.integers(1, 19))
    h, w = draw(st.integers(1, H)), draw(st.integers(1, W))
    overlap = (draw(st.integers(0, h // 2)), draw(st.integers(0, w // 2)))
    wrap = draw(st.booleans())
    hi = (H - 1, W - 1) if wrap else (H - h, W - w)
    origins = draw(st.lists(st.tuples(st.integers(0, hi[0]), st.integers(0, hi[1])), min_size=1, max_size=5))
    B = draw(st.integers(1, 2))
    shape = (len(origins) * B, draw(st.integers(1, 3)), draw(st.integers(1, 3)), h, w)
    ramp = draw(st.sampled_from(list(reference.RAMPS)))
    return shape, torch.tensor(origins), (H, W), overlap, ramp, wrap


@settings(max_examples=40, deadline=None)
@given(
    case=blend_cases(),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    out_layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_blend_random_shapes_match_reference(case, dtype, layout, out_layout, seed):
    shape, origins, canvas_hw, overlap, ramp, wrap = case
    tiles = as_layout(randn(shape, dtype, seed), layout)
    direct, public, expected = blend_both(tiles, origins, canvas_hw, overlap, ramp, wrap, out_layout)
    assert_blend_close(direct, expected, "direct")
    assert_blend_close(public, expected, "ops")


@pytest.mark.parametrize("ramp", list(reference.RAMPS))
def test_blend_weights_bit_identical_to_reference(ramp):
    """The 1-D ramps are the reference's fp32 values for every tile length and overlap tried: two
    tiles overlapping on both axes blend to exactly the reference's result."""
    for h in range(2, 41):
        for overlap in range(1, h // 2 + 1):
            tiles = randn((2, 1, 1, h, h), torch.float32, seed=h * 100 + overlap)
            origins = torch.tensor([[0, 0], [h - overlap, h - overlap]])
            size = 2 * h
            direct, _, expected = blend_both(tiles, origins, (size, size), (overlap, overlap), ramp, True)
            assert torch.equal(direct, expected), f"h={h} overlap={overlap}"


def test_blend_deterministic_across_runs_and_threads():
    """Many overlapping tiles on a canvas big enough to split across threads: bitwise reproducible."""
    origins = torch.tensor([[y, x] for y in range(0, 64, 11) for x in range(0, 80, 13)])
    tiles = randn((origins.shape[0], 4, 3, 24, 30), torch.float32, seed=3)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n_threads in (threads, threads, 1):
            torch.set_num_threads(n_threads)
            out = torch.empty((1, 4, 3, 64, 80))
            CPP.blend_scatter(tiles, origins, (64, 80), (6, 7), "cosine", True, out)
            runs.append(out.view(torch.int32))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


# -- halo_gather → blend_scatter --------------------------------------------------------------------


@pytest.mark.parametrize("boundary", ["torus", "clamp"])
@pytest.mark.parametrize("halo", [0, 3])
def test_gather_then_blend_reconstructs_canvas(boundary, halo):
    """Exact without overlap, within fp32 rounding with it; halos cropped away as a strided view."""
    canvas = randn((1, 4, 2, 36, 50), torch.float32, seed=4)
    mode = "torus" if boundary == "torus" else "replicate"
    for overlap in ((0, 0), (4, 5)):
        grid = TileGrid((2, 36, 50), TilingConfig(tile=(12, 20), overlap=overlap, boundary=boundary))
        for step in range(3):
            origins = grid.at_step(step)
            with ops.backend("cpp"):
                tiles = ops.halo_gather(canvas, origins, grid.tile, halo, mode)
                core = tiles[..., halo : halo + grid.tile[0], halo : halo + grid.tile[1]]
                back = ops.blend_scatter(core, origins, (36, 50), grid.overlap, "linear", grid.wrap)
            # k equal values summed and divided by k are exact in fp32 for k <= 2 (x + x and / 2 are
            # exact); clamped, shifted edge tiles stack up to 4 deep in a corner, and 3x can round.
            if overlap == (0, 0) and int(grid.coverage(step).max()) <= 2:
                assert torch.equal(back, canvas), f"step {step}"
            else:
                assert_verbose_close(back, canvas, what=f"overlap {overlap} step {step}")


# -- errors -----------------------------------------------------------------------------------------


def test_kernel_checks_name_op_tensor_and_value():
    canvas = torch.zeros((1, 1, 1, 8, 8))
    origins = torch.tensor([[0, 0]])
    with pytest.raises(RuntimeError, match=r"halo_gather: `out` must be .*shape \[1, 1, 1, 4, 4\]"):
        CPP.halo_gather(canvas, origins, (4, 4), 1, "torus", torch.empty((1, 1, 1, 4, 4)))
    with pytest.raises(RuntimeError, match="halo_gather: `origins` must be int64 but is Int"):
        CPP.halo_gather(canvas, origins.int(), (4, 4), 0, "torus", torch.empty((1, 1, 1, 4, 4)))
    with pytest.raises(RuntimeError, match="halo_gather: `canvas` must be float32, float16 or bfloat16"):
        CPP.halo_gather(canvas.double(), origins, (4, 4), 0, "torus", torch.empty((1, 1, 1, 4, 4)))
    with pytest.raises(RuntimeError, match="blend_scatter: `tiles` must have 5 dims"):
        CPP.blend_scatter(canvas[0], origins, (8, 8), (0, 0), "linear", True, canvas)
    with pytest.raises(RuntimeError, match=r"blend_scatter: overlap 3x0 must be in \[0, half the tile 4x4\]"):
        CPP.blend_scatter(torch.zeros((1, 1, 1, 4, 4)), origins, (8, 8), (3, 0), "linear", True, canvas)


def test_failed_build_raises_import_error_with_reason(monkeypatch):
    """The reason is the compiler's complaint, without the echoed commands of the ninja log."""
    log = (
        "Error building extension 'x': [1/2] c++ -c /src/halo_gather.cpp -o halo_gather.o\n"
        "FAILED: halo_gather.o\nc++ -c /src/halo_gather.cpp -o halo_gather.o\n"
        "ops.h:3:1: error: boom\nninja: build stopped: subcommand failed."
    )

    def broken(src):
        raise RuntimeError(log)

    monkeypatch.setattr(_ext, "_ops", None)
    monkeypatch.setattr(_ext, "_build", broken)
    with pytest.raises(ImportError, match=r"could not be built in .*: RuntimeError: ops\.h:3:1: error: boom$"):
        _ext.load()
