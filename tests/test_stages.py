"""Stages on the tiny Wan: the tiled refine loop against plain denoising loops, re-noise formulas,
determinism, callbacks, and input checks that fire before any model work."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from supergen import SuperGen, TilingConfig  # noqa: E402
from supergen.adapters.base import adapter_for  # noqa: E402
from supergen.stages import check_inputs, refine  # noqa: E402
from supergen.tiny import tiny_wan_pipeline  # noqa: E402
from supergen.upscale import renoise, resize_frames, upscale_latents  # noqa: E402

PROMPT = {"prompt": "a lighthouse at dusk", "negative_prompt": "low quality", "guidance_scale": 4.0}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _setup(pipe, canvas_hw, tiling, steps, k, native=(8, 8), **adapter_kwargs):
    adapter = adapter_for(pipe, **adapter_kwargs)
    adapter.spec = replace(adapter.spec, native_latent=native)
    plan, grid = check_inputs(
        adapter.spec, height=canvas_hw[0] * 8, width=canvas_hw[1] * 8, sketch_height=native[0] * 8,
        sketch_width=native[1] * 8, num_frames=9, num_inference_steps=steps, refine_steps=k, tiling=tiling,
    )  # fmt: skip
    return adapter, plan, grid


def _plain_loop(pipe, latents, steps, begin, guidance_scale=4.0, **text):
    """WanPipeline's denoising loop, written out (as diffusers-notes §3 verified it), from step `begin`."""
    tf, s = pipe.transformer, pipe.scheduler
    pe, ne = pipe.encode_prompt(do_classifier_free_guidance=True, **text)
    s.set_timesteps(steps)
    s.set_begin_index(begin)
    for t in s.timesteps[begin:]:
        x = latents.to(tf.dtype)
        with torch.no_grad():
            c = tf(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=pe, return_dict=False)[0]
            u = tf(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=ne, return_dict=False)[0]
        latents = s.step(u + guidance_scale * (c - u), t, latents, return_dict=False)[0]
    return latents


def _refine(pipe, adapter, plan, grid, latents, **kw):
    pipe.scheduler.set_timesteps(plan.num_inference_steps)
    cond = adapter.conditioning(tuple(latents.shape), num_frames=9, **PROMPT)
    return refine(adapter, pipe.scheduler, latents, cond, grid, plan, **kw)


@pytest.mark.parametrize("canvas_hw", [(8, 8), (8, 12)])
def test_one_tile_refine_equals_plain_loop(pipe, canvas_hw):
    """KEY: one tile covering the canvas, no shift: the refine loop IS the plain denoising loop (fp32, diff 0)."""
    steps, k = 6, 4
    adapter, plan, grid = _setup(pipe, canvas_hw, TilingConfig(shift=False), steps, k, native=canvas_hw)
    assert grid.num_tiles == 1 and grid.tile == canvas_hw
    x = torch.randn(1, 16, 3, *canvas_hw, generator=torch.Generator().manual_seed(0))
    ours = _refine(pipe, adapter, plan, grid, x)
    text = {k: PROMPT[k] for k in ("prompt", "negative_prompt")}
    plain = _plain_loop(pipe, x, steps, steps - k, **text)
    assert (ours - plain).abs().max().item() == 0.0


def test_full_refine_from_noise_equals_the_stock_pipeline(pipe):
    """With k = N from pure noise, stage 2 on one tile reproduces WanPipeline itself, bit for bit."""
    adapter, plan, grid = _setup(pipe, (8, 8), TilingConfig(shift=False), 5, 5)
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stock = pipe(height=64, width=64, num_frames=9, num_inference_steps=5, latents=noise, output_type="latent",
                 **PROMPT).frames  # fmt: skip
    assert torch.equal(_refine(pipe, adapter, plan, grid, noise), stock)


