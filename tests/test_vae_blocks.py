"""The VAE's decode and encode shared by ranks in bands of whole VAE tiles (supergen.parallel's
decode_in_blocks, encode_in_blocks): each band's decode (encode), cropped, is bit for bit the whole
decode's pixels (encode's latent) there, for every family's VAE. The multi-process run through
SuperGen is in test_parallel.py."""

from __future__ import annotations

import pytest
import torch
from test_cogvideox_adapter import _pipeline as cogvideox_pipeline
from test_hunyuan_adapter import _pipeline as hunyuan_pipeline
from test_ltx_adapter import _pipeline as ltx_pipeline

from supergen import parallel as par
from supergen.adapters.base import adapter_for
from supergen.tiny import tiny_wan_pipeline

TILE, STRIDE = 8, 6  # latent cells: small VAE tiles, so that tiny canvases span several


def _small_tiles(pipe, scale: int) -> None:
    vae = pipe.vae
    if hasattr(vae, "tile_sample_stride_height"):  # Wan, HunyuanVideo, LTX-Video
        vae.tile_sample_min_height = vae.tile_sample_min_width = TILE * scale
        vae.tile_sample_stride_height = vae.tile_sample_stride_width = STRIDE * scale
    else:  # CogVideoX: a tile and an overlap factor
        overlap = 1 - STRIDE / TILE
        vae.enable_tiling(tile_sample_min_height=TILE * scale, tile_sample_min_width=TILE * scale,
                          tile_overlap_factor_height=overlap, tile_overlap_factor_width=overlap)  # fmt: skip
        vae.disable_tiling()  # the adapter switches it on to decode


FAMILIES = {
    "wan": tiny_wan_pipeline,
    "hunyuan_video": hunyuan_pipeline,
    "ltx_video": lambda: ltx_pipeline(timestep_conditioning=True),  # its decode noise is drawn canvas-wide
    "cogvideox": lambda: cogvideox_pipeline("rope10"),
}


def _assemble(parts, plan, shape, scale=1):
    out = torch.full(shape, float("nan"), dtype=parts[0].dtype)
    for part, ((a, b), (c, d)) in zip(parts, plan.kept):
        out[..., a * scale : b * scale, c * scale : d * scale] = part
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_of_vae_tiles_decode_and_encode_to_the_whole(family):
    pipe = FAMILIES[family]()
    adapter = adapter_for(pipe)
    scale = adapter.spec.vae_scale[1]
    _small_tiles(pipe, scale)
    geometry = adapter.vae_tile_geometry()
    assert geometry == ((TILE, STRIDE), (TILE, STRIDE))
    assert par.vae_blocks_exact(adapter)  # the runtime's own probe agrees
    hw = (20, 23)  # 4 tile starts along each axis, the last tiles cut short
    latents = torch.randn(1, adapter.spec.latent_channels, 2, *hw, generator=torch.Generator().manual_seed(0))
    whole = adapter.decode(latents)
    z, args = adapter.vae_inputs(latents)
    pixels = whole.clamp(-1, 1)
    encoded = adapter.encode(pixels, None)
    # row bands, column bands, blocks, and what the planner picks for 5 ranks
    for grid, world in (((2, 1), 2), ((1, 3), 3), ((2, 2), 4), ((3, 2), 6), (None, 5)):
        plan = par.plan_vae_blocks(hw, geometry, world, grids=None if grid is None else {grid})
        assert grid is None or plan.grid == grid
        assert len(plan.kept) == plan.grid[0] * plan.grid[1] <= world and plan.cost < 1
        parts = [par.decode_block(adapter, z, args, plan, i) for i in range(len(plan.kept))]
        assert torch.equal(_assemble(parts, plan, whole.shape, scale), whole), (family, plan.grid)
        parts = [par.encode_block(adapter, pixels, plan, i) for i in range(len(plan.kept))]
        assert torch.equal(_assemble(parts, plan, encoded.shape), encoded), (family, plan.grid)


