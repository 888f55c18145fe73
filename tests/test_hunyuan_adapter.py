"""HunyuanVideo adapter against the stock diffusers pipeline, with tiny random-weight models: the
protocol makes a new family one file. Oracles are diffusers' own (the pipeline's recorded scheduler
inputs, the rotary module's table for the whole canvas)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)

import supergen.adapters.hunyuan_video  # noqa: E402, F401  (registers the adapter)
from supergen.adapters.base import adapter_for  # noqa: E402
from supergen.adapters.hunyuan_video import HunyuanVideoAdapter  # noqa: E402

C, TEXT_LEN, TEXT_DIM, POOLED = 4, 8, 16, 8


class RecordingEuler(FlowMatchEulerDiscreteScheduler):
    def step(self, model_output, timestep, sample, *args, **kwargs):
        self.seen.append((model_output.clone(), timestep, sample.clone()))
        return super().step(model_output, timestep, sample, *args, **kwargs)


def _pipeline(image_condition_type=None):
    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=C,
        down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=2,
        spatial_compression_ratio=4,
        mid_block_add_attention=False,
    )
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=C * (2 if image_condition_type == "latent_concat" else 1),
        out_channels=C,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED,
        rope_axes_dim=(4, 6, 6),
        image_condition_type=image_condition_type,
    )
    scheduler = RecordingEuler(shift=7.0)
    scheduler.seen = []
    return HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=vae, scheduler=scheduler,
        text_encoder_2=None, tokenizer_2=None,
    )  # fmt: skip


def _text():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(1, TEXT_LEN)
    mask[:, 6:] = 0  # padded prompt tokens, as the LLaMA encoder returns them
    return dict(
        prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g),
        pooled_prompt_embeds=torch.randn(1, POOLED, generator=g),
        prompt_attention_mask=mask,
        negative_prompt_embeds=torch.randn(1, TEXT_LEN, TEXT_DIM, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, POOLED, generator=g),
        negative_prompt_attention_mask=torch.ones(1, TEXT_LEN),
    )


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0])
def test_one_tile_equals_pipeline_prediction(true_cfg_scale):
    pipe = _pipeline()
    adapter = adapter_for(pipe)
    kwargs = dict(_text(), guidance_scale=4.5, true_cfg_scale=true_cfg_scale)
    noise = torch.randn(1, C, 2, 8, 12, generator=torch.Generator().manual_seed(2))
    calls = []
    record = lambda m, a, k: calls.append(k["hidden_states"])  # noqa: E731
    hook = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    pipe(height=32, width=48, num_frames=5, num_inference_steps=2, latents=noise, output_type="latent", **kwargs)
    hook.remove()
    cond = adapter.conditioning(tuple(noise.shape), **kwargs)
    assert (cond.embeds["uncond"] is not None) == (true_cfg_scale > 1)
    # true CFG is two calls per step on one latent input, which tile parallelism may split in stage 1
    assert adapter.sketch_guidance_pairs(kwargs) == (true_cfg_scale > 1) == (len(calls) == 4)
    assert len(calls) == 2 or (calls[0] is calls[1] and calls[2] is calls[3])
    for model_output, t, sample in pipe.scheduler.seen:
        pred = adapter.predict(sample, t, cond, torch.zeros(1, 2, dtype=torch.int64), (8, 12))
        assert torch.equal(pred, model_output)


def test_true_cfg_branches_computed_apart_give_predict_bit_for_bit():
    pipe = _pipeline()
    adapter = adapter_for(pipe)
    tiles = torch.randn(2, C, 2, 8, 12, generator=torch.Generator().manual_seed(2))
    origins = torch.tensor([(0, 0), (8, 0)])
    cond = adapter.conditioning((1, C, 2, 16, 12), **_text(), guidance_scale=4.5, true_cfg_scale=3.0)
    t = torch.tensor(500.0)
    assert adapter.guidance_branches(cond) == ("cond", "uncond")
    outputs = {b: adapter.predict_branch(tiles, t, cond, origins, (16, 12), b) for b in ("cond", "uncond")}
    assert torch.equal(adapter.guide(outputs, cond), adapter.predict(tiles, t, cond, origins, (16, 12)))
    # guidance embedded (no true CFG): one forward per tile, nothing to split
    embedded = adapter.conditioning((1, C, 2, 16, 12), **_text(), guidance_scale=4.5)
    assert adapter.guidance_branches(embedded) == ()
    with pytest.raises(ValueError, match="`branch` must be one of \\(\\) but is 'uncond'"):
        adapter.predict_branch(tiles, t, embedded, origins, (16, 12), "uncond")


def test_one_tile_refine_equals_the_pipeline_loop():
    """supergen's refine loop, one tile covering the canvas and no shift, entered at step 1 of 3 of the
    pipeline's own schedule, continues the stock pipeline's trajectory bit for bit."""
    from supergen import stages
    from supergen.config import TilingConfig

    pipe = _pipeline()
    adapter = adapter_for(pipe)
    kwargs = dict(_text(), guidance_scale=4.5, true_cfg_scale=2.0)
    noise = torch.randn(1, C, 2, 8, 12, generator=torch.Generator().manual_seed(2))
    stock = pipe(height=32, width=48, num_frames=5, num_inference_steps=3, latents=noise, output_type="latent",
                 **kwargs).frames  # fmt: skip
    entry = pipe.scheduler.seen[1][2]

    plan, grid = stages.check_inputs(
        adapter.spec, height=32, width=48, sketch_height=32, sketch_width=48, num_frames=5,
        num_inference_steps=3, refine_steps=2, tiling=TilingConfig(tile=(8, 12), shift=False),
    )  # fmt: skip
    cond = adapter.conditioning(tuple(noise.shape), **kwargs)
    adapter.set_timesteps(pipe.scheduler, 3)
    refined = stages.refine(adapter, pipe.scheduler, entry, cond, grid, plan)
    assert torch.equal(refined, stock)
    ours = pipe.scheduler.sigmas.clone()
    pipe.scheduler.set_timesteps(3)  # the scheduler's default spacing is another schedule
    assert not torch.equal(ours, pipe.scheduler.sigmas)


def test_canvas_positions_are_slices_of_the_canvas_table():
    pipe = _pipeline()
    adapter = HunyuanVideoAdapter(pipe, positions="canvas", max_tile_batch=4)
    cond = adapter.conditioning((1, C, 2, 16, 24), **_text())
    origins = torch.tensor([[0, 0], [4, 6], [12, 18]])  # the last window wraps on both axes
    seen = []
    handle = pipe.transformer.rope.register_forward_hook(lambda m, a, out: seen.append(out))
    adapter.predict(torch.randn(3, C, 2, 8, 12), torch.tensor(500.0), cond, origins, (16, 24))
    handle.remove()
    assert len(seen) == 3  # one tile per forward: the module returns one table for the batch
    # The stock module's table for the whole canvas (outside a forward the hook passes through).
    full_cos, full_sin = pipe.transformer.rope(torch.empty(1, C, 2, 16, 24))
    for (cos, sin), (oy, ox) in zip(seen, origins.tolist()):
        for got, full in ((cos, full_cos), (sin, full_sin)):
            table = full.view(2, 8, 12, -1).roll((-(oy // 2), -(ox // 2)), dims=(1, 2))[:, :4, :6]
            assert torch.equal(got, table.reshape(-1, full.shape[-1]))


def test_local_tiles_batch_and_name_cache_contexts(monkeypatch):
    pipe = _pipeline()
    one, two = HunyuanVideoAdapter(pipe), HunyuanVideoAdapter(pipe, max_tile_batch=2)
    cond = one.conditioning((1, C, 2, 8, 24), **_text(), true_cfg_scale=2.0)
    names, original = [], pipe.transformer.cache_context
    monkeypatch.setattr(pipe.transformer, "cache_context", lambda name, **kw: names.append(name) or original(name))
    tiles, origins = torch.randn(2, C, 2, 8, 12), torch.tensor([[0, 0], [0, 12]])
    separate = one.predict(tiles, torch.tensor(300.0), cond, origins, (8, 24))
    batched = two.predict(tiles, torch.tensor(300.0), cond, origins, (8, 24))
    assert names == ["cond/tile0", "uncond/tile0", "cond/tile1", "uncond/tile1", "cond/tiles0-1", "uncond/tiles0-1"]
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


def test_decode_is_the_pipelines_and_bad_inputs_are_named():
    pipe = _pipeline()
    adapter = adapter_for(pipe)
    latents = torch.randn(1, C, 2, 8, 12, generator=torch.Generator().manual_seed(3))
    expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    assert torch.equal(adapter.decode(latents), expected)
    text = _text()
    with pytest.raises(ValueError, match="needs `prompt_attention_mask` too"):
        adapter.conditioning((1, C, 2, 8, 12), **{k: v for k, v in text.items() if k != "prompt_attention_mask"})
    with pytest.raises(TypeError, match=r"takes no argument\(s\) \['image'\]"):
        adapter.conditioning((1, C, 2, 8, 12), image=torch.rand(1, 3, 8, 8), **text)
    with pytest.raises(ValueError, match="image-to-video .* is not supported yet"):
        adapter_for(_pipeline("latent_concat"))


def test_registry_and_spec():
    adapter = adapter_for(_pipeline())
    assert isinstance(adapter, HunyuanVideoAdapter)
    assert adapter.spec.patch == (1, 2, 2) and adapter.spec.prediction == "flow"
    assert adapter.spec.native_latent == (720 // 4, 1280 // 4)  # the pipeline's default size, tiny VAE stride 4