@pytest.mark.parametrize("boundary_ratio", [None, 0.875], ids=["wan2.1", "wan2.2-two-experts"])
def test_i2v_full_refine_equals_the_stock_pipeline(boundary_ratio):
    """Image-to-video: canvas-size conditioning + one tile reproduces WanImageToVideoPipeline exactly (with
    Wan 2.2's two experts too: the switch falls between the 4 steps' timesteps 900 and 750)."""
    import PIL.Image

    i2v = tiny_wan_pipeline(image_to_video=True, boundary_ratio=boundary_ratio)
    i2v.set_progress_bar_config(disable=True)
    text = PROMPT if boundary_ratio is None else dict(PROMPT, guidance_scale_2=2.5)
    image = PIL.Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    adapter, plan, grid = _setup(i2v, (8, 8), TilingConfig(shift=False), 4, 4)
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    stock = i2v(image=image, height=64, width=64, num_frames=9, num_inference_steps=4, latents=noise,
                output_type="latent", **text).frames  # fmt: skip
    i2v.scheduler.set_timesteps(4)
    cond = adapter.conditioning((1, 16, 3, 8, 8), num_frames=9, image=image, **text)
    assert torch.equal(refine(adapter, i2v.scheduler, noise, cond, grid, plan), stock)


def test_fixed_tiles_equal_independent_plain_loops(pipe):
    """No shift, no overlap, local positions: fusing before one canvas step equals denoising each tile
    on its own (the scheduler update is elementwise), so fusion adds nothing and loses nothing."""
    steps, k = 5, 3
    adapter, plan, grid = _setup(pipe, (16, 16), TilingConfig(shift=False), steps, k)
    assert grid.num_tiles == 4
    x = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = _refine(pipe, adapter, plan, grid, x)
    text = {k: PROMPT[k] for k in ("prompt", "negative_prompt")}
    for oy, ox in grid.at_step(0).tolist():
        tile = _plain_loop(pipe, x[..., oy : oy + 8, ox : ox + 8], steps, steps - k, **text)
        torch.testing.assert_close(ours[..., oy : oy + 8, ox : ox + 8], tile, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "tiling",
    [TilingConfig(shift=True), TilingConfig(shift=False, overlap=2), TilingConfig(boundary="clamp", overlap=2)],
)
def test_tiled_refine_steps_the_scheduler_once_per_timestep(pipe, tiling, monkeypatch):
    steps, k = 3, 2
    adapter, plan, grid = _setup(pipe, (16, 24), tiling, steps, k, positions="canvas")
    calls = []
    original = type(pipe.scheduler).step
    monkeypatch.setattr(
        type(pipe.scheduler), "step", lambda s, *a, **kw: calls.append(a[0].shape) or original(s, *a, **kw)
    )
    seen = []

    def callback(owner, i, t, tensors):
        seen.append((i, sorted(tensors)))
        return {"latents": tensors["latents"]}

    x = torch.randn(1, 16, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    out = _refine(pipe, adapter, plan, grid, x, callback_on_step_end=callback,
                  callback_on_step_end_tensor_inputs=("latents", "noise_pred"))  # fmt: skip
    assert calls == [torch.Size([1, 16, 3, 16, 24])] * k  # one canvas-wide step per timestep
    assert seen == [(i, ["latents", "noise_pred"]) for i in range(steps - k, steps)]
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_callback_can_replace_latents(pipe):
    adapter, plan, grid = _setup(pipe, (8, 8), TilingConfig(shift=False), 3, 2)
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    zeroed = _refine(
        pipe, adapter, plan, grid, x, callback_on_step_end=lambda o, i, t, d: {"latents": d["latents"] * 0}
    )
    assert not zeroed.any()


def test_renoise_matches_diffusers_own_formulas():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    x0 = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(6))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(10)
    flow.set_begin_index(3)
    want = flow.scale_noise(x0, flow.timesteps[3:4], noise)
    torch.testing.assert_close(renoise(flow, x0, 3, torch.Generator().manual_seed(7)), want, atol=1e-6, rtol=1e-6)
    ddim = DDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    ddim.set_timesteps(10)
    want = ddim.add_noise(x0, noise, ddim.timesteps[3:4])
    torch.testing.assert_close(renoise(ddim, x0, 3, torch.Generator().manual_seed(7)), want, atol=1e-6, rtol=1e-6)


