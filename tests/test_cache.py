"""The tile cache gate, budget mode, region awareness, Step Rehash and the diffusers-cache guard,
driven by synthetic canvases and synthetic "models" whose behaviour we control exactly."""

import pytest
import torch
from helpers import tiny_wan_transformer

from supergen import TileGrid, TilingConfig
from supergen.cache import (
    CacheConfig,
    StepRehash,
    TileCache,
    check_model_caches,
    step_rehash_schedule,
    step_similarity,
)
from supergen.ops import blend_scatter, halo_gather


def run_loop(cache, grid, steps, x_of_step, model):
    """A refinement-like loop: per step, gate → compute/reuse → record. Returns per-step compute masks."""
    masks = []
    for i in range(steps):
        x = x_of_step(i)
        origins = grid.at_step(i)
        compute = cache.plan(i, steps, x, origins, grid.tile)
        tiles = halo_gather(x, origins, grid.tile)
        pred = torch.empty_like(tiles)
        B = x.shape[0]
        for n in range(origins.shape[0]):
            rows = slice(n * B, (n + 1) * B)
            if compute[n]:
                pred[rows] = model(tiles[rows], i)
        skipped = (~compute).nonzero().flatten()
        if len(skipped):
            reused = cache.reuse(x, origins[skipped], grid.tile)
            for j, n in enumerate(skipped.tolist()):
                pred[n * B : (n + 1) * B] = reused[j * B : (j + 1) * B]
        cache.record(i, x, origins, grid.tile, compute, pred)
        blend_scatter(pred, origins, x.shape[-2:], wrap=grid.wrap)
        masks.append(compute.clone())
    return masks


def slow_canvas(i, scale=1e-3):
    g = torch.Generator().manual_seed(0)
    base = torch.randn((1, 2, 1, 8, 8), generator=g)
    return base + scale * i


GRID = TileGrid((1, 8, 8), TilingConfig(tile=4, shift=False))


def test_warmup_and_last_step_always_compute():
    cfg = CacheConfig(mode="gate", threshold=1e9, warmup=2, max_skips=100)
    masks = run_loop(TileCache(cfg), GRID, 8, slow_canvas, lambda t, i: 2 * t)
    assert all(bool(m.all()) for m in masks[:2])
    assert bool(masks[-1].all())
    assert not any(bool(m.any()) for m in masks[3:-1])  # a huge threshold skips everything else


def test_gain_is_held_through_skips_not_frozen_at_one():
    """Output = 3 * input: the gain measured on consecutive computes is 3 and must stay 3 through a
    run of skips (the published code recomputed it from reused outputs and got exactly 1.0)."""
    cfg = CacheConfig(mode="gate", threshold=1e9, warmup=3, max_skips=4, region_aware=False)
    cache = TileCache(cfg)
    run_loop(cache, GRID, 3, slow_canvas, lambda t, i: 3 * t)
    torch.testing.assert_close(cache._gain, torch.full((8, 8), 3.0), rtol=1e-4, atol=0)
    masks = run_loop_continue(cache, 3, 7, 12)
    assert not any(bool(m.any()) for m in masks)  # steps 3..6 all skipped
    torch.testing.assert_close(cache._gain, torch.full((8, 8), 3.0), rtol=1e-4, atol=0)


@pytest.mark.parametrize("shift", [False, True])
def test_overlapping_windows_measure_their_gain_and_skip(shift):
    """On an uneven torus grid neighbouring windows overlap (26 columns, 4 tiles of 8 every 6-7): every
    tile still measures its gain from the state at the start of the step, so the gate can skip them
    (a tile sharing cells with an earlier tile of the step used to keep no gain and always compute)."""
    grid = TileGrid((1, 22, 26), TilingConfig(tile=8, shift=shift))
    assert grid.num_tiles == 12

    def canvas(i, scale=1e-3):
        return torch.randn((1, 2, 1, 22, 26), generator=torch.Generator().manual_seed(0)) + scale * i

    cfg = CacheConfig(mode="gate", threshold=1e9, warmup=3, max_skips=4, region_aware=False)
    cache = TileCache(cfg)
    masks = run_loop(cache, grid, 8, canvas, lambda t, i: 3 * t)
    assert all(bool(m.all()) for m in masks[:3]) and bool(masks[-1].all())
    assert not any(bool(m.any()) for m in masks[3:-1])  # every tile skipped between warm-up and the end
    torch.testing.assert_close(cache._gain, torch.full((22, 26), 3.0), rtol=1e-4, atol=0)