def test_blocks_partition_the_canvas_at_tile_starts_with_one_tile_before():
    # Wan's VAE: 256-pixel tiles every 192 pixels, 32 and 24 latent cells; a 4K latent (270 x 480)
    geometry = ((32, 24), (32, 24))
    costs, band_costs = [], []
    for world in (2, 4, 8, 16):
        plan = par.plan_vae_blocks((270, 480), geometry, world)
        assert len(plan.kept) == plan.grid[0] * plan.grid[1] <= world
        cover = torch.zeros(270, 480, dtype=torch.int64)
        for ((a, b), (c, d)), inputs in zip(plan.kept, plan.inputs):
            cover[a:b, c:d] += 1
            for (lo, hi), (x, y), size in zip(inputs, ((a, b), (c, d)), (270, 480)):
                assert x % 24 == 0 and lo == max(0, x - 24) and hi == (size if y == size else min(size, y - 24 + 32))
        assert bool((cover == 1).all())  # every latent cell kept by exactly one rank
        costs.append(plan.cost)
        one_axis = {(k, 1) for k in range(2, world + 1)} | {(1, k) for k in range(2, world + 1)}
        band_costs.append(par.plan_vae_blocks((270, 480), geometry, world, grids=one_axis).cost)
        assert plan.cost <= band_costs[-1]  # blocks never worse than bands
    assert costs == sorted(costs, reverse=True)
    # 2 ranks: the second half of the 20 tile columns, 10 tiles and the one before (10 * 32 + 24 of the
    # whole decode's 19 * 32 + 24 cells); 8 ranks: 2 x 4 blocks, less than the best 8 bands
    assert costs[0] == (10 * 32 + 24) / 632
    assert par.plan_vae_blocks((270, 480), geometry, 8).grid == (2, 4) and costs[2] < 0.85 * band_costs[2]


@pytest.mark.parametrize(
    "hw, geometry, world",
    [
        ((30, 30), ((32, 24), (32, 24)), 4),  # the whole canvas is one VAE tile
        ((270, 480), None, 4),  # a VAE whose tiling is unknown
        ((270, 480), ((32, 24), (32, 24)), 1),  # one rank
        ((270, 480), ((32, 12), (32, 12)), 4),  # overlaps over half a tile: a band's first tile would differ
    ],
)
def test_no_bands_where_they_would_not_decode_the_same(hw, geometry, world):
    assert par.plan_vae_blocks(hw, geometry, world) is None


def test_a_vae_whose_bands_are_not_the_whole_fails_the_probe():
    """The bands rest on how diffusers' tiled VAEs lay out their tiles; a decode that depends on the size
    it is given (as a VAE tiled another way would) fails the runtime's probe, and the ranks then decode
    and encode whole (``_plan_vae_blocks`` returns no plan)."""
    pipe = tiny_wan_pipeline()
    adapter = adapter_for(pipe)
    _small_tiles(pipe, adapter.spec.vae_scale[1])
    decode = adapter.vae_decode
    adapter.vae_decode = lambda z, *args: decode(z, *args) + 1e-3 * z.shape[-1]
    assert not par.vae_blocks_exact(adapter)
    adapter = adapter_for(pipe)  # the verdict is kept per adapter: a fresh one probes again
    assert par.vae_blocks_exact(adapter)


@pytest.mark.parametrize("family", ["hunyuan_video", "ltx_video"])
def test_blocks_are_exact_with_temporal_tiles_too(family):
    """HunyuanVideo's and LTX-Video's VAEs also tile time (frame-wise decoding of long videos, spatial
    tiles inside each time tile, blended over time per pixel): the blocks are still the whole."""
    pipe = FAMILIES[family]()
    adapter = adapter_for(pipe)
    scale = adapter.spec.vae_scale[1]
    _small_tiles(pipe, scale)
    vae = pipe.vae
    vae.use_framewise_decoding = vae.use_framewise_encoding = True
    vae.tile_sample_min_num_frames, vae.tile_sample_stride_num_frames = 8, 4  # 17 frames: several time tiles
    latents = torch.randn(1, adapter.spec.latent_channels, 5, 20, 23, generator=torch.Generator().manual_seed(0))
    whole = adapter.decode(latents)
    z, args = adapter.vae_inputs(latents)
    pixels = whole.clamp(-1, 1)
    encoded = adapter.encode(pixels, None)
    assert whole.shape[2] == 17
    plan = par.plan_vae_blocks((20, 23), adapter.vae_tile_geometry(), 4, grids={(2, 2)})
    parts = [par.decode_block(adapter, z, args, plan, i) for i in range(len(plan.kept))]
    assert torch.equal(_assemble(parts, plan, whole.shape, scale), whole)
    parts = [par.encode_block(adapter, pixels, plan, i) for i in range(len(plan.kept))]
    assert torch.equal(_assemble(parts, plan, encoded.shape), encoded)
