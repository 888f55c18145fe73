"""The Wan adapter: canvas rotary positions, per-tile cache contexts, image-to-video crops, VAE parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supergen.adapters.base import adapter_for

pytest.importorskip("diffusers")

from supergen.tiny import tiny_wan_pipeline  # noqa: E402

PROMPT = {"prompt": "a red fox in the snow", "negative_prompt": "blurry"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def t2v():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2v():
    pipe = tiny_wan_pipeline(image_to_video=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _full_rope(transformer, shape):
    cos, sin = transformer.rope(torch.zeros(shape))  # the stock module: positions 0.. over the canvas
    _, _, T, H, W = shape
    grid = (T, H // 2, W // 2)
    return cos.view(*grid, -1), sin.view(*grid, -1)


@pytest.mark.parametrize("origins", [[(0, 0)], [(4, 6)], [(12, 10), (2, 14), (0, 8)]])
def test_canvas_rope_is_the_slice_of_the_full_canvas_rope(t2v, origins):
    """Each tile's rotary table equals the full-canvas table at its place, wrapped around the torus."""
    adapter = adapter_for(t2v, positions="canvas")
    canvas_shape, tile_hw, batch = (1, 16, 3, 16, 20), (8, 8), 2
    full_cos, full_sin = _full_rope(t2v.transformer, canvas_shape)
    origins_t = torch.tensor(origins)
    tile = torch.zeros(len(origins) * batch, 16, 3, *tile_hw)
    with adapter._positions(origins_t, canvas_shape[-2:], batch):
        cos, sin = t2v.transformer.rope(tile)
    assert cos.shape == (len(origins) * batch, 3 * 4 * 4, 1, full_cos.shape[-1])
    for n, (oy, ox) in enumerate(origins):
        rows = (torch.arange(oy // 2, oy // 2 + 4)) % 8  # canvas 16 rows = 8 patch rows
        cols = (torch.arange(ox // 2, ox // 2 + 4)) % 10
        want_cos = full_cos[:, rows][:, :, cols].reshape(-1, full_cos.shape[-1])
        want_sin = full_sin[:, rows][:, :, cols].reshape(-1, full_sin.shape[-1])
        for b in range(batch):
            assert torch.equal(cos[n * batch + b, :, 0], want_cos)
            assert torch.equal(sin[n * batch + b, :, 0], want_sin)
    # Outside a tile forward the hook is a pass-through: the pipeline's own calls are unchanged.
    cos_plain, _ = t2v.transformer.rope(tile)
    assert torch.equal(cos_plain[0, :, 0], full_cos[:, :4, :4].reshape(-1, full_cos.shape[-1]))


def _predict(adapter, pipe, tiles, origins, canvas_hw, guidance_scale=4.0):
    cond = adapter.conditioning((1, 16, 3, *canvas_hw), guidance_scale=guidance_scale, num_frames=9, **PROMPT)
    adapter.begin_step(0, pipe.scheduler.timesteps[0], None, 1)
    return adapter.predict(tiles, torch.tensor(700.0), cond, torch.tensor(origins), canvas_hw)


def test_canvas_positions_change_only_offset_tiles(t2v):
    """At origin (0, 0) canvas and local positions coincide; elsewhere the tile sees other positions."""
    t2v.scheduler.set_timesteps(4)
    local, canvas = adapter_for(t2v, positions="local"), adapter_for(t2v, positions="canvas")
    tiles = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    origins = [(0, 0), (8, 4)]
    a = _predict(local, t2v, tiles, origins, (16, 16))
    b = _predict(canvas, t2v, tiles, origins, (16, 16))
    assert torch.equal(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_guidance_runs_two_calls_per_tile_in_per_tile_contexts(t2v, monkeypatch):
    """CFG is cond then uncond per tile, each in a cache context named per branch and per tile, and
    tile batching gives the same prediction as one tile per forward."""
    names = []
    original = type(t2v.transformer).cache_context

    def spy(self, name, **kwargs):
        names.append((name, kwargs.get("step_index")))
        return original(self, name, **kwargs)

    monkeypatch.setattr(type(t2v.transformer), "cache_context", spy)
    t2v.scheduler.set_timesteps(4)
    tiles = torch.randn(3, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    one = _predict(adapter_for(t2v), t2v, tiles, [(0, 0), (0, 8), (8, 0)], (16, 16))
    assert names == [(f"{b}/tile{n}", 0) for n in range(3) for b in ("cond", "uncond")]
    names.clear()
    batched = _predict(adapter_for(t2v, max_tile_batch=2), t2v, tiles, [(0, 0), (0, 8), (8, 0)], (16, 16))
    assert [n for n, _ in names] == ["cond/tiles0-1", "uncond/tiles0-1", "cond/tile2", "uncond/tile2"]
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=1e-5)
    names.clear()
    _predict(adapter_for(t2v), t2v, tiles[:1], [(0, 0)], (16, 16), guidance_scale=1.0)
    assert [n for n, _ in names] == ["cond/tile0"]


def test_guidance_branches_computed_apart_give_predict_bit_for_bit(t2v):
    """Tile parallelism may run a tile's two guidance forwards on two ranks: each branch alone, then
    ``guide``, is exactly ``predict`` (canvas positions, so the branches really see the tile's place)."""
    t2v.scheduler.set_timesteps(4)
    adapter = adapter_for(t2v, positions="canvas")
    tiles = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    args = (tiles, torch.tensor(700.0), None, torch.tensor([(0, 0), (8, 4)]), (16, 16))
    cond = adapter.conditioning((1, 16, 3, 16, 16), guidance_scale=4.0, num_frames=9, **PROMPT)
    args = (*args[:2], cond, *args[3:])
    adapter.begin_step(0, t2v.scheduler.timesteps[0], None, 1)
    assert adapter.guidance_branches(cond) == ("cond", "uncond")
    outputs = {b: adapter.predict_branch(*args, b) for b in ("cond", "uncond")}
    assert not torch.equal(outputs["cond"], outputs["uncond"])
    assert torch.equal(adapter.guide(outputs, cond), adapter.predict(*args))
    with pytest.raises(ValueError, match="`branch` must be one of \\('cond', 'uncond'\\) but is 'text'"):
        adapter.predict_branch(*args, "text")
    unguided = adapter.conditioning((1, 16, 3, 16, 16), guidance_scale=1.0, num_frames=9, **PROMPT)
    assert adapter.guidance_branches(unguided) == ()  # one forward per tile: nothing to split


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_sketch_guidance_pairs_are_the_stock_pipelines_calls(t2v, guidance_scale):
    """The stock pipeline guides with two transformer calls per step on one latent input (what tile
    parallelism splits between two ranks in stage 1) exactly where the adapter says so."""
    calls = []
    hook = t2v.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"]), with_kwargs=True)
    try:
        t2v(**PROMPT, height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=guidance_scale,
            output_type="latent")  # fmt: skip
    finally:
        hook.remove()
    pairs = adapter_for(t2v).sketch_guidance_pairs(dict(PROMPT, guidance_scale=guidance_scale))
    assert pairs == (guidance_scale > 1) == (len(calls) == 4)
    assert len(calls) == 2 or (calls[0] is calls[1] and calls[2] is calls[3])
    assert adapter_for(t2v).sketch_guidance_pairs(dict(PROMPT))  # WanPipeline's default guidance_scale 5


def test_i2v_tile_conditioning_is_the_crop_of_the_canvas_conditioning(i2v):
    """Each tile's image channels (mask | first-frame latent) equal the matching (wrapped) crop of the
    canvas conditioning the pipeline's own code builds once."""
    import PIL.Image

    image = PIL.Image.fromarray((np.random.default_rng(0).random((96, 80, 3)) * 255).astype("uint8"))
    adapter = adapter_for(i2v)
    assert adapter.image_to_video
    canvas_hw = (16, 24)
    cond = adapter.conditioning((1, 16, 3, *canvas_hw), guidance_scale=1.0, num_frames=9, image=image, **PROMPT)
    y = cond.canvas_extra
    assert y.shape == (1, 20, 3, *canvas_hw)
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0])) and not y[:, :4, 1:].any()  # first-frame mask

    seen = []
    handle = i2v.transformer.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["hidden_states"]),
                                                       with_kwargs=True)  # fmt: skip
    try:
        origins = [(0, 0), (12, 20), (8, 6)]  # the second wraps on both axes
        tiles = torch.randn(3, 16, 3, 8, 8)
        adapter.begin_step(0, torch.tensor(500.0), None, 1)
        adapter.predict(tiles, torch.tensor(500.0), cond, torch.tensor(origins), canvas_hw)
    finally:
        handle.remove()
    for n, (oy, ox) in enumerate(origins):
        rows = torch.arange(oy, oy + 8) % canvas_hw[0]
        cols = torch.arange(ox, ox + 8) % canvas_hw[1]
        assert torch.equal(seen[n][:, :16], tiles[n : n + 1])
        assert torch.equal(seen[n][:, 16:], y[..., rows[:, None], cols[None, :]])