def test_half_precision_predictions_are_held_in_their_dtype_with_the_same_decisions():
    """A bf16 model's last predictions are held in bf16 (half the memory and half the bytes of that
    tensor when a region changes hands), and the cache decides exactly as when the same values come in
    fp32: the output change it measures is taken in the latents' dtype either way."""
    from supergen.parallel import tile_cache_cell_bytes

    grid = TileGrid((1, 16, 16), TilingConfig(tile=8, shift=True))

    def canvas(i):
        return torch.randn((1, 2, 1, 16, 16), generator=torch.Generator().manual_seed(0)) * (1 + 0.02 * i)

    def run(dtype):
        cache = TileCache(CacheConfig(mode="budget", budget=0.5, warmup=2, max_skips=3))
        masks = []
        for i in range(8):
            x = canvas(i)
            origins = grid.at_step(i)
            compute = cache.plan(i, 8, x, origins, grid.tile)
            tiles = halo_gather(x, origins, grid.tile)
            pred = torch.tanh(1.5 * tiles + 0.1 * i).to(torch.bfloat16).to(dtype)  # a bf16 model's output
            skipped = (~compute).nonzero().flatten()
            if len(skipped):
                reused = cache.reuse(x, origins[skipped], grid.tile).to(dtype)
                for j, n in enumerate(skipped.tolist()):
                    pred[n : n + 1] = reused[j : j + 1]
            cache.record(i, x, origins, grid.tile, compute, pred)
            masks.append(compute.tolist())
        return cache, masks

    (half, half_masks), (full, full_masks) = run(torch.bfloat16), run(torch.float32)
    assert half._last_o.dtype == torch.bfloat16 and full._last_o.dtype == torch.float32
    assert half_masks == full_masks and any(not all(m) for m in half_masks)  # it really skips
    for name in ("_residual", "_gain", "_acc", "_o_abs", "_motion"):
        assert torch.equal(getattr(half, name), getattr(full, name)), name
    assert torch.equal(half._last_o.float(), full._last_o)
    like = torch.zeros(1, 16, 11, 1)
    assert tile_cache_cell_bytes(half, like, torch.bfloat16) == tile_cache_cell_bytes(full, like) - 16 * 11 * 2


def run_loop_continue(cache, start, stop, total):
    masks = []
    for i in range(start, stop):
        x = slow_canvas(i)
        origins = GRID.at_step(i)
        compute = cache.plan(i, total, x, origins, GRID.tile)
        pred = cache.reuse(x, origins, GRID.tile)
        cache.record(i, x, origins, GRID.tile, compute, pred)
        masks.append(compute)
    return masks


