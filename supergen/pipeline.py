"""``SuperGen``: wrap a diffusers video pipeline you already run and generate at 2K/4K with it.

>>> sg = SuperGen(pipe, tiling=TilingConfig(shift=True))
>>> out = sg(prompt="a fox in the snow", height=1440, width=2560, num_frames=41,
...          num_inference_steps=50, refine_steps=35, generator=torch.Generator().manual_seed(0))
>>> out.frames, out.report["seconds"]
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch

from .adapters.base import POSITIONS, adapter_for, denoisers
from .config import REFINE_FRACTION, TilingConfig, check_guidance, default_refine_steps
from .metrics import StageTimer, seam_score
from .stages import check_inputs, refine, reshift_latent, reshifted_sketch, sketch
from .upscale import renoise, scheduler_family, upscale_latents

OUTPUT_TYPES = ("np", "pt", "pil", "latent")


def resolve_refine_guidance(pipe, guidance_scale: float, refine_guidance_scale: float | None) -> float:
    """Stage 2's guidance scale: the one given, else the model folder's ``supergen.json``
    ``refine_guidance_scale`` (``pipe.supergen_info``), else ``guidance_scale``; checked (finite, >= 0)."""
    if refine_guidance_scale is None:
        refine_guidance_scale = getattr(pipe, "supergen_info", {}).get("refine_guidance_scale", guidance_scale)
    return check_guidance("refine_guidance_scale", refine_guidance_scale)


@dataclass
class SuperGenOutput:
    """``frames``: the video as ``output_type`` asks (``latents`` again for ``"latent"``);
    ``latents``: the refined canvas latent ``(B, C, T, H, W)``; ``report``: what ran, how long, how big."""

    frames: object
    latents: torch.Tensor
    report: dict


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("supergen", "torch", "diffusers", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class SuperGen:
    """Two-stage, training-free high-resolution generation with an existing diffusers video pipeline.

    Args:
        pipe: a supported diffusers pipeline (``supergen.adapters.base.supported_transformers()``).
        tiling: how stage 2 cuts the canvas (:class:`TilingConfig`); the tile defaults to the model's
            native latent size.
        positions: ``local`` (each tile sees the model's own positions) or ``canvas`` (each tile's
            positions are its absolute place on the canvas, so objects are not repeated per tile).
        native_size: the model's native ``(height, width)`` in pixels (sketch size and default tile);
            default: ``pipe.native_size`` if the pipeline carries one, else the adapter's value.
        max_tile_batch: tiles computed per forward.
        adapter_options: extra keyword arguments for the family's adapter (e.g. CogVideoX 1.5's
            ``extend_positions=True`` to extrapolate canvas positions past its rotary table).
        cache: a :class:`supergen.cache.CacheConfig`; ``None`` = off. ``gate`` or ``budget``: skip the
            forwards of tiles whose prediction would barely change, reusing their cached residual.
            ``rehash``: Step Rehash, whole steps computed (key steps) or reusing the key step's canvas
            residual; without a ``rehash_similarity`` map each call first runs a calibration pass
            (reported as the stage ``calibrate``, not counted in ``refine``), whose map the report
            returns (``report["cache"]["similarity"]``) for reuse.
        reshift: a :class:`supergen.config.ReshiftConfig` for noise reshifting of the sketch (its first
            ``native_steps`` at the native size, the rest at ``scale`` of it per side); ``None`` = off.
        parallel: a :class:`supergen.config.ParallelConfig` to share stage 2 across the processes of a
            ``torchrun`` launch (:mod:`supergen.parallel`); with one process (``WORLD_SIZE`` unset or 1)
            it changes nothing. Rank 0 runs the sketch and broadcasts it (with the random state it
            left), every rank upscales and re-noises it itself; rank 0 gets the video, the other
            ranks an output whose ``frames`` and ``latents`` are ``None``.
    """

    def __init__(
        self,
        pipe,
        tiling: TilingConfig | None = None,
        cache=None,
        parallel=None,
        positions: str = "local",
        native_size: tuple[int, int] | None = None,
        max_tile_batch: int = 1,
        adapter_options: dict | None = None,
        reshift=None,
    ):
        if parallel is not None:
            from .config import ParallelConfig

            if not isinstance(parallel, ParallelConfig):
                raise TypeError(f"`parallel` must be a ParallelConfig or None but is {type(parallel).__name__}.")
        self.parallel = parallel
        if reshift is not None:
            from .config import ReshiftConfig

            if not isinstance(reshift, ReshiftConfig):
                raise TypeError(f"`reshift` must be a ReshiftConfig or None but is {type(reshift).__name__}.")
        self.reshift = reshift
        if cache is not None:
            from .cache import CacheConfig, check_model_caches

            if not isinstance(cache, CacheConfig):
                raise TypeError(f"`cache` must be a CacheConfig or None but is {type(cache).__name__}.")
            for denoiser in denoisers(pipe):
                check_model_caches(denoiser)
        self.cache = cache
        tiling = tiling if tiling is not None else TilingConfig()
        if not isinstance(tiling, TilingConfig):
            raise TypeError(f"`tiling` must be a TilingConfig but is {type(tiling).__name__}.")
        if positions not in POSITIONS:
            raise ValueError(f"`positions` must be one of {POSITIONS} but is {positions!r}.")
        self.pipe = pipe
        self.tiling = tiling
        self.adapter = adapter_for(pipe, positions=positions, max_tile_batch=max_tile_batch, **(adapter_options or {}))
        native_size = native_size if native_size is not None else getattr(pipe, "native_size", None)
        if native_size is not None:
            s = self.adapter.spec.vae_scale[1]
            h, w = (int(v) for v in native_size)
            if h % self.adapter.spec.pixel_multiple() or w % self.adapter.spec.pixel_multiple():
                raise ValueError(
                    f"`native_size` must be a multiple of {self.adapter.spec.pixel_multiple()} but is {(h, w)}."
                )
            self.adapter.spec = replace(self.adapter.spec, native_latent=(h // s, w // s))

    @property
    def native_size(self) -> tuple[int, int]:
        s = self.adapter.spec.vae_scale[1]
        return self.adapter.spec.native_latent[0] * s, self.adapter.spec.native_latent[1] * s

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        height: int,
        width: int,
        num_frames: int = 81,
        num_inference_steps: int = 50,
        refine_steps: int | None = None,
        guidance_scale: float = 5.0,
        refine_guidance_scale: float | None = None,
        sketch_height: int | None = None,
        sketch_width: int | None = None,
        sketch_latents: torch.Tensor | None = None,
        upscale: str = "pixel",
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        **pipeline_kwargs,
    ) -> SuperGenOutput:
        """Generate a ``num_frames x height x width`` video.

        Takes the pipeline's usual arguments (prompt or embeddings, ``image`` for image-to-video,
        ``guidance_scale``, ``generator``, ...) plus the target ``height``/``width``, ``refine_steps``
        (k: stage 2 runs the last k of the N steps; default 70 % of N, as the Wan port of the method)
        and the sketch size (default: the model's native size).

        ``refine_guidance_scale``: the ``guidance_scale`` stage 2's tiles are denoised with, in the
        pipeline's own meaning of it (default: the model folder's ``supergen.json`` value if it sets
        one, else ``guidance_scale``). The sketch already carries the prompt's layout, and every tile
        sees the whole prompt, so guidance in a late, low-noise refinement mostly pushes each tile
        towards the prompted object on its own. For classifier-free guidance (Wan, CogVideoX, LTX-Video)
        1 runs the conditional branch only (half the forwards); for HunyuanVideo it is the embedded
        guidance value stage 2 feeds the transformer. The embedded tiny model refines at 1 (measured in
        ``bench/quality.py``).
        """
        pipe, adapter = self.pipe, self.adapter
        timer = StageTimer(pipe._execution_device)
        started = time.perf_counter()

        # 1. Check inputs: every size and count, before any model work.
        if refine_steps is None:
            fraction = getattr(pipe, "supergen_info", {}).get("refine_fraction", REFINE_FRACTION)
            steps_given = isinstance(num_inference_steps, int)
            refine_steps = default_refine_steps(num_inference_steps, fraction) if steps_given else 0
        native_h, native_w = self.native_size
        plan, grid = check_inputs(
            adapter.spec,
            height=height,
            width=width,
            sketch_height=sketch_height if sketch_height is not None else native_h,
            sketch_width=sketch_width if sketch_width is not None else native_w,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            refine_steps=refine_steps,
            tiling=self.tiling,
            upscale=upscale,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES} but is {output_type!r}.")
        check_guidance("guidance_scale", guidance_scale)
        refine_guidance_scale = resolve_refine_guidance(pipe, guidance_scale, refine_guidance_scale)
        reshifted_hw = None
        if self.reshift is not None:
            if sketch_latents is not None:
                raise ValueError("`sketch_latents` is a ready sketch; noise reshifting applies to a generated one.")
            reshifted_hw = reshift_latent(adapter.spec, plan, self.reshift)
        rehash = self.cache is not None and self.cache.mode == "rehash"
        similarity = self.cache.rehash_similarity if rehash else None
        ctx = self._parallel_context(plan, grid, prompt, negative_prompt, (guidance_scale, refine_guidance_scale),
                                     upscale, generator, callback_on_step_end)  # fmt: skip
        if similarity is not None and tuple(similarity.shape) != (plan.refine_steps,) * 2:
            raise ValueError(
                f"`rehash_similarity` must be ({plan.refine_steps}, {plan.refine_steps}) for refine_steps="
                f"{plan.refine_steps} but has shape {tuple(similarity.shape)}."
            )
        family = scheduler_family(pipe.scheduler)
        if getattr(adapter, "image_to_video", False) and pipeline_kwargs.get("image") is None:
            raise ValueError("this is an image-to-video pipeline: pass `image` (the first frame).")
        text = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
            "guidance_scale": guidance_scale,
        }
        if ctx.distributed and ctx.config.sketch_context is not None and sketch_latents is None:
            from .parallel import check_sketch_context, sketch_context_split

            pt, ph, pw = adapter.spec.patch
            sizes = {"sketch": plan.sketch_latent, "reshifted sketch": reshifted_hw}
            tokens = {
                f"{name} (latent {plan.latent_frames}x{hw[0]}x{hw[1]})": -(-plan.latent_frames // pt)
                * (hw[0] // ph)
                * (hw[1] // pw)
                for name, hw in sizes.items()
                if hw is not None
            }
            _, degree = sketch_context_split(ctx, adapter.sketch_guidance_pairs({**text, **pipeline_kwargs}))
            check_sketch_context(ctx, denoisers(pipe), tokens, degree)

        # Build/load the op backends now (the C++ extension compiles on first use), so that a first
        # run's compile time is reported as such instead of inflating the refine stage.
        with timer.stage("backends"):
            from . import ops

            ops.availability(load=True)

        # 2-6. Step Rehash without a map: a calibration pass first (cache off, its own seed) measures
        #      the step similarity. It is its own stage so that `refine` times the policy, not the
        #      one-off offline measurement.
        similarity_source = "given"
        if rehash and similarity is None:
            from .cache import StepRehash

            similarity_source = "calibrated"
            with timer.stage("calibrate"):
                device = generator.device if generator is not None else "cpu"
                calibration = StepRehash.calibration(plan.refine_steps)
                self._generate_latents(
                    plan, grid, text, pipeline_kwargs, sketch_latents, upscale,
                    generator=torch.Generator(device).manual_seed(self.cache.rehash_seed),
                    cache=calibration,
                    stage=lambda name: contextlib.nullcontext(),
                    refine_guidance_scale=refine_guidance_scale,
                    parallel=ctx,
                )  # fmt: skip
                if ctx.distributed:  # each rank holds its region of every residual
                    from .parallel import region_similarity

                    similarity = region_similarity(ctx, calibration.residuals)
                else:
                    similarity = calibration.similarity()

        # A fresh cache per generation.
        step_cache = None
        if rehash:
            from .cache import StepRehash

            step_cache = StepRehash.from_config(replace(self.cache, rehash_similarity=similarity), plan.refine_steps)
        elif self.cache is not None and self.cache.mode != "off":
            from .cache import TileCache

            step_cache = TileCache(self.cache)
        latents = self._generate_latents(
            plan, grid, text, pipeline_kwargs, sketch_latents, upscale,
            generator=generator,
            cache=step_cache,
            stage=timer.stage,
            refine_guidance_scale=refine_guidance_scale,
            progress=True,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            parallel=ctx,
        )  # fmt: skip

        # 7. Decode with the VAE's tiling on (under tile parallelism each rank decodes a block of VAE tiles
        #    of rank 0's latent and rank 0 assembles the video; the others return none).
        frames, seam = latents, None
        if output_type != "latent" and (latents is not None or ctx.distributed):
            with timer.stage("decode"):
                if ctx.distributed:
                    from .parallel import decode_in_blocks

                    video = decode_in_blocks(ctx, adapter, latents)
                else:
                    video = adapter.decode(latents)
                if video is not None:
                    s = adapter.spec.vae_scale[1]
                    rows, cols = grid.edges(plan.refine_steps - 1)
                    # Against the other lines of the patch grid: the decoder marks those with or without tiles.
                    seam = seam_score(
                        video, [r * s for r in rows], [c * s for c in cols], grid=adapter.spec.pixel_multiple()
                    )
                    frames = pipe.video_processor.postprocess_video(video, output_type=output_type)
        timer.seconds["total"] = time.perf_counter() - started

        # 8. Report.
        transformer = pipe.transformer
        report = {
            "model": {
                "pipeline": type(pipe).__name__,
                "transformer": type(transformer).__name__,
                "family": adapter.spec.family,
                "parameters": sum(p.numel() for p in transformer.parameters()),
                "dtype": str(transformer.dtype).replace("torch.", ""),
                "scheduler": type(pipe.scheduler).__name__,
                "scheduler_family": family,
            },
            "sizes": {
                "frames": plan.num_frames,
                "sketch": list(plan.sketch_hw),
                "sketch_reshift": self._reshift_report(plan, reshifted_hw),
                "target": list(plan.target_hw),
                "sketch_latent": [plan.latent_frames, *plan.sketch_latent],
                "canvas_latent": [plan.latent_frames, *plan.canvas_latent],
                "tile_latent": list(grid.tile),
            },
            "tiling": {
                "tiles_per_step": grid.num_tiles,
                "overlap": list(grid.overlap),
                "boundary": grid.config.boundary,
                "shift": grid.config.shift,
                "shift_period": grid.config.shift_period,
                "shift_cells": [grid.rows.step, grid.cols.step],  # how far the grid moves per shift, (rows, cols)
                "positions": adapter.positions,
                "upscale": upscale,
            },
            "steps": {"total": plan.num_inference_steps, "refine": plan.refine_steps, "begin_index": plan.begin_index},
            "guidance_scale": {"sketch": guidance_scale, "refine": refine_guidance_scale},
            "seconds": {k: round(v, 4) for k, v in timer.seconds.items()},
            "peak_memory_bytes": dict(timer.peak_bytes),
            "peak_memory_kind": "cuda allocator" if timer.device.type == "cuda" else "process peak RSS",
            "cache": self._cache_report(step_cache, similarity, similarity_source),
            "seam_score": seam,
            "parallel": self._parallel_report(ctx),
            "versions": versions(),
            "device": device_name(timer.device),
        }
        return SuperGenOutput(frames=frames, latents=latents, report=report)

    def _generate_latents(
        self, plan, grid, text, pipeline_kwargs, sketch_latents, upscale, *, generator, cache, stage,
        refine_guidance_scale, progress=False, callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",), parallel=None,
    ) -> torch.Tensor | None:  # fmt: skip
        """Stages 1 and 2 up to the refined canvas latent, each step timed under ``stage(name)``."""
        pipe, adapter = self.pipe, self.adapter

        # 2. Stage 1: sketch at the native size with the stock pipeline.
        #    Under tile parallelism rank 0 runs it (with rank 1 where its guidance is two forwards per
        #    step, or one on a batch of both that splits exactly: one each; or every rank, each forward
        #    split along its tokens, with ``sketch_context``) and broadcasts it with its random state.
        with stage("sketch"):
            shared = parallel is not None and parallel.distributed and sketch_latents is None
            context = shared and parallel.config.sketch_context is not None
            split = shared and parallel.config.split_guidance
            pairs = split and adapter.sketch_guidance_pairs({**text, **pipeline_kwargs})
            low = None
            models = denoisers(pipe)
            # stage 1's wrappers around the model, innermost first: tokens split over ranks, guidance split
            # between two ranks, rank 0's heartbeat for the ranks that wait
            tokens = pair = heartbeat = None
            if context:  # every rank runs the stock pipeline: guidance pairs split over two halves of the
                # ranks, each forward's tokens split over the ranks of its half (or of all where no pairs)
                from .parallel import SketchContextParallel, SketchGuidanceSplit, sketch_context_split

                groups, degree = sketch_context_split(parallel, pairs)
                split = groups == 2
                tokens = SketchContextParallel(parallel, models, groups) if degree > 1 else None
                if split:
                    peer = (parallel.rank + parallel.world_size // 2) % parallel.world_size
                    pair = SketchGuidanceSplit(parallel, models, peer)
            elif shared:  # the waiting ranks follow rank 0's forwards, so that no transfer waits the whole sketch
                from .parallel import (
                    SketchBatchSplit,
                    SketchGuidanceSplit,
                    SketchHeartbeat,
                    sketch_waiters_group,
                    wait_for_sketch,
                )

                split = pairs or (split and adapter.sketch_guidance_batched({**text, **pipeline_kwargs}))
                runners = (0, 1) if split else (0,)
                group = sketch_waiters_group(parallel, runners)
                if split and parallel.rank in runners:
                    pair = (SketchGuidanceSplit if pairs else SketchBatchSplit)(parallel, models)
                if parallel.rank == 0:  # outermost: it sees every call, computed or not
                    heartbeat = SketchHeartbeat(parallel, group, models)
                if parallel.rank not in runners:
                    wait_for_sketch(parallel, group)
            if not shared or context or parallel.rank == 0 or (split and parallel.rank == 1):
                with contextlib.ExitStack() as stack:
                    for guard in (g for g in (tokens, pair, heartbeat) if g is not None):
                        stack.enter_context(guard)
                    if self.reshift is not None:
                        low = reshifted_sketch(adapter, plan, self.reshift, pipe.scheduler, generator=generator,
                                               **text, **pipeline_kwargs)  # fmt: skip
                    else:
                        low = sketch(adapter, plan, sketch_latents, generator=generator, **text, **pipeline_kwargs)
                if tokens is not None or pair is not None:  # the forwards it ran (or took part in), what it swapped
                    parallel.sketch_forwards = (tokens or pair).forwards
                    parallel.stats.sketch_branches = pair.sent if pair is not None else 0
            if shared:
                from .parallel import share_sketch

                low = share_sketch(parallel, low, generator, pipe._execution_device)

        # 3. Upscale the sketch to the canvas (pixel space by default; under tile parallelism the ranks
        #    share the encode, each a block of VAE tiles).
        with stage("upscale"):
            encode = None
            if parallel is not None and parallel.distributed:
                from .parallel import encode_in_blocks

                encode = partial(encode_in_blocks, parallel, adapter)
            clean = upscale_latents(adapter, low, plan.canvas_latent, mode=upscale, encode=encode)

        with stage("refine"):
            # 4. The same N-step schedule as the sketch; re-noise the canvas to step N-k.
            adapter.set_timesteps(
                pipe.scheduler, plan.num_inference_steps, device=clean.device,
                sketch_shape=(plan.latent_frames, *plan.sketch_latent),
            )  # fmt: skip
            if len(pipe.scheduler.timesteps) != plan.num_inference_steps:
                raise ValueError(
                    f"scheduler {type(pipe.scheduler).__name__} makes {len(pipe.scheduler.timesteps)} timesteps "
                    f"for {plan.num_inference_steps} steps; only one-evaluation-per-step schedulers are supported."
                )
            latents = renoise(pipe.scheduler, clean, plan.begin_index, generator)
            if parallel is not None and parallel.distributed:
                from .parallel import agree_on_canvas

                latents = agree_on_canvas(parallel, latents)

            # 5. Conditioning at canvas size (text embeddings; image latents cropped per tile later).
            #    Stage 2's own guidance scale (``refine_guidance_scale``), the sketch's everywhere else.
            refine_text = dict(text, guidance_scale=refine_guidance_scale)
            cond = adapter.conditioning(tuple(latents.shape), num_frames=plan.num_frames, **refine_text,
                                        **pipeline_kwargs)  # fmt: skip

            # 6. Stage 2: tiled refinement over the last k steps.
            bar = pipe.progress_bar(total=plan.refine_steps) if progress else contextlib.nullcontext()
            with bar:
                return refine(
                    adapter, pipe.scheduler, latents, cond, grid, plan,
                    generator=generator,
                    progress_bar=bar if progress else None,
                    callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                    callback_owner=pipe,
                    cache=cache,
                    parallel=parallel,
                )  # fmt: skip

    def _parallel_context(self, plan, grid, prompt, negative_prompt, guidance_scales, upscale, generator, callback):
        """Join the ranks (if ``parallel`` is set and ``WORLD_SIZE`` > 1) and check that they agree, before
        any model work. Returns the context (``world_size == 1``: the plain single-process path)."""
        from .parallel import ParallelContext, check_same_config, setup

        if self.parallel is None:
            return ParallelContext()
        ctx = setup(self.parallel, self.pipe._execution_device)
        if not ctx.distributed:
            return ctx
        ctx.check_no_callback(callback)
        transformer = self.pipe.transformer
        settings = {
            "plan": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(plan).items()},
            "tiling": repr(self.tiling),
            "tile": list(grid.tile),
            "cache": repr(self.cache),
            "positions": self.adapter.positions,
            "prompt": prompt if isinstance(prompt, str | None) else list(prompt),
            "negative_prompt": negative_prompt if isinstance(negative_prompt, str | None) else list(negative_prompt),
            "guidance_scale": list(guidance_scales),  # (sketch, refine)
            "upscale": upscale,
            "seed": generator.initial_seed() if generator is not None else None,
            "model": [type(self.pipe).__name__, type(transformer).__name__, str(transformer.dtype),
                      sum(p.numel() for p in transformer.parameters())],
            "scheduler": {"class": type(self.pipe.scheduler).__name__,
                          **{k: v for k, v in self.pipe.scheduler.config.items() if not k.startswith("_")}},
            "parallel": repr(self.parallel),
            "reshift": repr(self.reshift),
        }  # fmt: skip
        check_same_config(ctx, settings)
        return ctx

    def _reshift_report(self, plan, reshifted_hw) -> dict | None:
        if reshifted_hw is None:
            return None
        return {
            "native_steps": self.reshift.native_steps,
            "scale": self.reshift.scale,
            "latent": [plan.latent_frames, *reshifted_hw],
        }

    @staticmethod
    def _parallel_report(ctx) -> dict | None:
        if not ctx.distributed:
            return None
        return {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "regions": ctx.regions or ctx.config.regions,  # auto resolved to the policy that ran
            "regions_configured": ctx.config.regions,
            "latents_rebuilt_from_history": ctx.latents_rebuilt,  # following regions did not send the latents
            "computed_tiles_per_rank": ctx.computed_tiles,
            "forwards_per_rank": ctx.forwards,  # a split tile's guidance branches count one each
            "guidance_halves_exact": ctx.guidance_halves,  # a batched guidance forward split exactly (None: unchecked)
            "probe_forwards": ctx.probe_forwards,  # that check: 1 batched + 2 half forwards, not in forwards_per_rank
            "sketch_forwards": ctx.sketch_forwards,  # this rank's, where stage 1 was shared (else None)
            "sketch_context": ctx.config.sketch_context,  # as configured: stage 1 (when it runs) split along its tokens
            "decode_blocks": None if ctx.decode_plan is None else ctx.decode_plan._asdict(),  # the shared decode
            "encode_blocks": None if ctx.encode_plan is None else ctx.encode_plan._asdict(),  # the upscale's encode
            **ctx.stats.as_dict(),
        }

    def _cache_report(self, cache, similarity, similarity_source) -> dict | None:
        if cache is None:
            return None
        out = {"mode": self.cache.mode, **cache.stats.as_dict()}
        if self.cache.mode == "rehash":
            out.update(
                gamma=self.cache.rehash_gamma,
                key_steps=cache.schedule,
                # The map itself, so a later call can pass it back (CacheConfig(rehash_similarity=...))
                # and skip the calibration pass.
                similarity=similarity.tolist(),
                similarity_source=similarity_source,
                similarity_measure="cosine of the flattened canvas residuals (prediction - input) of two steps",
            )
            if similarity_source == "calibrated":
                out["calibration"] = (
                    f"a cache-off pass with seed {self.cache.rehash_seed} measured the map; its time is "
                    "seconds['calibrate'], not included in seconds['refine']"
                )
        return out
