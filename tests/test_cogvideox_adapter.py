"""CogVideoX adapter against the stock diffusers pipelines, with tiny random-weight models.

The oracle is always diffusers itself: the pipeline's own denoising step (recorded from its
scheduler), its own rotary tables (``_prepare_rotary_positional_embeddings``) and its own image
latents (``prepare_latents``), never outputs of supergen recorded earlier.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed  # noqa: E402

from supergen.adapters.base import adapter_for  # noqa: E402
from supergen.adapters.cogvideox import CogVideoXAdapter, consistent_overlap  # noqa: E402

TEXT_LEN, TEXT_DIM, C = 8, 16, 4
S = 4  # tiny VAE: 3 blocks -> 4x spatial, 4x temporal


class RecordingDDIM(CogVideoXDDIMScheduler):
    """The pipeline's scheduler, remembering what each step was given: the guided prediction, t, x_t."""

    def step(self, model_output, timestep, sample, *args, **kwargs):
        self.seen.append((model_output.clone(), timestep, sample.clone()))
        return super().step(model_output, timestep, sample, *args, **kwargs)


def _scheduler():
    s = RecordingDDIM(timestep_spacing="trailing", prediction_type="v_prediction", rescale_betas_zero_snr=True)
    s.seen = []
    return s


def _pipeline(kind: str, i2v: bool = False, sample_hw=(8, 12)):
    """``kind``: ``sincos`` (CogVideoX-2b style), ``rope10`` (5b style) or ``rope15`` (1.5 style)."""
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        latent_channels=C,
        down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=2,
    )
    rope = kind != "sincos"
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16 if rope else 8,  # RoPE splits the head dim in eighths
        in_channels=2 * C if i2v else C,
        out_channels=C,
        time_embed_dim=8,
        ofs_embed_dim=8 if kind == "rope15" and i2v else None,
        text_embed_dim=TEXT_DIM,
        num_layers=1,
        max_text_seq_length=TEXT_LEN,  # sincos models need prompts of exactly this length
        sample_height=sample_hw[0],
        sample_width=sample_hw[1],
        sample_frames=9,
        patch_size_t=2 if kind == "rope15" else None,
        use_rotary_positional_embeddings=rope,
    )
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    return cls(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=_scheduler())


def _text(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)


def _bcthw(x):
    return x.permute(0, 2, 1, 3, 4)


def _spy(transformer, calls):
    """Record the keyword arguments of every transformer forward."""
    return transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)


# -- (1) one tile covering the canvas == the pipeline's own guided prediction ---------------------------


@pytest.mark.parametrize(
    "kind,i2v,batch,dynamic",
    [("sincos", False, 1, False), ("rope10", False, 1, True), ("rope15", True, 2, False), ("rope15", False, 1, False)],
)
def test_one_tile_equals_pipeline_prediction(kind, i2v, batch, dynamic):
    pipe = _pipeline(kind, i2v)
    adapter = adapter_for(pipe)
    pe, ne = _text(batch)
    frames, (h, w) = 9, (8, 12)  # 3 latent frames: 1.5 pads one at the start
    noise = torch.randn(batch, 3 + (kind == "rope15"), C, h, w, generator=torch.Generator().manual_seed(2))
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=6.0, use_dynamic_cfg=dynamic)
    if i2v:
        kwargs["image"] = torch.rand(batch, 3, h * S, w * S, generator=torch.Generator().manual_seed(3))
    pipe(height=h * S, width=w * S, num_frames=frames, num_inference_steps=2, latents=noise, output_type="latent",
         generator=torch.Generator().manual_seed(4), **kwargs)  # fmt: skip
    assert len(pipe.scheduler.seen) == 2

    cond = adapter.conditioning(
        (batch, C, noise.shape[1], h, w), generator=torch.Generator().manual_seed(4), num_inference_steps=2, **kwargs
    )
    for model_output, t, sample in pipe.scheduler.seen:
        pred = adapter.predict(_bcthw(sample), t, cond, torch.zeros(1, 2, dtype=torch.int64), (h, w))
        assert pred.dtype == torch.float32
        assert torch.equal(pred, _bcthw(model_output)), f"t={int(t)}: {(pred - _bcthw(model_output)).abs().max()}"