def test_predicted_change_uses_held_gain():
    cfg = CacheConfig(mode="gate", threshold=1e9, warmup=3, max_skips=9, region_aware=False)
    cache = TileCache(cfg)
    run_loop(cache, GRID, 3, slow_canvas, lambda t, i: 3 * t)
    x = slow_canvas(3)
    change = cache.predicted_change(3, x, GRID.at_step(3), GRID.tile)
    o_abs = (3 * slow_canvas(2)).abs().mean(dim=(0, 1, 2))
    expected = torch.stack([3 * 1e-3 / o_abs[r : r + 4, c : c + 4].mean() for r in (0, 4) for c in (0, 4)])
    torch.testing.assert_close(change, expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("max_skips", [1, 2, 3])
def test_max_skips_bounds_consecutive_skips(max_skips):
    cfg = CacheConfig(mode="gate", threshold=1e9, warmup=2, max_skips=max_skips)
    masks = run_loop(TileCache(cfg), GRID, 14, slow_canvas, lambda t, i: 2 * t)
    per_tile = torch.stack(masks).T  # (N, steps)
    for tile in per_tile.tolist():
        run = 0
        for computed in tile:
            run = 0 if computed else run + 1
            assert run <= max_skips
    assert int((~torch.stack(masks)).sum()) > 0


def test_budget_computes_largest_predicted_changes():
    """Each of the four tiles drifts at a different speed; budget 0.5 computes the two fastest, and the
    accumulated change of the skipped ones brings them back later (no tile starves)."""
    speeds = torch.tensor([[1.0, 8.0], [4.0, 2.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)

    def x_of_step(i):
        return torch.ones((1, 2, 1, 8, 8)) + 1e-3 * i * speeds

    cfg = CacheConfig(mode="budget", budget=0.5, warmup=2, max_skips=100, region_aware=False)
    masks = run_loop(TileCache(cfg), GRID, 8, x_of_step, lambda t, i: 2 * t)
    assert masks[2].tolist() == [False, True, True, False]  # tiles (0,4) speed 8 and (4,0) speed 4
    assert all(int(m.sum()) == 2 for m in masks[2:-1])
    assert bool(torch.stack(masks[2:-1]).any(0)[[0, 3]].all())


def test_cache_state_follows_shifted_content():
    """Residuals are stored per canvas cell: after the grid shifts, a reused tile gets the residual
    computed for exactly the cells under its new window."""
    grid = TileGrid((1, 8, 8), TilingConfig(tile=4, shift=True, shift_period=4))
    cache = TileCache(CacheConfig(mode="gate"))
    x0 = slow_canvas(0)
    origins0 = grid.at_step(0)
    cache.plan(0, 10, x0, origins0, grid.tile)
    bias = torch.arange(64.0).view(8, 8)  # residual = position-dependent bias

    def model(t, origin):
        oy, ox = origin
        rows = torch.arange(oy, oy + 4) % 8
        cols = torch.arange(ox, ox + 4) % 8
        return t + bias[rows[:, None], cols[None, :]]

    tiles = halo_gather(x0, origins0, 4)
    pred = torch.cat([model(tiles[n : n + 1], o) for n, o in enumerate(origins0.tolist())])
    cache.record(0, x0, origins0, grid.tile, torch.ones(4, dtype=torch.bool), pred)
    x1 = slow_canvas(1)
    origins1 = grid.at_step(1)
    assert not torch.equal(origins0, origins1)
    reused = cache.reuse(x1, origins1, grid.tile)
    expected = torch.cat([model(halo_gather(x1, [o], 4), o) for o in origins1.tolist()])
    torch.testing.assert_close(reused, expected)


def test_region_aware_thresholds_favour_moving_content():
    """Left half: predictions change a lot every step; right half: static. The static tiles get the
    higher threshold (skipped more), the moving ones the lower."""
    grid = TileGrid((1, 8, 8), TilingConfig(tile=4, shift=False))

    def moving_model(tiles, i, origins):
        out = tiles.clone()
        for n, (_, ox) in enumerate(origins.tolist()):
            if ox < 4:
                out[n] = tiles[n] + 0.5 * ((-1) ** i)
        return out

    cache = TileCache(CacheConfig(mode="gate", warmup=5))
    for i in range(5):
        x = slow_canvas(i)
        origins = grid.at_step(i)
        cache.plan(i, 10, x, origins, grid.tile)
        pred = moving_model(halo_gather(x, origins, 4) + 1.0, i, origins)
        cache.record(i, x, origins, grid.tile, torch.ones(4, dtype=torch.bool), pred)
    thr = cache.thresholds(grid.at_step(5), grid.tile)  # tiles: (0,0) (0,4) (4,0) (4,4)
    assert thr[1] > thr[0] and thr[3] > thr[2]
    assert float(thr.max()) <= 0.1 * 2.0 + 1e-6 and float(thr.min()) >= 0.1 / 2.0 - 1e-6


def test_off_mode_computes_everything():
    masks = run_loop(TileCache(CacheConfig()), GRID, 6, slow_canvas, lambda t, i: t)
    assert all(bool(m.all()) for m in masks)


def test_step_rehash_schedule():
    S = 8
    sim = torch.eye(S)
    sim[1, 0] = sim[2, 0] = 0.95  # steps 1, 2 close to 0
    sim[3, 0] = 0.5
    sim[4, 3] = sim[5, 3] = sim[6, 3] = sim[7, 3] = 0.99
    assert step_rehash_schedule(sim, 0.9) == [True, False, False, True, False, False, False, True]
    assert step_rehash_schedule(sim, 1.0) == [True] * S
    with pytest.raises(ValueError, match="square"):
        step_rehash_schedule(torch.ones(3, 4), 0.9)
    with pytest.raises(ValueError, match="`gamma` must be in"):
        step_rehash_schedule(sim, 0.0)


def test_step_similarity_is_the_cosine_of_flattened_residuals():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 2, 3, 4, 4, generator=g)
    b = torch.randn(1, 2, 3, 4, 4, generator=g)
    sim = step_similarity([a, 3 * a, b, -a])
    cos_ab = float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))
    assert sim.shape == (4, 4) and sim.dtype == torch.float32
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4))
    assert float(sim[0, 1]) == pytest.approx(1.0)  # scale-free: one gamma means the same at any scale
    assert float(sim[0, 3]) == pytest.approx(-1.0)
    assert float(sim[0, 2]) == pytest.approx(cos_ab, abs=1e-6)