def test_upscale_modes(pipe):
    adapter = adapter_for(pipe)
    low = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(upscale_latents(adapter, low, (16, 24), mode="latent"), resize_frames(low, (16, 24)))
    up = upscale_latents(adapter, low, (12, 16), mode="pixel")
    assert up.shape == (1, 16, 3, 12, 16) and torch.isfinite(up).all()
    with pytest.raises(ValueError, match="upscale"):
        upscale_latents(adapter, low, (16, 24), mode="nearest")


def test_supergen_same_seed_same_output(pipe):
    sg = SuperGen(pipe, tiling=TilingConfig(), positions="canvas")
    kw = dict(height=96, width=80, num_frames=9, num_inference_steps=4, refine_steps=3, **PROMPT)
    a = sg(generator=torch.Generator().manual_seed(11), **kw)
    b = sg(generator=torch.Generator().manual_seed(11), **kw)
    c = sg(generator=torch.Generator().manual_seed(12), output_type="latent", **kw)
    assert torch.equal(a.latents, b.latents) and np.array_equal(a.frames, b.frames)
    assert not torch.equal(a.latents, c.latents)
    assert a.frames.shape == (1, 9, 96, 80, 3)
    report = a.report
    assert report["sizes"]["canvas_latent"] == [3, 12, 10] and report["tiling"]["tiles_per_step"] == 4
    assert report["steps"] == {"total": 4, "refine": 3, "begin_index": 1}
    assert set(report["seconds"]) == {"backends", "sketch", "upscale", "refine", "decode", "total"}
    # Tiles of 8 cells on 12x10 overlap on the torus: at the last step, edges lie on every 16-pixel column
    # line, so no edge-free line of the patch grid is left to compare with (metrics.seam_score: None).
    assert report["seam_score"] is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"height": 120}, "`height` must be a multiple of 16"),
        ({"width": 48}, "at least the native"),
        ({"num_frames": 8}, "`num_frames` must be 4k\\+1"),
        ({"refine_steps": 0}, "`refine_steps` must be an int >= 1"),
        ({"refine_steps": 5}, "`refine_steps` must be in \\[1, num_inference_steps=4\\]"),
        ({"num_inference_steps": 0}, "`num_inference_steps`"),
        ({"upscale": "nearest"}, "`upscale`"),
        ({"output_type": "gif"}, "`output_type`"),
        ({"guidance_scale": float("nan")}, "`guidance_scale` must be a finite number >= 0 but is nan"),
        ({"refine_guidance_scale": -1.0}, "`refine_guidance_scale` must be a finite number >= 0 but is -1.0"),
        ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_input_fails_before_model_work(pipe, monkeypatch, kwargs, match):
    sg = SuperGen(pipe)

    def no_model_work(*a, **kw):
        raise AssertionError("model work before input checks")

    monkeypatch.setattr(sg.adapter, "sketch", no_model_work)
    monkeypatch.setattr(type(pipe.transformer), "forward", no_model_work)
    call = dict(height=128, width=128, num_frames=9, num_inference_steps=4, refine_steps=3, **PROMPT)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sg(**call)


def test_refine_guidance_scale_sets_stage_two_only(pipe, monkeypatch):
    """``refine_guidance_scale`` is the guidance of the tiles and of nothing else: at 1 each tile runs one
    branch (the sketch keeps both); from a given sketch, stage 2 depends on it alone; unset, it is the
    model's sidecar value (``pipe.supergen_info``), else ``guidance_scale``."""
    sg = SuperGen(pipe)
    kw = dict(height=128, width=64, num_frames=9, num_inference_steps=4, refine_steps=3, output_type="latent")
    forward, calls = type(pipe.transformer).forward, []

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe.transformer), "forward", counting)
    runs = {}
    for name, extra in (("both 4", {}), ("refine 1", {"refine_guidance_scale": 1.0})):
        calls.clear()
        out = sg(**PROMPT, **kw, **extra, generator=torch.Generator().manual_seed(5))
        runs[name] = (len(calls), out)
    tile_steps = runs["both 4"][1].report["tiling"]["tiles_per_step"] * 3
    sketch_calls = 2 * 4  # the stock pipeline: a conditional and an unconditional call per step
    assert runs["both 4"][0] == sketch_calls + 2 * tile_steps
    assert runs["refine 1"][0] == sketch_calls + tile_steps
    assert runs["both 4"][1].report["guidance_scale"] == {"sketch": 4.0, "refine": 4.0}
    assert runs["refine 1"][1].report["guidance_scale"] == {"sketch": 4.0, "refine": 1.0}
    assert not torch.equal(runs["both 4"][1].latents, runs["refine 1"][1].latents)

    # From a given sketch the sketch's guidance plays no part.
    sketch = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw.update(sketch_latents=sketch)
    low = sg(**dict(PROMPT, guidance_scale=1.0), **kw, generator=torch.Generator().manual_seed(5)).latents
    mixed = sg(**PROMPT, **kw, refine_guidance_scale=1.0, generator=torch.Generator().manual_seed(5)).latents
    assert torch.equal(low, mixed)
    # Unset: the sidecar's value; given: it wins.
    monkeypatch.setattr(pipe, "supergen_info", {"refine_guidance_scale": 1.0}, raising=False)
    side = sg(**PROMPT, **kw, generator=torch.Generator().manual_seed(5))
    assert torch.equal(side.latents, low) and side.report["guidance_scale"]["refine"] == 1.0
    given = sg(**PROMPT, **kw, refine_guidance_scale=4.0, generator=torch.Generator().manual_seed(5))
    assert given.report["guidance_scale"]["refine"] == 4.0 and not torch.equal(given.latents, low)