def test_decode_matches_the_stock_pipeline_output(t2v):
    """The adapter's de-normalisation + decode reproduces WanPipeline's own decoded video exactly."""
    kwargs = dict(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=4.0, **PROMPT)
    latents = t2v(output_type="latent", generator=torch.Generator().manual_seed(3), **kwargs).frames
    video = t2v(output_type="np", generator=torch.Generator().manual_seed(3), **kwargs).frames
    ours = t2v.video_processor.postprocess_video(adapter_for(t2v).decode(latents), output_type="np")
    np.testing.assert_array_equal(ours, video)


def test_encode_inverts_normalisation(t2v):
    """encode() normalises exactly as the pipelines do: (z - latents_mean) / latents_std."""
    adapter = adapter_for(t2v)
    pixels = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = t2v.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(t2v.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(t2v.vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(adapter.encode(pixels), (z - mean) / std, atol=1e-6, rtol=1e-6)


def test_spec_and_registry(t2v):
    adapter = adapter_for(t2v)
    assert adapter.spec.patch == (1, 2, 2) and adapter.spec.vae_scale == (4, 8) and adapter.spec.prediction == "flow"
    assert adapter.spec.pixel_multiple() == 16
    with pytest.raises(ValueError, match="positions"):
        adapter_for(t2v, positions="global")


# -- Wan 2.2 A14B: two experts ------------------------------------------------------------------------


def test_two_experts_switch_at_the_boundary_each_with_canvas_positions():
    """A two-expert pipeline (Wan 2.2 A14B): `transformer` predicts at timesteps >= the boundary,
    `transformer_2` below, both with the tile's canvas positions; `guidance_scale_2` guides the second."""
    pipe = tiny_wan_pipeline(boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    local, canvas = adapter_for(pipe, positions="local"), adapter_for(pipe, positions="canvas")
    assert [local.denoiser_index(torch.tensor(t)) for t in (999, 500, 499.9, 0)] == [0, 0, 1, 1]
    tiles = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    origins, low = torch.tensor([(0, 0), (8, 4)]), torch.tensor(300.0)
    cond = local.conditioning((1, 16, 3, 16, 16), guidance_scale=4.0, guidance_scale_2=2.0, num_frames=9, **PROMPT)
    a, b = (adapter.predict(tiles, low, cond, origins, (16, 16)) for adapter in (local, canvas))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # the second expert's rope is hooked too
    with torch.no_grad():  # below the boundary: transformer_2, guided with guidance_scale_2
        x, text = tiles[:1], {k: v.repeat(1, 1, 1) for k, v in cond.embeds.items() if k in ("cond", "uncond")}
        c, u = (pipe.transformer_2(hidden_states=x, timestep=low.expand(1), encoder_hidden_states=text[k],
                                   return_dict=False)[0] for k in ("cond", "uncond"))  # fmt: skip
    assert torch.equal(a[:1], u + 2.0 * (c - u))
    with pytest.raises(ValueError, match="`guidance_scale_2` is only for two-expert Wan 2.2 pipelines"):
        adapter_for(tiny_wan_pipeline()).conditioning((1, 16, 3, 16, 16), guidance_scale_2=2.0, num_frames=9, **PROMPT)


def test_a_boundary_without_the_second_expert_is_refused():
    pipe = tiny_wan_pipeline(boundary_ratio=0.5)
    pipe.transformer_2 = None
    with pytest.raises(ValueError, match="no `transformer_2`; supergen needs both experts"):
        adapter_for(pipe)