def test_step_rehash_reuses_the_key_steps_canvas_residual():
    """A non-key step's prediction is its own input plus the last key step's residual (prediction -
    input), so it follows the input the scheduler moved; key steps replace the residual."""
    rehash = StepRehash([True, False, True, False, True])
    x0, x1, x2, x3 = (torch.full((1, 2, 1, 4, 4), float(v)) for v in (1, 2, 3, 4))
    assert rehash.computes(0)
    rehash.record(0, x0, x0 + 10, num_tiles=4)
    assert not rehash.computes(1)
    torch.testing.assert_close(rehash.reuse(x1), x1 + 10)
    rehash.record(1, x1, rehash.reuse(x1), num_tiles=4)
    rehash.record(2, x2, 5 * x2, num_tiles=4)
    torch.testing.assert_close(rehash.reuse(x3), x3 + 4 * x2)
    assert (rehash.stats.computed, rehash.stats.skipped) == (8, 4)
    assert rehash.stats.per_step[1] == [False] * 4


def test_step_rehash_from_config_and_calibration():
    sim = torch.ones(4, 4)
    assert StepRehash.from_config(CacheConfig(mode="rehash", rehash_similarity=sim), 4).schedule == [
        True, False, False, True,
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"must be \(5, 5\) for 5 refinement steps"):
        StepRehash.from_config(CacheConfig(mode="rehash", rehash_similarity=sim), 5)
    with pytest.raises(ValueError, match="calibrate it first"):
        StepRehash.from_config(CacheConfig(mode="rehash"), 4)
    with pytest.raises(ValueError, match="compute its last step"):
        StepRehash([True, False])
    calib = StepRehash.calibration(3)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 2, 1, 4, 4, generator=g) for _ in range(3)]
    preds = [torch.randn(1, 2, 1, 4, 4, generator=g) for _ in range(3)]
    with pytest.raises(RuntimeError, match="every step"):
        calib.similarity()
    for i in range(3):
        assert calib.computes(i)
        calib.record(i, xs[i], preds[i], num_tiles=1)
    torch.testing.assert_close(calib.similarity(), step_similarity([p - x for p, x in zip(preds, xs)]))


def test_rehash_similarity_is_validated():
    with pytest.raises(ValueError, match="square"):
        CacheConfig(mode="rehash", rehash_similarity=torch.ones(3, 4))
    with pytest.raises(ValueError, match="finite"):
        CacheConfig(mode="rehash", rehash_similarity=torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        CacheConfig(mode="rehash", rehash_similarity=[[1.0]])
    with pytest.raises(ValueError, match="`rehash_seed` must be an int >= 0"):
        CacheConfig(mode="rehash", rehash_seed=-1)
    # a map is data, not part of the policy's identity: configs still compare and hash
    assert CacheConfig(mode="rehash", rehash_similarity=torch.ones(2, 2)) == CacheConfig(mode="rehash")
    hash(CacheConfig(mode="rehash", rehash_similarity=torch.ones(2, 2)))


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("off", ("off", None)),
        ("gate", ("gate", None)),
        ("budget:0.75", ("budget", 0.75)),
        ("rehash:0.9", ("rehash", 0.9)),
    ],
)
def test_cache_spec_parsing(spec, expected):
    cfg = CacheConfig.parse(spec)
    assert cfg.mode == expected[0]
    if expected[0] == "budget":
        assert cfg.budget == expected[1]
    if expected[0] == "rehash":
        assert cfg.rehash_gamma == expected[1]


@pytest.mark.parametrize(
    "spec,match",
    [
        ("fast", "`--cache` must be"),
        ("budget:x", "`--cache` must be"),
        ("budget:1.5", "`budget` must be in"),
        ("gate:1", "`--cache`"),
        ("rehash", "`--cache` must be"),
        ("rehash:0", "`rehash_gamma` must be in"),
    ],
)
def test_cache_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        CacheConfig.parse(spec)


def test_config_errors():
    with pytest.raises(ValueError, match="`threshold` must be a number > 0"):
        CacheConfig(mode="gate", threshold=0)
    with pytest.raises(ValueError, match="`max_skips` must be an int >= 0"):
        CacheConfig(max_skips=-1)
    with pytest.raises(TypeError, match="CacheConfig"):
        TileCache("gate")


def tiny_wan():
    return tiny_wan_transformer(in_channels=4, out_channels=4, num_layers=2)


def test_hook_state_caches_are_refused_and_context_caches_accepted():
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

    model = tiny_wan()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    check_model_caches(model)  # per-context state: fine with one context per tile
    model.disable_cache()
    model.enable_cache(
        PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500)
    )
    with pytest.raises(ValueError, match="PyramidAttentionBroadcast cannot be used with tiled refinement"):
        check_model_caches(model)