def test_sketch_refuses_the_arguments_it_sets(pipe):
    adapter = adapter_for(pipe)
    for key in ("output_type", "return_dict"):
        with pytest.raises(TypeError, match=f"`{key}` is set by supergen's sketch and cannot be passed"):
            adapter.sketch(64, 64, 9, **{key: "np"}, **PROMPT)


def test_bad_tiling_and_unsupported_pipeline(pipe):
    with pytest.raises(ValueError, match="overlap"):
        SuperGen(pipe, tiling=TilingConfig(overlap=6))(height=128, width=128, num_frames=9, num_inference_steps=2,
                                                      refine_steps=1, **PROMPT)  # fmt: skip

    class NotAVideoPipe:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(ValueError, match="supported transformers: .*WanTransformer3DModel"):
        SuperGen(NotAVideoPipe())


def test_seam_score_sees_a_step_at_a_tile_edge():
    from supergen.metrics import seam_score

    smooth = torch.linspace(0, 1, 32).repeat(1, 3, 2, 32, 1)  # (B, C, F, H, W): a horizontal ramp
    assert seam_score(smooth, [], [16]) == pytest.approx(1.0)
    stepped = smooth.clone()
    stepped[..., 16:] += 0.5  # a visible seam at column 16
    assert seam_score(stepped, [], [16]) > 5.0
    assert seam_score(stepped, [], [8]) < 1.0  # elsewhere the jumps are below the (seam-raised) average
    assert seam_score(stepped, [0], [32]) is None  # borders are not seams


def test_seam_score_on_the_patch_grid_ignores_the_decoders_own_grid_lines():
    from supergen.metrics import seam_score

    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 2, 64, 64, generator=g) * 0.1
    video[..., 16::16] += 0.3  # every 16-pixel column jumps (a decoder's cell lines), tile edge or not
    assert seam_score(video, [], [32]) > 2.0  # against all lines the grid looks like a seam
    assert seam_score(video, [], [32], grid=16) == pytest.approx(1.0, abs=0.15)  # against its own grid: none
    seamed = video.clone()
    seamed[..., 32:] += 0.5  # a real seam on the tile edge at column 32
    assert seam_score(seamed, [], [32], grid=16) > 2.0
    assert seam_score(video, [], [16, 32, 48], grid=16) is None  # no grid line left to compare with
    with pytest.raises(ValueError, match="`grid` must be a positive period of every edge line but is 12"):
        seam_score(video, [], [32], grid=12)