@pytest.mark.parametrize("kind,i2v,solver", [("rope10", False, "dpm"), ("rope15", True, "ddim")])
def test_one_tile_loop_equals_the_pipeline_loop(kind, i2v, solver):
    """predict + scheduler_step over a whole schedule reproduce the pipeline's final latent bit for bit
    (DPM carries the previous x0 and draws SDE noise from the generator every step)."""
    pipe = _pipeline(kind, i2v)
    if solver == "dpm":
        pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    adapter = adapter_for(pipe)
    pe, ne = _text()
    noise = torch.randn(1, 4, C, 8, 12, generator=torch.Generator().manual_seed(2))
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=6.0)
    if i2v:
        kwargs["image"] = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    stock = pipe(height=32, width=48, num_frames=13, num_inference_steps=3, latents=noise, output_type="latent",
                 generator=torch.Generator().manual_seed(4), **kwargs).frames  # fmt: skip

    cond = adapter.conditioning((1, C, 4, 8, 12), generator=torch.Generator().manual_seed(4), **kwargs)
    scheduler, generator, state = pipe.scheduler, torch.Generator().manual_seed(4), {}
    if i2v:  # the pipeline drew the image posterior from its generator before the loop
        torch.randn(1, C, 1, 8, 12, generator=generator)
    scheduler.set_timesteps(3)
    x = _bcthw(noise)
    for i, t in enumerate(scheduler.timesteps):
        pred = adapter.predict(x, t, cond, [[0, 0]], (8, 12))
        x = adapter.scheduler_step(scheduler, pred, t, x, step_index=i, state=state, generator=generator)
    assert torch.equal(x, _bcthw(stock))


def test_one_tile_refine_equals_the_pipeline_loop():
    """supergen's refine loop with one tile covering the canvas and no shift, entered at step 1 of 3,
    continues the stock I2V pipeline's own trajectory bit for bit."""
    from supergen import stages
    from supergen.config import TilingConfig

    pipe = _pipeline("rope15", i2v=True)
    adapter = adapter_for(pipe)
    pe, ne = _text()
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=6.0, image=image)
    noise = torch.randn(1, 4, C, 8, 12, generator=torch.Generator().manual_seed(2))
    stock = pipe(height=32, width=48, num_frames=13, num_inference_steps=3, latents=noise, output_type="latent",
                 generator=torch.Generator().manual_seed(4), **kwargs).frames  # fmt: skip
    entry = pipe.scheduler.seen[1][2]  # the pipeline's latent entering step 1

    plan, grid = stages.check_inputs(
        adapter.spec, height=32, width=48, sketch_height=32, sketch_width=48, num_frames=13,
        num_inference_steps=3, refine_steps=2, tiling=TilingConfig(tile=(8, 12), shift=False),
    )  # fmt: skip
    cond = adapter.conditioning((1, C, 4, 8, 12), generator=torch.Generator().manual_seed(4), **kwargs)
    pipe.scheduler.set_timesteps(3)
    refined = stages.refine(adapter, pipe.scheduler, _bcthw(entry), cond, grid, plan)
    assert torch.equal(refined, _bcthw(stock))


