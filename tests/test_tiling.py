"""TileGrid geometry: coverage, partition of unity, per-axis shift cycles, clamp/torus edge cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from supergen import TileGrid, TilingConfig, blend_scatter
from supergen.tiling import plan_axis


@st.composite
def grids(draw, boundary=None, overlap=None, shift=None):
    """A random valid TileGrid: patch multiple m, tiles of 1..8 patches, canvases of 1..30 patches."""
    m = draw(st.sampled_from([1, 2]))
    th, tw = (m * draw(st.integers(1, 8)) for _ in range(2))
    H, W = (m * draw(st.integers(1, 30)) for _ in range(2))
    boundary = boundary or draw(st.sampled_from(["torus", "clamp"]))
    if overlap is None:
        overlap = (m * draw(st.integers(0, th // (2 * m))), m * draw(st.integers(0, tw // (2 * m))))
    shift = draw(st.booleans()) if shift is None else shift
    cfg = TilingConfig(
        tile=(th, tw),
        overlap=overlap,
        boundary=boundary,
        shift=shift,
        shift_every=draw(st.integers(1, 3)),
        shift_period=draw(st.integers(1, 20)),
        ramp=draw(st.sampled_from(["linear", "cosine"])),
    )
    return TileGrid((draw(st.integers(1, 3)), H, W), cfg, multiple=m)


@settings(max_examples=60, deadline=None)
@given(grids(), st.integers(0, 40))
def test_every_cell_is_covered_and_origins_are_valid(grid, step):
    _, H, W = grid.canvas
    h, w = grid.tile
    origins = grid.at_step(step)
    if grid.wrap or not grid.config.shift:
        assert origins.shape == (grid.num_tiles, 2)
    assert bool((grid.coverage(step) >= 1).all())
    assert bool((origins % torch.tensor(grid.multiple) == 0).all())
    assert h <= H and w <= W
    if grid.wrap:
        assert bool(((origins[:, 0] >= 0) & (origins[:, 0] < H) & (origins[:, 1] >= 0) & (origins[:, 1] < W)).all())
    else:
        assert bool(((origins[:, 0] <= H - h) & (origins[:, 1] <= W - w) & (origins >= 0).all(1)).all())


@settings(max_examples=40, deadline=None)
@given(grids(), st.integers(0, 20))
def test_blend_weights_form_a_partition_of_unity(grid, step):
    """blend_scatter of all-ones tiles is one everywhere: the normalised weights sum to one."""
    _, H, W = grid.canvas
    origins = grid.at_step(step)
    tiles = torch.ones((origins.shape[0], 1, 1, *grid.tile))
    fused = blend_scatter(tiles, origins, (H, W), grid.overlap, grid.config.ramp, grid.wrap)
    torch.testing.assert_close(fused, torch.ones_like(fused), atol=1e-6, rtol=0)


@pytest.mark.parametrize("ramp", ["linear", "cosine"])
@pytest.mark.parametrize("tile,overlap,n", [(16, 4, 3), (24, 6, 4), (10, 2, 5)])
def test_regular_torus_ramps_sum_to_one_without_normalisation(ramp, tile, overlap, n):
    """When the canvas is a whole number of strides, neighbours overlap by exactly `overlap` and the
    complementary ramps r(t) + r(1 - t) = 1 sum to one before any normalisation."""
    size = n * (tile - overlap)
    cfg = TilingConfig(tile=(tile, tile), overlap=overlap, ramp=ramp, shift=True)
    grid = TileGrid((1, size, size), cfg)
    for step in range(3):
        total = grid.weight_sum(step)
        assert float((total - 1).abs().max()) < 1e-6, f"step {step}: weight sum spans {total.min()}..{total.max()}"


def _axis_edge_positions(grid, axis, steps):
    """Per step, the set of canvas positions on `axis` (0 rows, 1 cols) where a tile edge lies."""
    return [set(grid.edges(s)[axis]) for s in steps]


@settings(max_examples=60, deadline=None)
@given(grids(boundary="torus", overlap=(0, 0), shift=True))
def test_shift_cycle_crosses_every_band(grid):
    """Over one period of each axis, edges visit every multiple of the step inside each tile: the
    largest run of cells never lying on an edge is shorter than the step (no band is never crossed)."""
    for axis, plan in ((0, grid.rows), (1, grid.cols)):
        if len(plan.origins) == 1:
            assert plan.step == 0
            continue
        steps = range(0, plan.period * grid.config.shift_every, grid.config.shift_every)
        visited = set().union(*_axis_edge_positions(grid, axis, steps))
        cells = sorted(visited)
        gaps = [(b - a) % plan.size for a, b in zip(cells, cells[1:] + cells[:1])] if len(cells) > 1 else [plan.size]
        assert max(gaps) <= plan.step, f"axis {axis}: gap {max(gaps)} > step {plan.step} ({plan})"
        assert plan.step * plan.period == plan.tile
        assert plan.period <= grid.config.shift_period or plan.step == plan.tile


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(2, 6), st.integers(1, 6), st.integers(1, 20))
def test_each_cell_is_on_an_edge_at_most_once_per_period(m, tiles_per_axis, tile_patches, max_period):
    """For evenly divided torus canvases, a row lies on a tile edge at most once per period."""
    tile = m * tile_patches
    size = tile * tiles_per_axis
    grid = TileGrid((1, size, size), TilingConfig(tile=tile, shift_period=max_period), multiple=m)
    plan = grid.rows
    counts = torch.zeros(size, dtype=torch.int64)
    for s in range(plan.period):
        for r in grid.edges(s)[0]:
            counts[r] += 1
    assert int(counts.max()) <= 1


def test_published_band_bug_is_fixed():
    """The published method shifts a 90-row tile by 5 rows on a 16-step cycle: rows 80..89 of each
    tile are never crossed by an edge. Ours picks a per-axis step dividing the tile."""
    published = {(k * 5) % 90 for k in range(16)}
    assert max(b - a for a, b in zip(sorted(published), sorted(published)[1:] + [90])) == 15  # 75 -> 90
    grid = TileGrid((11, 270, 480), TilingConfig(tile=(90, 160), shift_period=16), multiple=2)
    assert (grid.rows.step, grid.rows.period) == (6, 15)
    assert (grid.cols.step, grid.cols.period) == (10, 16)
    rows = set().union(*(set(grid.edges(s)[0]) for s in range(grid.rows.period)))
    assert rows == set(range(0, 270, 6))


def test_period_returns_grid_to_start():
    grid = TileGrid((1, 180, 320), TilingConfig(tile=(90, 160), shift_every=2), multiple=2)
    for s in range(5):
        assert torch.equal(grid.at_step(s), grid.at_step(s + grid.period))
    assert not torch.equal(grid.at_step(0), grid.at_step(2))
    assert torch.equal(grid.at_step(0), grid.at_step(1))  # shift_every=2 holds the grid for a step


def test_no_shift_keeps_grid_fixed_and_exact_fit():
    grid = TileGrid((1, 180, 320), TilingConfig(tile=(90, 160), shift=False), multiple=2)
    assert grid.num_tiles == 4
    assert grid.at_step(0).tolist() == [[0, 0], [0, 160], [90, 0], [90, 160]]
    assert torch.equal(grid.at_step(7), grid.at_step(0))
    assert bool((grid.coverage(0) == 1).all())


def test_canvas_smaller_than_tile_gets_one_tile_equal_to_canvas():
    grid = TileGrid((1, 40, 300), TilingConfig(tile=(90, 160)), multiple=2)
    assert grid.tile == (40, 160)
    assert len(grid.rows.origins) == 1 and grid.rows.step == 0
    assert bool((grid.coverage(3) >= 1).all())


def test_clamp_edge_tiles_move_inward():
    grid = TileGrid((1, 100, 100), TilingConfig(tile=40, boundary="clamp", shift=False))
    ys = sorted({y for y, _ in grid.at_step(0).tolist()})
    assert ys[0] == 0 and ys[-1] == 60  # the last tile ends exactly at the border
    shifted = TileGrid((1, 100, 100), TilingConfig(tile=40, boundary="clamp", shift=True))
    for s in range(10):
        o = shifted.at_step(s)
        assert bool(((o >= 0) & (o <= 60)).all())


def test_overlap_grid_spacing():
    plan = plan_axis("height", 96, 32, 8, 1, "torus", False, 16)
    assert plan.origins == (0, 24, 48, 72)


@pytest.mark.parametrize(
    "kwargs,canvas,multiple,match",
    [
        ({"tile": (30, 32)}, (1, 64, 64), 4, "tile height 30 must be a multiple"),
        ({"tile": (32, 32)}, (1, 66, 64), 4, "canvas height 66 must be a multiple"),
        ({"tile": (32, 32), "overlap": 20}, (1, 64, 64), 1, "at most half"),
        ({"tile": (32, 32), "overlap": 3}, (1, 128, 128), 2, "overlap 3 on height must be a multiple"),
    ],
)
def test_grid_geometry_errors(kwargs, canvas, multiple, match):
    with pytest.raises(ValueError, match=match):
        TileGrid(canvas, TilingConfig(**kwargs), multiple=multiple)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"tile": (0, 4)}, "`tile` must be >= 1"),
        ({"tile": "big"}, "`tile` must be an int or a pair"),
        ({"overlap": -1}, "`overlap` must be >= 0"),
        ({"boundary": "wrap"}, "`boundary` must be one of"),
        ({"shift_every": 0}, "`shift_every` must be an int >= 1"),
        ({"shift_period": 1.5}, "`shift_period` must be an int >= 1"),
        ({"ramp": "gauss"}, "`ramp` must be one of"),
        ({"shift": "yes"}, "`shift` must be a bool"),
    ],
)
def test_config_errors_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TilingConfig(**kwargs)


def test_grid_argument_errors():
    with pytest.raises(ValueError, match="`canvas` must be"):
        TileGrid((64, 64), TilingConfig(tile=8))
    with pytest.raises(ValueError, match="`canvas` sizes must be >= 1"):
        TileGrid((0, 64, 64), TilingConfig(tile=8))
    with pytest.raises(ValueError, match="`native_tile`"):
        TileGrid((1, 64, 64), TilingConfig())
    with pytest.raises(ValueError, match="`step` must be an int >= 0"):
        TileGrid((1, 64, 64), TilingConfig(tile=8)).at_step(-1)
    assert TileGrid((1, 64, 64), TilingConfig(), native_tile=(32, 32)).tile == (32, 32)