def test_adjacent_reference_follows_where_the_content_lies():
    """Content that thins out away from the middle of the canvas, where a 3x3 grid's edges lie, reads as
    a seam against every grid line; against the edges' neighbours much less so; a real step still does."""
    from supergen.metrics import seam_score

    g = torch.Generator().manual_seed(1)
    x = torch.arange(96.0)
    density = torch.exp(-((x - 48) ** 2) / (2 * 24**2))  # busy middle, quiet borders
    video = torch.rand(1, 3, 2, 96, 96, generator=g) * density
    edges = [32, 64]
    layout = seam_score(video, [], edges, grid=16)
    adjacent = seam_score(video, [], edges, grid=16, reference="adjacent")
    assert layout > 1.2 and abs(adjacent - 1.0) < (layout - 1.0) / 2, (layout, adjacent)
    seamed = video.clone()
    seamed[..., 32:] += 1.0
    assert seam_score(seamed, [], edges, grid=16, reference="adjacent") > 2.0
    with pytest.raises(ValueError, match="`reference` must be 'grid' or 'adjacent' but is 'near'"):
        seam_score(video, [], edges, grid=16, reference="near")
    with pytest.raises(ValueError, match="needs `grid`"):
        seam_score(video, [], edges, reference="adjacent")


@pytest.mark.parametrize("patch_size_t", [None, 2])  # 2: CogVideoX 1.5, whose 3 latent frames the adapter pads
def test_supergen_is_family_agnostic_cogvideox(patch_size_t):
    """The same SuperGen call drives CogVideoX (other layout, batched CFG, v-prediction DDIM re-noise)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        latent_channels=4, down_block_types=("CogVideoXDownBlock3D",) * 3, up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=2,
    )  # fmt: skip
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=1, max_text_seq_length=8, sample_height=8, sample_width=8, sample_frames=9,
        use_rotary_positional_embeddings=True, patch_size_t=patch_size_t,
    )  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction")
    cog = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    cog.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    text = {
        "prompt_embeds": torch.randn(1, 8, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, 8, 16, generator=g),
    }
    sg = SuperGen(cog, native_size=(32, 32))
    kw = dict(height=64, width=64, num_frames=9, num_inference_steps=3, refine_steps=2, guidance_scale=6.0, **text)
    a = sg(generator=torch.Generator().manual_seed(2), output_type="latent", **kw)
    b = sg(generator=torch.Generator().manual_seed(2), output_type="latent", **kw)
    assert torch.equal(a.latents, b.latents) and a.latents.shape == (1, 4, 3, 16, 16)
    assert a.report["model"]["family"] == "cogvideox" and a.report["model"]["scheduler_family"] == "ddpm"
    assert a.report["tiling"]["tiles_per_step"] == 4
    # noise reshifting with a v-prediction model: the clean estimate inverts the DDIM re-noise
    from supergen.config import ReshiftConfig

    reshifted = SuperGen(cog, native_size=(32, 32), reshift=ReshiftConfig(native_steps=1, scale=0.5))
    c = reshifted(generator=torch.Generator().manual_seed(2), output_type="latent", **kw)
    assert c.latents.shape == a.latents.shape and torch.isfinite(c.latents).all()
    assert c.report["sizes"]["sketch_reshift"]["latent"] == [3, 4, 4]


def test_tile_cache_off_changes_nothing_and_budget_computes_its_share(pipe, monkeypatch):
    """cache 'off' is the uncached loop bit for bit; 'budget' computes every tile during the warm-up and
    until a gain has been measured (two consecutive computes), then ceil(budget * N) tiles per step, and
    all of them on the last step; the report counts what was skipped."""
    import math

    from supergen.cache import CacheConfig

    kw = dict(height=128, width=128, num_frames=9, num_inference_steps=6, refine_steps=5, output_type="latent")
    plain = SuperGen(pipe)(generator=torch.Generator().manual_seed(3), **kw, **PROMPT)
    off = SuperGen(pipe, cache=CacheConfig(mode="off"))(generator=torch.Generator().manual_seed(3), **kw, **PROMPT)
    assert torch.equal(plain.latents, off.latents) and off.report["cache"] is None

    sg = SuperGen(pipe, cache=CacheConfig(mode="budget", budget=0.5, warmup=1))
    computed = []
    original = sg.adapter.predict
    monkeypatch.setattr(sg.adapter, "predict", lambda tiles, *a: computed.append(len(a[2])) or original(tiles, *a))
    out = sg(generator=torch.Generator().manual_seed(3), **kw, **PROMPT)
    n = out.report["tiling"]["tiles_per_step"]
    assert computed == [n, n] + [math.ceil(0.5 * n)] * 2 + [n]
    assert out.report["cache"]["skipped_tile_steps"] == 2 * (n - math.ceil(0.5 * n))
    assert torch.isfinite(out.latents).all() and not torch.equal(out.latents, plain.latents)


def test_two_expert_wan_refines_as_the_stock_pipeline_and_the_cache_restarts_at_the_switch(monkeypatch):
    """Wan 2.2 A14B's two experts: stage 2 on one tile from pure noise is the stock two-expert pipeline bit
    for bit (`transformer` above the boundary, `transformer_2` guided with `guidance_scale_2` below); with
    the tile cache, the step the second expert takes over starts a warm-up again (its gains are measured
    on its own computes), so the cache never reuses the first expert's residuals there."""
    import math

    from supergen.cache import CacheConfig

    probe = tiny_wan_pipeline()
    probe.scheduler.set_timesteps(10)
    t = probe.scheduler.timesteps
    pipe = tiny_wan_pipeline(boundary_ratio=float(t[4] + t[5]) / 2 / 1000)  # experts switch at schedule step 5
    pipe.set_progress_bar_config(disable=True)
    text = dict(PROMPT, guidance_scale_2=3.0)
    adapter, plan, grid = _setup(pipe, (8, 8), TilingConfig(shift=False), 10, 10)
    noise = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    stock = pipe(height=64, width=64, num_frames=9, num_inference_steps=10, latents=noise, output_type="latent",
                 **text).frames  # fmt: skip
    pipe.scheduler.set_timesteps(10)
    cond = adapter.conditioning(tuple(noise.shape), num_frames=9, **text)
    assert torch.equal(refine(adapter, pipe.scheduler, noise, cond, grid, plan), stock)

    sg = SuperGen(pipe, cache=CacheConfig(mode="budget", budget=0.5, warmup=1))
    computed = []
    original = sg.adapter.predict
    monkeypatch.setattr(sg.adapter, "predict", lambda tiles, *a: computed.append(len(a[2])) or original(tiles, *a))
    kw = dict(height=128, width=128, num_frames=9, num_inference_steps=10, refine_steps=9, output_type="latent")
    out = sg(generator=torch.Generator().manual_seed(3), **kw, **text)
    n, h = out.report["tiling"]["tiles_per_step"], math.ceil(0.5 * out.report["tiling"]["tiles_per_step"])
    # refine step 4 is schedule step 5, the second expert's first: a warm-up step, then no gain until two of
    # its computes; without the switch steps 4 and 5 would have computed h tiles like 2 and 3
    assert computed == [n, n, h, h, n, n, h, h, n], computed