def test_tiles_batched_per_forward_and_named_cache_contexts(monkeypatch):
    pipe = _pipeline("rope10")
    pe, ne = _text()
    one, two = CogVideoXAdapter(pipe), CogVideoXAdapter(pipe, max_tile_batch=2)
    cond = one.conditioning((1, C, 2, 16, 12), prompt_embeds=pe, negative_prompt_embeds=ne)
    canvas = torch.randn(1, C, 2, 16, 12)
    origins = torch.tensor([[0, 0], [8, 0]])
    tiles = canvas.view(1, C, 2, 2, 8, 12).permute(3, 0, 1, 2, 4, 5).reshape(2, C, 2, 8, 12)

    names, calls = [], []
    original = pipe.transformer.cache_context

    def recording(name, **kw):
        names.append(name)
        return original(name, **kw)

    monkeypatch.setattr(pipe.transformer, "cache_context", recording)
    handle = _spy(pipe.transformer, calls)
    separate = one.predict(tiles, torch.tensor(500), cond, origins, (16, 12))
    batched = two.predict(tiles, torch.tensor(500), cond, origins, (16, 12))
    handle.remove()
    assert names == ["cond_uncond/tile0", "cond_uncond/tile1", "cond_uncond/tiles0-1"]
    assert [c["hidden_states"].shape[0] for c in calls] == [2, 2, 4]  # CFG doubles each forward's batch
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,i2v,dynamic", [("rope15", True, False), ("rope10", False, True)])
def test_separate_guidance_is_what_two_ranks_compute(monkeypatch, kind, i2v, dynamic):
    """``separate_guidance=True``: two forwards per tile (cond, uncond) that tile parallelism may run on
    two ranks; the prediction is exactly ``guide`` of the two branch outputs, also tile by tile with
    flattened cells (what the computing rank combines), and the batched one up to float rounding."""
    pipe = _pipeline(kind, i2v)
    pe, ne = _text(batch=2)
    batched, separate = CogVideoXAdapter(pipe), CogVideoXAdapter(pipe, separate_guidance=True)
    frames, canvas_hw = 3, (8, 24)
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=6.0, use_dynamic_cfg=dynamic,
                  num_inference_steps=10)  # fmt: skip
    if i2v:
        kwargs["image"] = torch.rand(2, 3, 8 * S, 24 * S, generator=torch.Generator().manual_seed(3))
    cond = separate.conditioning((2, C, frames, *canvas_hw), generator=torch.Generator().manual_seed(4), **kwargs)
    unguided = separate.conditioning((2, C, frames, *canvas_hw), **dict(kwargs, guidance_scale=1.0))
    assert batched.guidance_branches(cond) == () and batched.batches_guidance(cond)
    assert separate.guidance_branches(cond) == ("cond", "uncond") and not separate.batches_guidance(cond)
    assert separate.guidance_branches(unguided) == () and not separate.batches_guidance(unguided)
    assert not batched.batches_guidance(unguided)

    tiles = torch.randn(4, C, frames, 8, 12, generator=torch.Generator().manual_seed(5))  # 2 tiles x batch 2
    origins, t = torch.tensor([[0, 0], [0, 12]]), torch.tensor(700)
    names, original = [], pipe.transformer.cache_context
    monkeypatch.setattr(pipe.transformer, "cache_context", lambda name, **kw: names.append(name) or original(name))
    pred = separate.predict(tiles, t, cond, origins, canvas_hw)
    assert names == ["cond/tile0", "cond/tile1", "uncond/tile0", "uncond/tile1"]
    assert pred.dtype == torch.float32 == separate.prediction_dtype(torch.float32)
    outputs = {b: separate.predict_branch(tiles, t, cond, origins, canvas_hw, b) for b in ("cond", "uncond")}
    # the batched adapter runs a branch alone the same way (parallelism splits its halves where exact)
    for b, o in outputs.items():
        assert torch.equal(batched.predict_branch(tiles, t, cond, origins, canvas_hw, b), o)
    assert torch.equal(separate.guide(outputs, cond, t), pred)
    for n in range(2):  # one tile (its batch of 2) at a time, cells flattened, as the computing rank has them
        rows = slice(2 * n, 2 * n + 2)
        flat = {b: o[rows].flatten(-2) for b, o in outputs.items()}
        assert torch.equal(separate.guide(flat, cond, t), pred[rows].flatten(-2))
    torch.testing.assert_close(pred, batched.predict(tiles, t, cond, origins, canvas_hw), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`branch` must be one of \\('cond', 'uncond'\\) but is 'text'"):
        separate.predict_branch(tiles, t, cond, origins, canvas_hw, "text")
    # a bf16 model: branch outputs travel in its dtype, the guided prediction is fp32 (the pipeline upcasts)
    pipe.transformer.to(torch.bfloat16)
    cond = separate.conditioning((2, C, frames, *canvas_hw), generator=torch.Generator().manual_seed(4), **kwargs)
    assert separate.predict_branch(tiles, t, cond, origins, canvas_hw, "cond").dtype == torch.bfloat16
    assert batched.predict(tiles, t, cond, origins, canvas_hw).dtype == batched.prediction_dtype(torch.float32)


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_sketch_guidance_batched_is_the_pipelines_call(guidance_scale):
    """Tile parallelism may cut the stock pipeline's batched guidance call in two (SketchBatchSplit): the
    adapter says so exactly where the pipeline calls its transformer once per step on both branches."""
    pipe = _pipeline("rope10")
    adapter = adapter_for(pipe)
    pe, ne = _text()
    calls = []
    handle = _spy(pipe.transformer, calls)
    pipe(height=8 * S, width=12 * S, num_frames=9, num_inference_steps=2, output_type="latent", prompt_embeds=pe,
         negative_prompt_embeds=ne, guidance_scale=guidance_scale)  # fmt: skip
    handle.remove()
    assert [c["hidden_states"].shape[0] for c in calls] == ([2, 2] if guidance_scale > 1 else [1, 1])
    assert adapter.sketch_guidance_batched({"guidance_scale": guidance_scale}) == (guidance_scale > 1)
    assert adapter.sketch_guidance_batched({})  # the pipeline's default guidance (6.0)
    assert not adapter.sketch_guidance_pairs({"guidance_scale": guidance_scale})


def test_dpm_steps_a_region_with_the_canvas_noise_under_parallelism():
    """Tile parallelism steps each rank's region ``(B, C, T, 1, K)``; CogVideoX's DPM draws its SDE noise
    (twice a step after the first) in the shape it steps. Under :func:`supergen.parallel.canvas_noise` the
    region's steps give exactly the canvas steps' values at its cells, from the same generator."""
    from supergen.parallel import canvas_noise

    pipe = _pipeline("rope10")
    adapter = adapter_for(pipe)
    scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(5)
    g = torch.Generator().manual_seed(1)
    canvas, preds = torch.randn(1, C, 2, 4, 6, generator=g), [torch.randn(1, C, 2, 4, 6, generator=g) for _ in range(3)]
    cells = torch.tensor([1, 4, 7, 8, 15, 23])  # a staircase of the 4 x 6 canvas, as a rank's region can be

    def run(x, region):
        state, noise = {}, torch.Generator().manual_seed(7)
        for i, eps in enumerate(preds):
            t = scheduler.timesteps[i]
            if region:
                with canvas_noise(scheduler, cells, (4, 6)):
                    eps = eps.flatten(-2)[..., cells].unsqueeze(-2)
                    x = adapter.scheduler_step(scheduler, eps, t, x, step_index=i, state=state, generator=noise)
            else:
                x = adapter.scheduler_step(scheduler, eps, t, x, step_index=i, state=state, generator=noise)
        return x

    whole = run(canvas, region=False)
    part = run(canvas.flatten(-2)[..., cells].unsqueeze(-2), region=True)
    assert torch.equal(part[..., 0, :], whole.flatten(-2)[..., cells])
    # without it the region draws its own, smaller noise: not the one-process values
    plain = canvas.flatten(-2)[..., cells].unsqueeze(-2)
    state, noise = {}, torch.Generator().manual_seed(7)
    for i, eps in enumerate(preds):
        eps = eps.flatten(-2)[..., cells].unsqueeze(-2)
        plain = adapter.scheduler_step(scheduler, eps, scheduler.timesteps[i], plain, step_index=i, state=state,
                                       generator=noise)  # fmt: skip
    assert not torch.equal(plain[..., 0, :], whole.flatten(-2)[..., cells])


# -- (2) positions ---------------------------------------------------------------------------------------


def _canvas_table(pipe, frames, canvas_hw):
    """The pipeline's own rotary table for the whole canvas, as (T', H/2, W/2, D)."""
    cos, sin = pipe._prepare_rotary_positional_embeddings(canvas_hw[0] * S, canvas_hw[1] * S, frames, "cpu")
    shape = (-1, canvas_hw[0] // 2, canvas_hw[1] // 2, cos.shape[-1])
    return cos.view(shape), sin.view(shape)


def _window(table, origin, tile_hw):
    """Rows/columns of a (T', GH, GW, D) table for a tile at ``origin`` (latent cells), wrapped."""
    rolled = table.roll((-(origin[0] // 2), -(origin[1] // 2)), dims=(1, 2))
    return rolled[:, : tile_hw[0] // 2, : tile_hw[1] // 2].reshape(-1, table.shape[-1])


@pytest.mark.parametrize("kind", ["rope10", "rope15"])
def test_canvas_positions_are_slices_of_the_canvas_table(kind):
    # 1.5 caps positions at its sample grid, so its canvas is the sample size and the tiles smaller.
    sample, canvas, tile = ((8, 12), (16, 24), (8, 12)) if kind == "rope10" else ((16, 24), (16, 24), (8, 12))
    pipe = _pipeline(kind, sample_hw=sample)
    adapter = adapter_for(pipe, positions="canvas")
    pe, ne = _text()
    frames = 4
    cond = adapter.conditioning((1, C, frames, *canvas), prompt_embeds=pe, negative_prompt_embeds=ne)
    origins = torch.tensor([[0, 0], [4, 6], [12, 18], [10, 0]])  # the last two wrap around the torus
    calls = []
    handle = _spy(pipe.transformer, calls)
    adapter.predict(torch.randn(4, C, frames, *tile), torch.tensor(700), cond, origins, canvas)
    handle.remove()
    cos, sin = _canvas_table(pipe, frames, canvas)
    assert len(calls) == 4  # canvas positions differ per tile: one forward each
    for call, origin in zip(calls, origins.tolist()):
        got_cos, got_sin = call["image_rotary_emb"]
        assert torch.equal(got_cos, _window(cos, origin, tile)) and torch.equal(got_sin, _window(sin, origin, tile))


def test_canvas_positions_1_0_are_crops_in_base_grid_units():
    """A CogVideoX 1.0 tile inside the canvas gets the linspace RoPE of its own crop of the base grid."""
    pipe = _pipeline("rope10", sample_hw=(8, 12))  # base grid 4x6; canvas 2x that in both axes
    adapter = CogVideoXAdapter(pipe, positions="canvas")
    canvas, tile, origin = (16, 24), (8, 12), (4, 10)
    grid, tile_grid = (canvas[0] // 2, canvas[1] // 2), (tile[0] // 2, tile[1] // 2)
    # The canvas maps onto base-grid crop (0, 0)-(4, 6); linspace(start, stop * (n - 1) / n, n) spaces
    # positions stop / n apart, so a tile at cell (y, x) starts at y * 4 / 8 and spans 4 base units.
    top, left = origin[0] // 2 * 4 / grid[0], origin[1] // 2 * 6 / grid[1]
    bottom, right = top + tile_grid[0] * 4 / grid[0], left + tile_grid[1] * 6 / grid[1]
    pos = [(top + i * (bottom - top) / tile_grid[0]) for i in range(tile_grid[0])]
    stop_h = pos[-1] * tile_grid[0] / (tile_grid[0] - 1)  # the quirky linspace end: stop * (n-1)/n == last
    pos_w = [(left + i * (right - left) / tile_grid[1]) for i in range(tile_grid[1])]
    stop_w = pos_w[-1] * tile_grid[1] / (tile_grid[1] - 1)
    expected = get_3d_rotary_pos_embed(16, ((top, left), (stop_h, stop_w)), tile_grid, 3)
    got = adapter.rotary_emb(3, tile, origin, canvas)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_local_positions_are_what_the_pipeline_builds_for_a_tile():
    for kind in ("rope10", "rope15"):
        pipe = _pipeline(kind, sample_hw=(16, 24))
        adapter = adapter_for(pipe)  # local
        for frames, tile in ((4, (8, 12)), (2, (16, 8))):
            got = adapter.rotary_emb(frames, tile, (6, 2), (32, 48))
            expected = pipe._prepare_rotary_positional_embeddings(tile[0] * S, tile[1] * S, frames, "cpu")
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), (kind, frames, tile)


def test_1_5_canvas_beyond_max_size_is_refused_unless_extended():
    pipe = _pipeline("rope15", sample_hw=(8, 12))  # max_size = 4x6 tokens
    with pytest.raises(ValueError, match=r"8x12 rotary positions exceed .* `max_size` 4x6"):
        CogVideoXAdapter(pipe, positions="canvas").rotary_emb(4, (8, 12), (0, 0), (16, 24))
    extended = CogVideoXAdapter(pipe, positions="canvas", extend_positions=True)
    cos, _ = extended.rotary_emb(4, (8, 12), (8, 12), (16, 24))  # the tile beyond the sample grid
    # Extended positions continue the integer grid: cell (4, 6) has positions (4, 6), which the
    # pipeline's own table (starting at 0) holds at the same frequencies for a wider max_size.
    wide, _ = get_3d_rotary_pos_embed(16, None, (8, 12), 2, grid_type="slice", max_size=(8, 12))
    assert torch.equal(cos, _window(wide.view(2, 8, 12, -1), (8, 12), (8, 12)))


def test_sincos_models_refuse_canvas_positions_and_1_0_refuses_extension():
    with pytest.raises(ValueError, match="sincos positions .* use `positions='local'`"):
        CogVideoXAdapter(_pipeline("sincos"), positions="canvas")
    with pytest.raises(ValueError, match="`extend_positions` applies to CogVideoX 1.5"):
        CogVideoXAdapter(_pipeline("rope10"), positions="canvas", extend_positions=True)


# -- (3) image-to-video conditioning ---------------------------------------------------------------------


@pytest.mark.parametrize("frames", [4, 3])
def test_i2v_canvas_latent_is_the_pipelines_and_tiles_see_their_crop(frames):
    pipe = _pipeline("rope15", i2v=True)
    adapter = adapter_for(pipe)
    pe, ne = _text()
    canvas = (8, 12)
    image = torch.rand(1, 3, canvas[0] * S, canvas[1] * S, generator=torch.Generator().manual_seed(5))
    cond = adapter.conditioning((1, C, frames, *canvas), image=image, prompt_embeds=pe, negative_prompt_embeds=ne,
                                generator=torch.Generator().manual_seed(6))  # fmt: skip
    # The pipeline's own image latents at canvas size (it pads 1.5's odd frame counts to even).
    pixels = pipe.video_processor.preprocess(image, height=canvas[0] * S, width=canvas[1] * S)
    padded = frames + frames % 2
    _, reference = pipe.prepare_latents(pixels, 1, C, 4 * (padded - 1) + 1, canvas[0] * S, canvas[1] * S,
                                        torch.float32, "cpu", torch.Generator().manual_seed(6),
                                        latents=torch.zeros(1, padded, C, *canvas))  # fmt: skip
    assert torch.equal(cond.canvas_extra, _bcthw(reference))

    origins, tile = torch.tensor([[0, 0], [6, 8]]), (4, 6)  # the second window wraps on both axes
    calls = []
    handle = _spy(pipe.transformer, calls)
    pred = adapter.predict(torch.randn(2, C, frames, *tile), torch.tensor(300), cond, origins, canvas)
    handle.remove()
    assert pred.shape == (2, C, frames, *tile)
    for call, (oy, ox) in zip(calls, origins.tolist()):
        image_channels = _bcthw(call["hidden_states"][:, :, C:])
        crop = cond.canvas_extra.roll((-oy, -ox), dims=(3, 4))[..., : tile[0], : tile[1]]
        assert torch.equal(image_channels, torch.cat([crop, crop]))  # both CFG halves
        assert torch.equal(call["ofs"], torch.tensor([2.0]))


# -- (4) layouts, VAE and frame padding ------------------------------------------------------------------


def test_sketch_is_the_pipeline_latent_in_supergen_layout():
    pipe = _pipeline("rope15", i2v=True)
    adapter = adapter_for(pipe)
    pe, ne = _text()
    image = torch.rand(1, 3, 32, 48)
    args = dict(image=image, prompt_embeds=pe, negative_prompt_embeds=ne, num_inference_steps=1)
    stock = pipe(height=32, width=48, num_frames=9, output_type="latent", generator=torch.Generator().manual_seed(0),
                 **args).frames  # fmt: skip
    pipe.scheduler.seen = []
    sketch = adapter.sketch(32, 48, 9, generator=torch.Generator().manual_seed(0), **args)
    assert len(pipe.scheduler.seen) == 1  # the call's `num_inference_steps` reached the pipeline
    assert stock.shape == (1, 4, C, 8, 12)  # 3 latent frames + 1 leading padding frame
    assert torch.equal(sketch, _bcthw(stock[:, 1:]))  # what the pipeline would decode, as (B, C, T, H, W)
    with pytest.raises(ValueError, match="4k\\+1 .* but is 10"):
        adapter.sketch(32, 48, 10, **args)
    with pytest.raises(TypeError, match="`output_type` is set by supergen"):
        adapter.sketch(32, 48, 9, output_type="pil", **args)


def test_decode_encode_layout_scaling_and_consistent_vae_tiles():
    pipe = _pipeline("sincos")
    adapter, vae = adapter_for(pipe), pipe.vae
    latents = torch.randn(1, C, 1, 6, 8, generator=torch.Generator().manual_seed(7))
    # Untiled (the tiny latent is smaller than the VAE's tile): exactly the pipeline's decode, and the
    # encoder's posterior sample times `scaling_factor` (as CogVideoX's video-to-video pipeline encodes).
    pixels = adapter.decode(latents)
    assert torch.equal(pixels, pipe.decode_latents(_bcthw(latents)))
    z = adapter.encode(pixels, torch.Generator().manual_seed(8))
    posterior = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(8))
    assert torch.equal(z, vae.config.scaling_factor * posterior)

    # A user tile whose overlap is not whole latent cells: stock tiled decode returns the wrong size.
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16)
    before = {k: getattr(vae, k) for k in ("use_tiling", "tile_overlap_factor_height", "tile_overlap_factor_width")}
    assert tuple(vae.decode(latents).sample.shape[-2:]) != (24, 32)
    tiled = adapter.decode(latents)
    assert tiled.shape == pixels.shape and tuple(pixels.shape[-2:]) == (24, 32)
    assert {k: getattr(vae, k) for k in before} == before  # the user's settings are restored
    assert adapter.encode(tiled, None).shape == latents.shape


def test_consistent_overlap_keeps_tiled_sizes_exact():
    # The VAE's own 480x720 defaults (30x45 latent tiles at 1/6, 1/5) are consistent and kept as they are.
    assert consistent_overlap(30, 1 / 6, 8) == 5 / 30 and consistent_overlap(45, 1 / 5, 8) == 9 / 45
    for lt in (2, 3, 4, 5, 16, 30, 45):
        for f in (1 / 6, 1 / 5, 0.25, 0.4):
            g = consistent_overlap(lt, f, 8)
            st = lt * 8
            assert int(lt * (1 - g)) * 8 == st - int(st * g)  # tiled_decode: stride == kept pixels
            assert int(st * (1 - g)) == (lt - int(lt * g)) * 8  # tiled_encode: the same, mirrored
            assert abs(g - f) <= 0.5 / lt + 1e-9 or g == 0.0


def test_odd_frames_on_1_5_are_padded_at_the_start_and_dropped():
    pipe = _pipeline("rope15")
    adapter = adapter_for(pipe)
    pe, ne = _text()
    cond = adapter.conditioning((1, C, 3, 8, 12), prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=5.0)
    x, t = torch.randn(1, C, 3, 8, 12), torch.tensor(600)
    pred = adapter.predict(x, t, cond, [[0, 0]], (8, 12))
    # By hand: the first frame repeated in front (4 frames, one temporal patch pair each), CFG, drop it.
    padded = _bcthw(torch.cat([x[:, :, :1], x], dim=2))
    rope = pipe._prepare_rotary_positional_embeddings(32, 48, 4, "cpu")
    out = pipe.transformer(torch.cat([padded, padded]), torch.cat([ne, pe]), t.expand(2), image_rotary_emb=rope,
                           return_dict=False)[0]  # fmt: skip
    uncond, text = out.chunk(2)
    assert torch.equal(pred, _bcthw((uncond + 5.0 * (text - uncond))[:, 1:]))


def test_bad_inputs_name_the_values():
    pipe = _pipeline("sincos")
    adapter = adapter_for(pipe)
    pe, ne = _text()
    with pytest.raises(ValueError, match="exactly `max_text_seq_length`=8 tokens long but are 5"):
        adapter.conditioning((1, C, 2, 8, 12), prompt_embeds=pe[:, :5], negative_prompt_embeds=ne[:, :5])
    with pytest.raises(ValueError, match="pass `prompt_embeds` and `negative_prompt_embeds`"):
        adapter.conditioning((1, C, 2, 8, 12), prompt_embeds=pe)
    with pytest.raises(TypeError, match=r"takes no argument\(s\) \['image'\]"):
        adapter.conditioning(
            (1, C, 2, 8, 12), prompt_embeds=pe, negative_prompt_embeds=ne, image=torch.rand(1, 3, 8, 8)
        )
    with pytest.raises(ValueError, match="2 prompt\\(s\\) for a canvas batch of 1"):
        adapter.conditioning(
            (1, C, 2, 8, 12), prompt_embeds=pe.repeat(2, 1, 1), negative_prompt_embeds=ne.repeat(2, 1, 1)
        )
    cond = adapter.conditioning((1, C, 2, 8, 12), prompt_embeds=pe, negative_prompt_embeds=ne)
    with pytest.raises(ValueError, match="2 frames as in `cond`"):
        adapter.predict(torch.randn(1, C, 2 + 1, 8, 12), torch.tensor(1), cond, [[0, 0]], (8, 12))
    with pytest.raises(ValueError, match="multiples of the patch 2"):
        adapter.predict(torch.randn(1, C, 2, 7, 12), torch.tensor(1), cond, [[0, 0]], (8, 12))
    with pytest.raises(ValueError, match="image-to-video needs `image`"):
        adapter_for(_pipeline("rope15", i2v=True)).conditioning((1, C, 2, 8, 12), prompt_embeds=pe,
                                                                negative_prompt_embeds=ne)  # fmt: skip


# -- (5) registry ----------------------------------------------------------------------------------------


def test_adapter_for_chooses_cogvideox_for_both_pipelines():
    t2v, i2v = adapter_for(_pipeline("rope10")), adapter_for(_pipeline("rope15", i2v=True))
    assert isinstance(t2v, CogVideoXAdapter) and isinstance(i2v, CogVideoXAdapter)
    assert (t2v.image_to_video, i2v.image_to_video) == (False, True)
    assert t2v.spec.patch == (1, 2, 2) and i2v.spec.patch == (2, 2, 2)
    assert t2v.spec.vae_scale == (4, S) and t2v.spec.prediction == "v" and t2v.spec.native_latent == (8, 12)
