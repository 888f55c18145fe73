"""Noise reshifting of the sketch (stage 1) on the tiny Wan: the native steps are the stock pipeline's,
the clean estimate is the model's at the switch step, the lower size is area-averaged and re-noised at
the same step, the rest runs at the lower size, and bad settings fail before any model work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import UniPCMultistepScheduler  # noqa: E402

from supergen import SuperGen, TilingConfig, stages  # noqa: E402
from supergen.config import ReshiftConfig  # noqa: E402
from supergen.tiny import tiny_wan_pipeline  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPT = {"prompt": "a lighthouse at dusk", "negative_prompt": "low quality", "guidance_scale": 4.0}
CALL = dict(height=128, width=128, num_frames=9, num_inference_steps=6, refine_steps=2, **PROMPT)


class RecordingUniPC(UniPCMultistepScheduler):
    def step(self, model_output, timestep, sample, *args, **kwargs):
        self.seen.append((model_output.clone(), sample.clone()))
        return super().step(model_output, timestep, sample, *args, **kwargs)


def _recording_pipe(boundary_ratio=None):
    pipe = tiny_wan_pipeline(boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = RecordingUniPC.from_config(pipe.scheduler.config)
    pipe.scheduler.seen = []
    return pipe


@pytest.fixture()
def pipe():
    return _recording_pipe()


def test_config_and_bad_settings_fail_before_model_work(pipe, monkeypatch):
    with pytest.raises(ValueError, match="`native_steps` must be an int >= 1 but is 0"):
        ReshiftConfig(native_steps=0)
    with pytest.raises(ValueError, match=r"`scale` must be a number in \(0, 1\) but is 1.0"):
        ReshiftConfig(native_steps=2, scale=1.0)
    with pytest.raises(TypeError, match="`reshift` must be a ReshiftConfig or None but is dict"):
        SuperGen(pipe, reshift={"native_steps": 2})

    def no_model_work(*a, **kw):
        raise AssertionError("model work before input checks")

    cases = [
        (ReshiftConfig(native_steps=6), {}, r"`reshift.native_steps` must be in \[1, num_inference_steps=6\) but is 6"),
        (ReshiftConfig(native_steps=2, scale=0.9), {}, "`reshift.scale` 0.9 leaves the sketch at its own size"),
        (ReshiftConfig(native_steps=2), {"sketch_latents": torch.zeros(1, 16, 3, 8, 8)}, "`sketch_latents` is a ready"),
    ]
    for reshift, extra, match in cases:
        sg = SuperGen(pipe, reshift=reshift)
        monkeypatch.setattr(sg.adapter, "sketch", no_model_work)
        with pytest.raises(ValueError, match=match):
            sg(**CALL, **extra)


# Wan 2.2's two experts: the 6 steps' timesteps are 999 937 | 857 750 600 376, so the estimate at step 2
# is the second expert's, guided with guidance_scale_2
@pytest.mark.parametrize("boundary_ratio", [None, 0.9], ids=["one-model", "two-experts"])
def test_native_steps_estimate_and_renoise_are_the_stock_pipelines(boundary_ratio, monkeypatch):
    """The first K steps are the stock pipeline's own; the clean estimate is x - sigma * v with the guided
    prediction the pipeline itself makes at step K; the lower sketch is its area average, re-noised at
    step K; the rest (N - K steps) run at the lower size in the one-tile loop from step K."""
    pipe = _recording_pipe(boundary_ratio)
    text = PROMPT if boundary_ratio is None else dict(PROMPT, guidance_scale_2=2.5)
    K, N = 2, CALL["num_inference_steps"]
    pipe(**text, height=64, width=64, num_frames=9, num_inference_steps=N, output_type="latent",
         generator=torch.Generator().manual_seed(5))  # fmt: skip
    stock = list(pipe.scheduler.seen)  # (guided prediction, input latent) of every stock step
    pipe.scheduler.seen = []

    seen = {}
    real_estimate, real_renoise, real_refine = stages.clean_estimate, stages.renoise, stages.refine

    def estimate(scheduler, prediction, latents, model_output, index):
        seen.update(latents=latents, model_output=model_output, index=index)
        seen["x0"] = real_estimate(scheduler, prediction, latents, model_output, index)
        return seen["x0"]

    def noise(scheduler, x0, index, generator):
        seen.update(small=x0, renoise_index=index, sigma=float(scheduler.sigmas[index]))
        seen["noisy"] = real_renoise(scheduler, x0, index, generator)
        return seen["noisy"]

    def rest(adapter, scheduler, latents, cond, grid, plan, **kw):
        seen.update(rest_input=latents, grid=grid, plan=plan)
        return real_refine(adapter, scheduler, latents, cond, grid, plan, **kw)

    monkeypatch.setattr(stages, "clean_estimate", estimate)
    monkeypatch.setattr(stages, "renoise", noise)
    monkeypatch.setattr(stages, "refine", rest)
    sg = SuperGen(pipe, reshift=ReshiftConfig(native_steps=K, scale=0.5))
    plan, _ = stages.check_inputs(
        sg.adapter.spec, height=128, width=128, sketch_height=64, sketch_width=64, num_frames=9,
        num_inference_steps=N, refine_steps=2, tiling=TilingConfig(),
    )  # fmt: skip
    low = stages.reshifted_sketch(sg.adapter, plan, sg.reshift, pipe.scheduler,
                                  generator=torch.Generator().manual_seed(5), **text)  # fmt: skip

    assert torch.equal(seen["latents"], stock[K][1])  # the stock pipeline's latent after K steps
    assert torch.equal(seen["model_output"], stock[K][0])  # and its own guided prediction at step K
    assert seen["index"] == K and torch.equal(seen["x0"], stock[K][1] - seen["sigma"] * stock[K][0])
    B, C, T, h, w = seen["x0"].shape
    area = F.interpolate(seen["x0"].reshape(B, C * T, h, w), size=(4, 4), mode="area").reshape(B, C, T, 4, 4)
    assert torch.equal(seen["small"], area) and seen["renoise_index"] == K
    assert torch.equal(seen["rest_input"], seen["noisy"])
    assert seen["plan"].begin_index == K and seen["plan"].refine_steps == N - K
    assert seen["grid"].num_tiles == 1 and seen["grid"].tile == (4, 4) and not seen["grid"].config.shift
    assert low.shape == (1, C, 3, 4, 4) and torch.isfinite(low).all()


def test_forwards_native_then_lower(pipe):
    """K + 1 guided forwards at the native size (K steps and the estimate), N - K at the lower size."""
    tokens = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: tokens.append(kwargs["hidden_states"].shape[-2:]), with_kwargs=True
    )
    sg = SuperGen(pipe, reshift=ReshiftConfig(native_steps=2, scale=0.5))

    class SketchDone(Exception):
        pass

    def stop(*args, **kwargs):  # after the sketch: count only stage 1's forwards
        raise SketchDone

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("supergen.pipeline.upscale_latents", stop)
        with pytest.raises(SketchDone):
            sg(**CALL, generator=torch.Generator().manual_seed(0))
    handle.remove()
    native, lower = (8, 8), (4, 4)  # latent cells of the 64x64 sketch and of its half size
    assert tokens == [native] * 2 * 3 + [lower] * 2 * 4  # cond + uncond per step


def test_supergen_with_reshift_is_deterministic_and_reports_it(pipe):
    sg = SuperGen(pipe, reshift=ReshiftConfig(native_steps=3, scale=0.5))
    a = sg(**CALL, generator=torch.Generator().manual_seed(1), output_type="latent")
    b = sg(**CALL, generator=torch.Generator().manual_seed(1), output_type="latent")
    plain = SuperGen(pipe)(**CALL, generator=torch.Generator().manual_seed(1), output_type="latent")
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, plain.latents)
    assert a.latents.shape == plain.latents.shape == (1, 16, 3, 16, 16)
    assert a.report["sizes"]["sketch_reshift"] == {"native_steps": 3, "scale": 0.5, "latent": [3, 4, 4]}
    assert plain.report["sizes"]["sketch_reshift"] is None


def test_image_to_video_conditions_the_lower_size_on_its_own_first_frame(monkeypatch):
    """The continuation's canvas-size inputs (the encoded first frame and mask) are built at the lower size."""
    i2v = tiny_wan_pipeline(image_to_video=True)
    i2v.set_progress_bar_config(disable=True)
    shapes, real_refine = [], stages.refine

    def rest(adapter, scheduler, latents, cond, grid, plan, **kw):
        shapes.append((tuple(latents.shape[-2:]), tuple(cond.canvas_extra.shape[-2:])))
        return real_refine(adapter, scheduler, latents, cond, grid, plan, **kw)

    monkeypatch.setattr(stages, "refine", rest)
    sg = SuperGen(i2v, reshift=ReshiftConfig(native_steps=2, scale=0.5))
    image = torch.rand(1, 3, 64, 64)
    out = sg(**CALL, image=image, generator=torch.Generator().manual_seed(0), output_type="latent")
    assert shapes[0] == ((4, 4), (4, 4))  # the reshifted sketch's rest, then stage 2 on the canvas
    assert out.latents.shape == (1, 16, 3, 16, 16) and torch.isfinite(out.latents).all()