REHASH_KW = dict(height=128, width=128, num_frames=9, num_inference_steps=6, refine_steps=5, output_type="latent")


def _count_forwards_per_step(sg, monkeypatch):
    """{refine step index: tiles sent to the model} via the adapter's begin_step/predict."""
    counts, current = {}, []
    begin, predict = sg.adapter.begin_step, sg.adapter.predict

    def counting_begin(step_index, *a):
        current[:] = [step_index]
        return begin(step_index, *a)

    def counting_predict(tiles, t, cond, origins, canvas_hw):
        counts[current[0]] = counts.get(current[0], 0) + len(origins)
        return predict(tiles, t, cond, origins, canvas_hw)

    monkeypatch.setattr(sg.adapter, "begin_step", counting_begin)
    monkeypatch.setattr(sg.adapter, "predict", counting_predict)
    return counts


@pytest.mark.parametrize(
    "far_step, key_steps",
    [
        (None, [True, False, False, False, True]),  # every step alike: only the first and the last compute
        (3, [True, False, False, True, True]),  # step 3 unlike key step 0: a new key step
    ],
)
def test_step_rehash_runs_the_model_on_key_steps_only(pipe, monkeypatch, far_step, key_steps):
    from supergen.cache import CacheConfig

    sim = torch.ones(5, 5)
    if far_step is not None:
        sim[far_step, 0] = sim[0, far_step] = 0.5
    sg = SuperGen(pipe, cache=CacheConfig(mode="rehash", rehash_gamma=0.9, rehash_similarity=sim))
    counts = _count_forwards_per_step(sg, monkeypatch)
    out = sg(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
    n, begin = out.report["tiling"]["tiles_per_step"], out.report["steps"]["begin_index"]
    # the sketch's own forwards run at pipeline steps too: count the refine steps only
    refine_counts = [counts.get(begin + i, 0) for i in range(5)]
    assert refine_counts == [n if key else 0 for key in key_steps]
    cache = out.report["cache"]
    assert cache["key_steps"] == key_steps and cache["similarity_source"] == "given"
    assert cache["skipped_tile_steps"] == n * key_steps.count(False) and "calibrate" not in out.report["seconds"]
    assert torch.isfinite(out.latents).all()


def test_step_rehash_gamma_one_is_cache_off_bit_for_bit(pipe):
    """gamma = 1 makes every step a key step (calibrated similarities are < 1): the uncached loop exactly,
    calibration pass included (it must leave no state behind in the scheduler or the model)."""
    from supergen.cache import CacheConfig

    plain = SuperGen(pipe)(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
    out = SuperGen(pipe, cache=CacheConfig(mode="rehash", rehash_gamma=1.0))(
        generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT
    )
    assert out.report["cache"]["key_steps"] == [True] * 5 and out.report["cache"]["skipped_tile_steps"] == 0
    assert torch.equal(out.latents, plain.latents)


def test_step_rehash_calibration_is_deterministic_and_timed_apart(pipe, monkeypatch):
    """No map: a calibration pass (its own seed) measures one; the same seed gives the same map and the
    same video, and passing that map back gives the same video without the calibration pass."""
    from supergen.cache import CacheConfig

    cfg = CacheConfig(mode="rehash", rehash_gamma=0.995, rehash_seed=7)
    sg = SuperGen(pipe, cache=cfg)
    counts = _count_forwards_per_step(sg, monkeypatch)
    a = sg(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
    b = sg(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
    sim = torch.tensor(a.report["cache"]["similarity"])
    assert sim.shape == (5, 5) and torch.equal(sim, torch.tensor(b.report["cache"]["similarity"]))
    torch.testing.assert_close(sim, sim.T)
    torch.testing.assert_close(sim.diagonal(), torch.ones(5))
    assert bool((sim[~torch.eye(5, dtype=torch.bool)] < 1).all())  # distinct steps are never identical
    assert torch.equal(a.latents, b.latents) and a.report["cache"]["similarity_source"] == "calibrated"
    assert "calibrate" in a.report["seconds"] and "seconds['calibrate']" in a.report["cache"]["calibration"]
    key_steps = a.report["cache"]["key_steps"]
    assert key_steps[0] and key_steps[-1] and not all(key_steps), key_steps
    # the main run's forwards follow the schedule; the calibration pass computed every refine step
    begin, n = a.report["steps"]["begin_index"], a.report["tiling"]["tiles_per_step"]
    per_run = [n * (1 + 1) if key else n for key in key_steps]  # calibration + main (key steps only)
    assert [counts.get(begin + i, 0) for i in range(5)] == [2 * v for v in per_run]  # two calls a and b

    given = SuperGen(pipe, cache=CacheConfig(mode="rehash", rehash_gamma=0.995, rehash_similarity=sim))
    c = given(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
    assert torch.equal(c.latents, a.latents) and "calibrate" not in c.report["seconds"]

    other = SuperGen(pipe, cache=CacheConfig(mode="rehash", rehash_seed=8))
    d = other(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
    assert not torch.equal(torch.tensor(d.report["cache"]["similarity"]), sim)


def test_step_rehash_map_size_is_checked_before_model_work(pipe, monkeypatch):
    from supergen.cache import CacheConfig

    sg = SuperGen(pipe, cache=CacheConfig(mode="rehash", rehash_similarity=torch.ones(4, 4)))
    monkeypatch.setattr(sg.adapter, "sketch", lambda *a, **k: pytest.fail("model work before the check"))
    with pytest.raises(ValueError, match=r"`rehash_similarity` must be \(5, 5\) for refine_steps=5"):
        sg(generator=torch.Generator().manual_seed(3), **REHASH_KW, **PROMPT)
