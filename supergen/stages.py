"""The two stages of SuperGen, written as the method reads.

Stage 1 (:func:`sketch`) is the stock pipeline at the model's native size (or, with noise
reshifting, :func:`reshifted_sketch`: its first steps at the native size, the rest at a lower one).
Between the stages the sketch is upscaled in pixel space and re-noised to step N−k of the same
N-step schedule (:mod:`supergen.upscale`). Stage 2 (:func:`refine`) denoises the canvas for the last
k steps: at each step the tile grid is placed (shifted every step, or overlapping with blend ramps),
every tile is a native-size forward of the same model, the tile predictions are fused into one
canvas prediction and the scheduler takes ONE step on the whole canvas — one trajectory, so
multistep schedulers work unchanged. Model quirks live in the adapter; nothing here branches on the
model family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .adapters.base import Conditioning, ModelAdapter, ModelSpec
from .cache import StepRehash
from .config import ReshiftConfig, TilingConfig
from .ops import blend_scatter, halo_gather
from .tiling import TileGrid
from .upscale import UPSCALE_MODES, clean_estimate, renoise

#: Tensors ``callback_on_step_end`` may see (and replace: only ``latents`` is read back).
CALLBACK_TENSOR_INPUTS = ("latents", "noise_pred", "origins")


@dataclass(frozen=True)
class Plan:
    """Validated sizes and steps of one generation (pixels unless named ``*_latent``)."""

    sketch_hw: tuple[int, int]
    target_hw: tuple[int, int]
    num_frames: int
    latent_frames: int
    sketch_latent: tuple[int, int]
    canvas_latent: tuple[int, int]
    num_inference_steps: int
    refine_steps: int

    @property
    def begin_index(self) -> int:
        """Index in the N-step schedule where stage 2 enters (re-noise level)."""
        return self.num_inference_steps - self.refine_steps


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1 but is {value!r}.")
    return value


def check_inputs(
    spec: ModelSpec,
    *,
    height: int,
    width: int,
    sketch_height: int,
    sketch_width: int,
    num_frames: int,
    num_inference_steps: int,
    refine_steps: int,
    tiling: TilingConfig,
    upscale: str = "pixel",
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
) -> tuple[Plan, TileGrid]:
    """Validate every size and step count before any model work; returns the plan and the tile grid."""
    multiple = spec.pixel_multiple()
    for name, value in (("height", height), ("width", width), ("sketch_height", sketch_height),
                        ("sketch_width", sketch_width)):  # fmt: skip
        _positive_int(name, value)
        if value % multiple:
            raise ValueError(
                f"`{name}` must be a multiple of {multiple} (VAE stride {spec.vae_scale[1]} x patch "
                f"{max(spec.patch[1:])}) but is {value}."
            )
    if height < sketch_height or width < sketch_width:
        raise ValueError(
            f"the target {height}x{width} must be at least the native (sketch) size {sketch_height}x{sketch_width} "
            "on both axes."
        )
    _positive_int("num_frames", num_frames)
    if not spec.valid_frames(num_frames):
        raise ValueError(
            f"`num_frames` must be {spec.vae_scale[0]}k+1 for this model's VAE (e.g. "
            f"{(num_frames - 1) // spec.vae_scale[0] * spec.vae_scale[0] + 1}) but is {num_frames}."
        )
    # A latent frame count that is not a multiple of the temporal patch (CogVideoX 1.5's standard 41 and
    # 81 frames) is the adapter's to pad, as the family's pipeline does.
    latent_frames = (num_frames - 1) // spec.vae_scale[0] + 1
    _positive_int("num_inference_steps", num_inference_steps)
    _positive_int("refine_steps", refine_steps)
    if refine_steps > num_inference_steps:
        raise ValueError(
            f"`refine_steps` must be in [1, num_inference_steps={num_inference_steps}] but is {refine_steps}."
        )
    if upscale not in UPSCALE_MODES:
        raise ValueError(f"`upscale` must be one of {UPSCALE_MODES} but is {upscale!r}.")
    bad = [k for k in callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
    if bad:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` may hold only {CALLBACK_TENSOR_INPUTS} but has {bad}.")
    s = spec.vae_scale[1]
    plan = Plan(
        sketch_hw=(sketch_height, sketch_width),
        target_hw=(height, width),
        num_frames=num_frames,
        latent_frames=latent_frames,
        sketch_latent=(sketch_height // s, sketch_width // s),
        canvas_latent=(height // s, width // s),
        num_inference_steps=num_inference_steps,
        refine_steps=refine_steps,
    )
    # TileGrid validates the tile/overlap geometry against the canvas (ValueError on bad input).
    grid = TileGrid(
        (latent_frames, *plan.canvas_latent), tiling, multiple=spec.patch[1:], native_tile=spec.native_latent
    )
    return plan, grid


def sketch(adapter: ModelAdapter, plan: Plan, latents: torch.Tensor | None = None, **pipeline_kwargs) -> torch.Tensor:
    """Stage 1: the stock pipeline at native size, returning its final (normalised) latent.

    ``latents`` given with the sketch's shape ``(B, C, T, h, w)`` is taken as a ready sketch (e.g. a
    saved one), and the pipeline is not run.
    """
    if latents is not None:
        expected = (adapter.spec.latent_channels, plan.latent_frames, *plan.sketch_latent)
        if latents.dim() != 5 or tuple(latents.shape[1:]) != expected:
            raise ValueError(
                f"`sketch_latents` must have shape (B, {', '.join(map(str, expected))}) but has {tuple(latents.shape)}."
            )
        return latents
    h, w = plan.sketch_hw
    return adapter.sketch(h, w, plan.num_frames, num_inference_steps=plan.num_inference_steps, **pipeline_kwargs)


def reshift_latent(spec: ModelSpec, plan: Plan, reshift: ReshiftConfig) -> tuple[int, int]:
    """The lower sketch size of noise reshifting, in latent cells: the sketch's times ``reshift.scale``,
    rounded to the model's patch; raises ``ValueError`` (before any model work) when the reshift cannot
    apply to this plan."""
    N, K = plan.num_inference_steps, reshift.native_steps
    if K >= N:
        raise ValueError(f"`reshift.native_steps` must be in [1, num_inference_steps={N}) but is {K}.")
    if spec.prediction not in ("flow", "v", "epsilon"):
        raise ValueError(f"noise reshifting needs a model predicting flow, v or epsilon, not {spec.prediction!r}.")
    low = tuple(max(p, round(size * reshift.scale / p) * p) for size, p in zip(plan.sketch_latent, spec.patch[1:]))
    if low == tuple(plan.sketch_latent):
        raise ValueError(
            f"`reshift.scale` {reshift.scale} leaves the sketch at its own size ({plan.sketch_latent[0]}x"
            f"{plan.sketch_latent[1]} latent cells, patch {spec.patch[1]}x{spec.patch[2]}); use a smaller scale."
        )
    return low


def reshifted_sketch(adapter: ModelAdapter, plan: Plan, reshift: ReshiftConfig, scheduler, *,
                     generator: torch.Generator | None = None, **pipeline_kwargs) -> torch.Tensor:  # fmt: skip
    """Stage 1 with noise reshifting (:class:`supergen.config.ReshiftConfig`): the sketch latent
    ``(B, C, T, h', w')`` at the lower size :func:`reshift_latent`.

    1. The stock pipeline runs the first K steps at the native size and stops (diffusers' documented
       early stop: a step-end callback sets the pipeline's ``_interrupt``), returning the latent at step K.
    2. One native forward at step K (the one the pipeline would run next) gives the clean estimate.
    3. The estimate is area-averaged down to the lower size and re-noised to step K with fresh noise
       from ``generator`` (the same formula as stage 2's re-noise).
    4. The remaining N − K steps run at the lower size in supergen's loop with one tile covering the
       canvas, which is the family's own denoising loop (tested per family), on the same N-step schedule.
    """
    K, N = reshift.native_steps, plan.num_inference_steps
    low_hw = reshift_latent(adapter.spec, plan, reshift)

    def stop_after_native_steps(pipe, i, t, tensors):
        if i == K - 1:
            pipe._interrupt = True
        return {}

    h, w = plan.sketch_hw
    latents = adapter.sketch(
        h, w, plan.num_frames, num_inference_steps=N, generator=generator,
        callback_on_step_end=stop_after_native_steps, callback_on_step_end_tensor_inputs=["latents"],
        **pipeline_kwargs,
    )  # fmt: skip

    adapter.set_timesteps(scheduler, N, device=latents.device, sketch_shape=(plan.latent_frames, *plan.sketch_latent))
    cond = adapter.conditioning(tuple(latents.shape), num_frames=plan.num_frames, **pipeline_kwargs)
    t = scheduler.timesteps[K]
    sigmas = getattr(scheduler, "sigmas", None)
    adapter.begin_step(K, t, float(sigmas[K]) if sigmas is not None else None, N)
    native_hw = tuple(latents.shape[-2:])
    pred = adapter.predict(latents, t, cond, torch.zeros(1, 2, dtype=torch.int64), native_hw)
    x0 = clean_estimate(scheduler, adapter.spec.prediction, latents, pred, K)

    B, C, T = x0.shape[:3]
    small = F.interpolate(x0.reshape(B, C * T, *native_hw), size=low_hw, mode="area").reshape(B, C, T, *low_hw)
    noisy = renoise(scheduler, small, K, generator)

    # Conditioning of the lower size: canvas-size inputs (image-to-video's first frame) are built for it.
    low_cond = adapter.conditioning(tuple(noisy.shape), num_frames=plan.num_frames, **pipeline_kwargs)
    grid = TileGrid((T, *low_hw), TilingConfig(tile=low_hw, shift=False), multiple=adapter.spec.patch[1:])
    low_plan = replace(plan, canvas_latent=low_hw, refine_steps=N - K)
    return refine(adapter, scheduler, noisy, low_cond, grid, low_plan, generator=generator)


def refine(
    adapter: ModelAdapter,
    scheduler,
    latents: torch.Tensor,
    cond: Conditioning,
    grid: TileGrid,
    plan: Plan,
    *,
    generator: torch.Generator | None = None,
    progress_bar=None,
    callback_on_step_end: Callable | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    callback_owner=None,
    cache=None,
    parallel=None,
) -> torch.Tensor | None:
    """Stage 2: denoise the canvas over the last ``k`` steps of the scheduler's N-step schedule.

    ``latents`` is the re-noised canvas ``(B, C, T, H, W)`` at step ``N − k``; the scheduler must hold
    the N-step schedule (``set_timesteps(N)`` already called, no step taken yet). ``cache``: an optional
    :class:`supergen.cache.TileCache` deciding per step which tiles to compute and which to reuse, or a
    :class:`supergen.cache.StepRehash` deciding per step whether to compute the step at all.
    ``callback_on_step_end(callback_owner, step_index, t, tensors)`` is called after each step with
    ``step_index`` in the N-step schedule and the requested tensors of :data:`CALLBACK_TENSOR_INPUTS`;
    a returned ``"latents"`` replaces the canvas.

    ``parallel``: a :class:`supergen.parallel.ParallelContext`; with more than one rank the ranks share
    the loop (:func:`supergen.parallel.refine_regions`) and only rank 0 gets the canvas back (``None``
    elsewhere). No rank holds the whole canvas during the loop, so no callback may be given then.
    """
    if parallel is not None and parallel.distributed:
        from .parallel import refine_regions

        parallel.check_no_callback(callback_on_step_end)
        return refine_regions(
            parallel, adapter, scheduler, latents, cond, grid, plan,
            generator=generator, progress_bar=progress_bar, cache=cache,
        )  # fmt: skip
    # 1. Enter the SAME N-step schedule at step N-k. The begin index also spares schedulers the
    #    device-to-host sync of looking the timestep up (diffusers PR 11696); schedulers without one
    #    (CogVideoX's DDIM/DPM) derive everything from the timestep itself.
    begin = plan.begin_index
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    scheduler_state: dict = {}  # what a family's stepping carries between steps (CogVideoX DPM: x0)
    sigmas = getattr(scheduler, "sigmas", None)
    canvas_hw = tuple(latents.shape[-2:])
    gather_mode = "torus" if grid.wrap else "zero"
    step_cache = cache if isinstance(cache, StepRehash) else None
    tile_cache = None if step_cache is not None else cache

    for i, t in enumerate(timesteps):
        # 2. Place the tile grid for this step (shifted windows, or the fixed overlapping grid).
        #    Origins stay on the CPU: the ops validate them there and move them themselves, so the
        #    loop never waits on a device-to-host copy.
        origins = grid.at_step(i)
        sigma = float(sigmas[begin + i]) if sigmas is not None else None
        adapter.begin_step(begin + i, t, sigma, plan.num_inference_steps)
        if tile_cache is not None:
            tile_cache.set_denoiser(i, adapter.denoiser_index(t))

        if step_cache is not None and not step_cache.computes(i):
            # Step Rehash, not a key step: no tile is gathered or computed; the canvas prediction is
            # this step's input plus the key step's canvas residual.
            noise_pred = step_cache.reuse(latents)
        else:
            # 3. Gather every tile window of the canvas in one call.
            tiles = halo_gather(latents, origins, grid.tile, 0, gather_mode)

            # 4. One native-size forward per tile (guidance applied per tile, by the adapter); with a
            #    tile cache, only the tiles it picks are computed, the others reuse their cached residual.
            if tile_cache is None:
                tile_pred = adapter.predict(tiles, t, cond, origins, canvas_hw)
            else:
                tile_pred = _predict_cached(
                    adapter, tile_cache, i, len(timesteps), latents, tiles, t, cond, origins, grid.tile
                )

            # 5. Fuse the tile predictions into ONE canvas prediction (blend ramps where tiles overlap).
            noise_pred = blend_scatter(
                tile_pred, origins, canvas_hw, overlap=grid.overlap, ramp=grid.config.ramp, wrap=grid.wrap
            )
            del tiles, tile_pred  # two canvas-size buffers, freed before the scheduler's temporaries
        if step_cache is not None:
            step_cache.record(i, latents, noise_pred, grid.num_tiles)

        # 6. One scheduler step on the whole canvas: one trajectory, multistep history intact.
        latents = adapter.scheduler_step(
            scheduler, noise_pred, t, latents, step_index=begin + i, state=scheduler_state, generator=generator
        )

        if callback_on_step_end is not None:
            visible = {"latents": latents, "noise_pred": noise_pred, "origins": origins}
            callback_kwargs = {k: visible[k] for k in callback_on_step_end_tensor_inputs}
            outputs = callback_on_step_end(callback_owner, begin + i, t, callback_kwargs) or {}
            latents = outputs.pop("latents", latents)

        if progress_bar is not None:
            progress_bar.update()
    return latents


def _predict_cached(adapter, cache, step, num_steps, latents, tiles, t, cond, origins, tile_hw) -> torch.Tensor:
    """Tile predictions with the cache's plan: computed tiles from the model, the rest reused."""
    compute = cache.plan(step, num_steps, latents, origins, tile_hw)  # (N,) bool, on the CPU like origins
    canvas_hw = tuple(latents.shape[-2:])
    if bool(compute.all()):
        pred = adapter.predict(tiles, t, cond, origins, canvas_hw)
    else:
        batch = latents.shape[0]
        rows = torch.arange(tiles.shape[0]).view(-1, batch)  # (N, B): tile-major rows of each tile
        kept, skipped = rows[compute].flatten().to(tiles.device), rows[~compute].flatten().to(tiles.device)
        reused = cache.reuse(latents, origins[~compute], tile_hw)
        computed = adapter.predict(tiles[kept], t, cond, origins[compute], canvas_hw) if bool(compute.any()) else None
        like = computed if computed is not None else reused
        pred = like.new_empty((tiles.shape[0], *like.shape[1:]))
        if computed is not None:
            pred[kept] = computed
        pred[skipped] = reused.to(pred.dtype)
    cache.record(step, latents, origins, tile_hw, compute, pred)
    return pred
