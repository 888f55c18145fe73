"""LTX-Video adapter against the stock diffusers pipeline, with tiny random-weight models: the protocol
makes a new family one file. Oracles are diffusers' own (the pipeline's recorded scheduler inputs, its
packing and decode, the rotary module's table for the whole canvas)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import LTXImageToVideoPipeline  # noqa: E402
from helpers import LTX_CHANNELS  # noqa: E402
from helpers import ltx_text as _text  # noqa: E402
from helpers import tiny_ltx_pipeline as _pipeline  # noqa: E402

import supergen.adapters.ltx_video  # noqa: E402, F401  (registers the adapter)
from supergen.adapters.base import adapter_for  # noqa: E402
from supergen.adapters.ltx_video import LTXVideoAdapter  # noqa: E402

C = LTX_CHANNELS


def _noise(pipe, shape=(1, C, 3, 8, 16)):
    """Packed noise for the pipeline (its ``latents=`` are packed) and the same unpacked."""
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    return pipe._pack_latents(noise), noise


@pytest.mark.parametrize("guidance", [dict(guidance_scale=1.0), dict(guidance_scale=3.0, guidance_rescale=0.7)])
def test_one_tile_equals_pipeline_prediction(guidance):
    pipe = _pipeline()
    adapter = adapter_for(pipe)
    kwargs = dict(_text(), frame_rate=24, **guidance)
    packed, noise = _noise(pipe)
    pipe(height=32, width=64, num_frames=9, num_inference_steps=2, latents=packed, output_type="latent", **kwargs)
    cond = adapter.conditioning(tuple(noise.shape), **kwargs)
    assert (cond.embeds["uncond"] is not None) == (guidance["guidance_scale"] > 1)
    for model_output, t, sample in pipe.scheduler.seen:
        tile = adapter._unpack(sample, noise.shape)
        pred = adapter.predict(tile, t, cond, torch.zeros(1, 2, dtype=torch.int64), (8, 16))
        assert torch.equal(adapter._pack(pred), model_output)


def test_one_tile_refine_equals_the_pipeline_loop():
    """supergen's refine loop, one tile covering the canvas and no shift, entered at step 1 of 3 of the
    pipeline's own (sequence-length-shifted) schedule, continues the stock pipeline's trajectory bit for bit."""
    from supergen import stages
    from supergen.config import TilingConfig

    pipe = _pipeline()
    adapter = adapter_for(pipe)
    kwargs = dict(_text(), guidance_scale=3.0)
    packed, noise = _noise(pipe)
    stock = pipe(height=32, width=64, num_frames=9, num_inference_steps=3, latents=packed, output_type="latent",
                 **kwargs).frames  # fmt: skip
    entry = adapter._unpack(pipe.scheduler.seen[1][2], noise.shape)
    plan, grid = stages.check_inputs(
        adapter.spec, height=32, width=64, sketch_height=32, sketch_width=64, num_frames=9,
        num_inference_steps=3, refine_steps=2, tiling=TilingConfig(tile=(8, 16), shift=False),
    )  # fmt: skip
    cond = adapter.conditioning(tuple(noise.shape), **kwargs)
    adapter.set_timesteps(pipe.scheduler, 3, sketch_shape=(3, 8, 16))
    refined = stages.refine(adapter, pipe.scheduler, entry, cond, grid, plan)
    assert torch.equal(adapter._pack(refined), stock)
    ours = pipe.scheduler.sigmas.clone()
    adapter.set_timesteps(pipe.scheduler, 3, sketch_shape=(3, 16, 32))  # a larger video shifts its schedule
    assert not torch.equal(ours, pipe.scheduler.sigmas)
    with pytest.raises(ValueError, match="pass `sketch_shape`"):
        adapter.set_timesteps(pipe.scheduler, 3)


def test_canvas_positions_are_slices_of_the_canvas_table():
    pipe = _pipeline()
    adapter = LTXVideoAdapter(pipe, positions="canvas", max_tile_batch=2)
    cond = adapter.conditioning((1, C, 3, 16, 24), **_text(), guidance_scale=3.0, frame_rate=24)
    origins = torch.tensor([[0, 0], [4, 6], [12, 18]])  # the last window wraps on both axes
    seen = []
    handle = pipe.transformer.rope.register_forward_hook(lambda m, a, out: seen.append(out))
    adapter.predict(torch.randn(3, C, 3, 8, 12), torch.tensor(500.0), cond, origins, (16, 24))
    handle.remove()
    assert [cos.shape[0] for cos, _ in seen] == [4, 2]  # tiles batch (x2 for guidance): coordinates are per sample
    cos = torch.cat([c[: c.shape[0] // 2] for c, _ in seen])  # the uncond half; the cond half is the same
    assert torch.equal(torch.cat([c[c.shape[0] // 2 :] for c, _ in seen]), cos)
    # The stock module's table for the whole canvas, from the grid the pipeline would give it.
    full_cos, _ = pipe.transformer.rope(
        torch.empty(1, 3 * 16 * 24, 1), 3, 16, 24, rope_interpolation_scale=cond.extra["rope_interpolation_scale"]
    )
    full = full_cos.view(3, 16, 24, -1)
    for got, (oy, ox) in zip(cos, origins.tolist()):
        table = full.roll((-oy, -ox), dims=(1, 2))[:, :8, :12]
        assert torch.equal(got, table.reshape(-1, full.shape[-1]))
    local = LTXVideoAdapter(pipe)  # local positions: every tile gets the pipeline's own grid (no coordinates)
    seen.clear()
    handle = pipe.transformer.rope.register_forward_hook(lambda m, a, out: seen.append(out))
    local.predict(torch.randn(1, C, 3, 8, 12), torch.tensor(500.0), cond, origins[1:2], (16, 24))
    handle.remove()
    assert torch.equal(seen[0][0][0], full[:, :8, :12].reshape(-1, full.shape[-1]))


def test_tiles_batch_and_name_cache_contexts(monkeypatch):
    pipe = _pipeline()
    one, two = LTXVideoAdapter(pipe), LTXVideoAdapter(pipe, max_tile_batch=2)
    cond = one.conditioning((1, C, 3, 8, 24), **_text(), guidance_scale=3.0)
    names, original = [], pipe.transformer.cache_context
    monkeypatch.setattr(pipe.transformer, "cache_context", lambda name, **kw: names.append(name) or original(name))
    tiles, origins = torch.randn(2, C, 3, 8, 12), torch.tensor([[0, 0], [0, 12]])
    separate = one.predict(tiles, torch.tensor(300.0), cond, origins, (8, 24))
    batched = two.predict(tiles, torch.tensor(300.0), cond, origins, (8, 24))
    assert names == ["cond_uncond/tile0", "cond_uncond/tile1", "cond_uncond/tiles0-1"]
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_separate_guidance_is_what_two_ranks_compute(monkeypatch, rescale):
    """``separate_guidance=True``: two forwards per tile (cond, uncond) that tile parallelism may run on
    two ranks; the prediction is exactly ``guide`` of the two branch outputs, also tile by tile with
    flattened cells (what the computing rank combines), and the batched one up to float rounding."""
    pipe = _pipeline()
    batched, separate = LTXVideoAdapter(pipe), LTXVideoAdapter(pipe, separate_guidance=True)
    cond = separate.conditioning((1, C, 3, 8, 24), **_text(), guidance_scale=3.0, guidance_rescale=rescale)
    unguided = separate.conditioning((1, C, 3, 8, 24), **_text(), guidance_scale=1.0)
    assert batched.guidance_branches(cond) == () and batched.batches_guidance(cond)
    assert separate.guidance_branches(cond) == ("cond", "uncond") and not separate.batches_guidance(cond)
    assert separate.guidance_branches(unguided) == () and not separate.batches_guidance(unguided)
    assert not batched.batches_guidance(unguided)

    tiles, origins = torch.randn(2, C, 3, 8, 12), torch.tensor([[0, 0], [0, 12]])
    t = torch.tensor(300.0)
    names, original = [], pipe.transformer.cache_context
    monkeypatch.setattr(pipe.transformer, "cache_context", lambda name, **kw: names.append(name) or original(name))
    pred = separate.predict(tiles, t, cond, origins, (8, 24))
    assert names == ["cond/tile0", "cond/tile1", "uncond/tile0", "uncond/tile1"]
    assert pred.dtype == torch.float32 == separate.prediction_dtype(torch.float32)
    outputs = {b: separate.predict_branch(tiles, t, cond, origins, (8, 24), b) for b in ("cond", "uncond")}
    # the batched adapter runs a branch alone the same way (parallelism splits its halves where exact)
    assert all(torch.equal(batched.predict_branch(tiles, t, cond, origins, (8, 24), b), o) for b, o in outputs.items())
    assert torch.equal(separate.guide(outputs, cond, t), pred)
    for n in range(2):  # one tile at a time, cells flattened, as the computing rank has them
        flat = {b: o[n : n + 1].flatten(-2) for b, o in outputs.items()}
        assert torch.equal(separate.guide(flat, cond, t), pred[n : n + 1].flatten(-2))
    torch.testing.assert_close(pred, batched.predict(tiles, t, cond, origins, (8, 24)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`branch` must be one of \\('cond', 'uncond'\\) but is 'text'"):
        separate.predict_branch(tiles, t, cond, origins, (8, 24), "text")
    # a bf16 model: branch outputs travel in its dtype, the guided prediction is fp32 (the pipeline upcasts)
    pipe.transformer.to(torch.bfloat16)
    cond = separate.conditioning((1, C, 3, 8, 24), **_text(), guidance_scale=3.0, guidance_rescale=rescale)
    assert separate.predict_branch(tiles, t, cond, origins, (8, 24), "cond").dtype == torch.bfloat16
    assert batched.predict(tiles, t, cond, origins, (8, 24)).dtype == batched.prediction_dtype(torch.float32)


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_sketch_guidance_batched_is_the_pipelines_call(guidance_scale):
    """Tile parallelism may cut the stock pipeline's batched guidance call in two (SketchBatchSplit): the
    adapter says so exactly where the pipeline calls its transformer once per step on both branches."""
    pipe = _pipeline()
    adapter = adapter_for(pipe)
    batches = []
    hook = lambda m, a, kw: batches.append(kw["hidden_states"].shape[0])  # noqa: E731
    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    pipe(height=32, width=64, num_frames=9, num_inference_steps=2, output_type="latent", guidance_scale=guidance_scale,
         **_text())  # fmt: skip
    handle.remove()
    assert batches == ([2, 2] if guidance_scale > 1 else [1, 1])
    assert adapter.sketch_guidance_batched({"guidance_scale": guidance_scale}) == (guidance_scale > 1)
    assert adapter.sketch_guidance_batched({})  # the pipeline's default guidance (3.0)
    assert not adapter.sketch_guidance_pairs({"guidance_scale": guidance_scale})


@pytest.mark.parametrize("timestep_conditioning", [False, True])
def test_vae_round_trip_and_decode_are_the_pipelines(timestep_conditioning):
    pipe = _pipeline(timestep_conditioning=timestep_conditioning)
    options = dict(decode_timestep=0.05, decode_noise_scale=0.025) if timestep_conditioning else {}
    adapter = LTXVideoAdapter(pipe, **options)
    packed, noise = _noise(pipe)
    common = dict(height=32, width=64, num_frames=9, num_inference_steps=2, latents=packed, guidance_scale=1.0,
                  **_text(), **options)  # fmt: skip
    final = pipe(output_type="latent", **common).frames
    # the pipeline draws its decode noise from the call's generator; the adapter from decode_seed (0)
    stock = pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **common).frames
    ours = pipe.video_processor.postprocess_video(adapter.decode(adapter._unpack(final, noise.shape)), output_type="pt")
    assert torch.equal(ours, stock)
    # encode() gives the normalised latent the denoiser works in: its decode is the pipeline's picture
    pixels = adapter.decode(noise)
    again = adapter.decode(adapter.encode(pixels))
    assert again.shape == pixels.shape and torch.isfinite(again).all()


def test_bad_inputs_are_named():
    pipe = _pipeline()
    adapter = adapter_for(pipe)
    text = _text()
    with pytest.raises(ValueError, match="needs `prompt_attention_mask` too"):
        adapter.conditioning((1, C, 3, 8, 12), **{k: v for k, v in text.items() if k != "prompt_attention_mask"})
    with pytest.raises(ValueError, match="no tokenizer: pass `negative_prompt_embeds`"):
        adapter.conditioning((1, C, 3, 8, 12), guidance_scale=3.0, **{k: v for k, v in text.items() if "neg" not in k})
    with pytest.raises(TypeError, match=r"takes no argument\(s\) \['image'\]"):
        adapter.conditioning((1, C, 3, 8, 12), image=torch.rand(1, 3, 8, 8), **text)
    with pytest.raises(ValueError, match=r"pass \['decode_timestep'\] as adapter options"):
        adapter.conditioning((1, C, 3, 8, 12), decode_timestep=0.05, **text)
    with pytest.raises(ValueError, match=r"pass \['decode_noise_scale'\] as adapter options"):
        adapter.sketch(32, 64, 9, decode_noise_scale=0.05, **text)
    with pytest.raises(ValueError, match="`decode_timestep` must be a number but is 'high'"):
        LTXVideoAdapter(pipe, decode_timestep="high")
    with pytest.raises(ValueError, match="LTXImageToVideoPipeline is not supported yet"):
        adapter_for(_pipeline(LTXImageToVideoPipeline))


def test_registry_spec_and_a_supergen_run():
    from supergen import SuperGen, TilingConfig

    pipe = _pipeline()
    adapter = adapter_for(pipe)
    assert isinstance(adapter, LTXVideoAdapter)
    assert adapter.spec.patch == (1, 1, 1) and adapter.spec.prediction == "flow"
    assert adapter.spec.native_latent == (512 // 4, 704 // 4)  # the pipeline's default size, tiny VAE stride 4
    pipe.set_progress_bar_config(disable=True)
    sg = SuperGen(pipe, tiling=TilingConfig(tile=(8, 16)), positions="canvas")
    out = sg(**_text(), guidance_scale=3.0, height=64, width=128, sketch_height=32, sketch_width=64, num_frames=9,
             num_inference_steps=4, refine_steps=2, generator=torch.Generator().manual_seed(0),
             output_type="pt")  # fmt: skip
    report = out.report
    assert out.frames.shape == (1, 9, 3, 64, 128) and torch.isfinite(out.frames).all()
    assert report["model"]["family"] == "ltx_video" and report["tiling"]["tiles_per_step"] == 4
    assert report["sizes"]["sketch_latent"] == [3, 8, 16] and report["sizes"]["canvas_latent"] == [3, 16, 32]
    # tile parallelism may send input halos in a bf16 model's dtype: predict packs (no arithmetic), then casts
    assert adapter.tile_input_dtype(torch.float32) == torch.float32
    pipe.transformer.to(torch.bfloat16)
    assert adapter.tile_input_dtype(torch.float32) == torch.bfloat16
