"""The VAE's decode and encode shared by ranks in bands of whole VAE tiles (supergen.parallel's
decode_in_bands, encode_in_bands): each band's decode (encode), cropped, is bit for bit the whole
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


@pytest.mark.parametrize("family", FAMILIES)
def test_bands_of_vae_tiles_decode_to_the_whole_decode(family):
    pipe = FAMILIES[family]()
    adapter = adapter_for(pipe)
    _small_tiles(pipe, adapter.spec.vae_scale[1])
    assert adapter.vae_tile_geometry() == ((TILE, STRIDE), (TILE, STRIDE))
    assert par.vae_bands_exact(adapter)  # the runtime's own probe agrees
    C, g = adapter.spec.latent_channels, torch.Generator().manual_seed(0)
    for hw, axis in (((20, 11), -2), ((9, 22), -1)):  # banded along the axis with more tiles
        latents = torch.randn(1, C, 2, *hw, generator=g)
        whole = adapter.decode(latents)
        z, args = adapter.vae_inputs(latents)
        plans = []
        for world in (2, 3, 5):
            plan = par.plan_decode_bands(hw, adapter.vae_tile_geometry(), world)
            assert plan.axis == axis and 2 <= len(plan.kept) <= world
            parts = [par.decode_band(adapter, z, args, plan, i) for i in range(len(plan.kept))]
            assert torch.equal(torch.cat(parts, dim=axis), whole), (family, hw, world)
            plans.append(plan)
        assert 1 > plans[0].cost >= plans[-1].cost  # the busiest band decodes less than the whole
        # the upscale's encode (posterior mode) in the same bands: the whole encode's latent
        pixels = whole.clamp(-1, 1)
        encoded = adapter.encode(pixels, None)
        for plan in plans:
            parts = [par.encode_band(adapter, pixels, plan, i) for i in range(len(plan.kept))]
            assert torch.equal(torch.cat(parts, dim=axis), encoded), (family, hw, len(plan.kept))


def test_bands_partition_the_axis_at_tile_starts_with_one_tile_before():
    # Wan's VAE: 256-pixel tiles every 192 pixels, 32 and 24 latent cells; a 4K latent (270 x 480)
    geometry = ((32, 24), (32, 24))
    costs = []
    for world in (2, 4, 8, 64):
        plan = par.plan_decode_bands((270, 480), geometry, world)
        assert plan.axis == -1 and len(plan.kept) <= world  # 20 tile columns against 12 rows
        assert plan.kept[0][0] == 0 and plan.kept[-1][1] == 480
        for (a, b), (nxt, _) in zip(plan.kept, plan.kept[1:]):
            assert b == nxt and a % 24 == 0 and b % 24 == 0 and a < b
        for (a, b), (lo, hi) in zip(plan.kept, plan.inputs):
            assert lo == max(0, a - 24) and hi == (480 if b == 480 else min(480, b - 24 + 32))
        costs.append(plan.cost)
    # the busiest band decodes its own tiles, the one before and the partial one after; the whole decode's
    # 20 columns of tiles cover 19 * 32 + 24 = 632 cells. 2 ranks: the second half, 10 tiles and the one
    # before (10 * 32 + 24 cells); 64: a tile, the one before and 8 cells of the next
    assert costs == sorted(costs, reverse=True)
    assert costs[0] == (10 * 32 + 24) / 632 and costs[-1] == (32 + 32 + 8) / 632
    # at most a tile column each, but the first band has no tile before it: it keeps two for the same cost,
    # and of equal plans the one with the fewest bands is taken
    assert len(par.plan_decode_bands((270, 480), geometry, 64).kept) == 19


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
    assert par.plan_decode_bands(hw, geometry, world) is None


def test_a_vae_whose_bands_are_not_the_whole_fails_the_probe():
    """The bands rest on how diffusers' tiled VAEs lay out their tiles; a decode that depends on the size
    it is given (as a VAE tiled another way would) fails the runtime's probe, and the ranks then decode
    and encode whole (``_plan_vae_bands`` returns no plan)."""
    pipe = tiny_wan_pipeline()
    adapter = adapter_for(pipe)
    _small_tiles(pipe, adapter.spec.vae_scale[1])
    decode = adapter.vae_decode
    adapter.vae_decode = lambda z, *args: decode(z, *args) + 1e-3 * z.shape[-1]
    assert not par.vae_bands_exact(adapter)
    adapter = adapter_for(pipe)  # the verdict is kept per adapter: a fresh one probes again
    assert par.vae_bands_exact(adapter)
