"""CogVideoX 1.0 and 1.5, text-to-video (``CogVideoXPipeline``) and image-to-video
(``CogVideoXImageToVideoPipeline``).

Model facts this adapter owns:

* the transformer takes ``(B, T, C, H, W)``; supergen's ``(B, C, T, H, W)`` is permuted at the model
  call and nowhere else. Patch 2 spatially; 1.5 (``patch_size_t=2``) also pairs frames, so an odd
  frame count is padded at the start as the pipelines do (they denoise extra leading frames and drop
  them before decoding): the tile's first frame is repeated, and the padded rows of the prediction are
  dropped again;
* the transformer predicts ``v`` (CogVideoX DDIM/DPM schedulers); CFG is batched (``[uncond; cond]``
  in one forward, one ``cache_context`` per tile, guidance per tile before fusion), its output upcast
  to fp32 first, so predictions are fp32 whatever the model's dtype (``prediction_dtype``: tile
  parallelism sends and blends them so). ``separate_guidance=True`` runs the two branches as two
  forwards (``"cond/tile3"``, ``"uncond/tile3"``) that tile parallelism may put on two ranks.
  ``use_dynamic_cfg`` is implemented: the pipeline's cosine schedule, computed from the timestep and
  the call's step count;
* ``CogVideoXDPMScheduler.step`` has its own signature and carries the previous ``x0``:
  :meth:`CogVideoXAdapter.scheduler_step` steps the canvas as the pipelines do;
* positions: 2b adds sincos positions inside its patch embedding, computed from the input size alone,
  so only ``local`` positions exist there (``canvas`` is refused at construction). 5b/1.5 take RoPE as
  an input: ``local`` is the table the pipeline builds for a tile-size video; ``canvas`` cuts each
  tile's rows out of the table the pipeline would build for the whole canvas, wrapped like the torus.
  For 1.0 that table is the canvas resized into the base grid (the pipeline's linspace positions,
  i.e. interpolation); for 1.5 it is integer positions, capped at the pipeline's ``max_size`` (the
  sample grid) unless ``extend_positions=True`` extrapolates past it;
* image-to-video concatenates the image latent (frame 0, zeros after, scaled like the pipeline) on
  channels; it is encoded once at canvas size and cropped with each tile's window. 1.5 adds ``ofs``.
  For 1.5 ``cond.canvas_extra`` holds the padded frame count, the image on the padded first frame,
  exactly where the I2V pipeline puts it;
* the tiled VAE keeps the VAE's tile size but snaps its overlaps to whole latent cells: CogVideoX's
  ``tiled_decode``/``tiled_encode`` return wrong sizes otherwise (see :func:`consistent_overlap`).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

from ..ops import halo_gather
from .base import BatchedGuidance, Conditioning, ModelSpec, register_adapter

_PREDICTION = {"v_prediction": "v", "epsilon": "epsilon"}
_VAE_TILING_ATTRS = (
    "use_tiling",
    "tile_sample_min_height",
    "tile_sample_min_width",
    "tile_latent_min_height",
    "tile_latent_min_width",
    "tile_overlap_factor_height",
    "tile_overlap_factor_width",
)


def consistent_overlap(latent_tile: int, factor: float, scale: int) -> float:
    """The overlap factor nearest ``factor`` for which CogVideoX's tiled VAE keeps output sizes exact.

    ``tiled_decode`` steps ``int(Lt * (1 - f))`` latent cells but keeps ``St - int(St * f)`` pixels per
    tile (``St = Lt * scale``); ``tiled_encode`` mirrors it. Unless both agree in integers the output
    grows or shrinks (a 64x64 latent decodes to 524x547 with 128-pixel tiles at 1/6, 1/5). Overlaps of a
    whole number of latent cells agree; ``0`` always does.
    """
    st = latent_tile * scale
    for k in sorted(range(latent_tile), key=lambda k: abs(k / latent_tile - factor)):
        f = k / latent_tile
        decode_ok = int(latent_tile * (1 - f)) * scale == st - int(st * f)
        encode_ok = int(st * (1 - f)) == (latent_tile - int(latent_tile * f)) * scale
        if decode_ok and encode_ok:
            return f
    return 0.0


@register_adapter("CogVideoXTransformer3DModel")
class CogVideoXAdapter(BatchedGuidance):
    """CogVideoX 1.0 (2b sincos, 5b RoPE) and 1.5 (RoPE, temporal patch 2), T2V and I2V.

    Args:
        extend_positions: let 1.5 ``canvas`` positions run past the pipeline's ``max_size`` (its sample
            grid), extrapolating RoPE as the published method's ``extend`` mode does. Off, a canvas
            wider or taller than the sample grid is refused.
        separate_guidance: run stage 2's classifier-free guidance as two forwards per tile (conditional,
            unconditional) instead of the pipeline's one forward of both batched, so that tile
            parallelism may run them on two ranks (:meth:`guidance_branches`). The same model and
            arithmetic at batch 1: equal to the batched prediction up to float rounding, not bit for bit.
    """

    def __init__(self, pipe, positions: str = "local", max_tile_batch: int = 1, extend_positions: bool = False,
                 separate_guidance: bool = False):  # fmt: skip
        super().__init__(pipe, positions=positions, max_tile_batch=max_tile_batch)
        self.separate_guidance = bool(separate_guidance)
        config, vae = pipe.transformer.config, getattr(pipe, "vae", None)
        if vae is None:
            raise ValueError("CogVideoX pipelines need their `vae` for supergen (decode, encode, image latents).")
        self.rotary = bool(config.use_rotary_positional_embeddings)
        if positions == "canvas" and not self.rotary:
            raise ValueError(
                "`positions='canvas'` needs rotary positions, but this CogVideoX transformer "
                "(`use_rotary_positional_embeddings=False`, e.g. CogVideoX-2b) adds sincos positions inside its "
                "patch embedding, computed from the input size alone with no offset; use `positions='local'`."
            )
        if extend_positions and config.patch_size_t is None:
            raise ValueError(
                "`extend_positions` applies to CogVideoX 1.5 (integer RoPE positions capped at `max_size`); 1.0 "
                "canvas positions are the canvas resized into the base grid and never exceed it."
            )
        self.extend_positions = bool(extend_positions)
        self.image_to_video = config.in_channels != config.out_channels
        prediction = pipe.scheduler.config.get("prediction_type", "v_prediction")
        if prediction not in _PREDICTION:
            raise ValueError(f"scheduler `prediction_type` {prediction!r} is not one of {tuple(_PREDICTION)}.")
        p = config.patch_size
        self.spec = ModelSpec(
            family="cogvideox",
            patch=(config.patch_size_t or 1, p, p),
            vae_scale=(vae.config.temporal_compression_ratio, 2 ** (len(vae.config.block_out_channels) - 1)),
            latent_channels=config.out_channels,
            # 1.0: 60x90 (480x720 px), its training size. 1.5 checkpoints declare 300x300 here, the bound of
            # their RoPE table rather than a training size: pass `native_size` (e.g. 768x1360) for them.
            native_latent=(config.sample_height, config.sample_width),
            prediction=_PREDICTION[prediction],
        )
        self.step_context: dict = {}
        self._rope_tables: dict = {}

    def _padding(self, frames: int) -> int:
        """Leading frames the pipeline adds so 1.5's temporal patch divides the clip."""
        pt = self.spec.patch[0]
        return (pt - frames % pt) % pt

    # -- stage 1 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sketch(self, height: int, width: int, num_frames: int, **pipeline_kwargs) -> torch.Tensor:
        if not self.spec.valid_frames(num_frames):
            raise ValueError(f"`num_frames` must be 4k+1 for the CogVideoX VAE but is {num_frames}.")
        latents = self.stock_latents(height, width, num_frames, **pipeline_kwargs)
        frames = (num_frames - 1) // self.spec.vae_scale[0] + 1
        # The pipeline returns 1.5's padding frames with `output_type="latent"` and drops them only when
        # decoding; drop them here so the sketch is the video the pipeline would have decoded.
        return latents[:, latents.shape[1] - frames :].permute(0, 2, 1, 3, 4)

    # -- VAE ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _vae_tiling(self):
        """The VAE's own tile size, with overlaps snapped to whole latent cells; restores the user's settings."""
        vae, scale = self.pipe.vae, self.spec.vae_scale[1]
        saved = {name: getattr(vae, name) for name in _VAE_TILING_ATTRS}
        lh, lw = max(1, vae.tile_sample_min_height // scale), max(1, vae.tile_sample_min_width // scale)
        vae.use_tiling = True
        vae.tile_sample_min_height, vae.tile_sample_min_width = lh * scale, lw * scale
        vae.tile_latent_min_height, vae.tile_latent_min_width = lh, lw
        vae.tile_overlap_factor_height = consistent_overlap(lh, saved["tile_overlap_factor_height"], scale)
        vae.tile_overlap_factor_width = consistent_overlap(lw, saved["tile_overlap_factor_width"], scale)
        try:
            yield vae
        finally:
            for name, value in saved.items():
                setattr(vae, name, value)

    @torch.no_grad()
    def vae_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        vae = self.pipe.vae
        return (1 / vae.config.scaling_factor * latents).to(vae.dtype), ()  # the pipeline's `decode_latents`

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.decode_tiling() as vae:
            return vae.decode(z).sample

    def decode_tiling(self):
        return self._vae_tiling()

    def _encode(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """One video at a time, as CogVideoX's V2V/I2V pipelines encode: a posterior sample drawn from
        ``generator`` (a list: one per video); without one, the posterior mode, so that stage 2 stays
        reproducible (its fresh randomness is the seeded re-noise)."""
        vae, out = self.pipe.vae, []
        with self._vae_tiling():
            for i, video in enumerate(pixels.to(vae.dtype)):
                dist = vae.encode(video[None]).latent_dist
                gen = generator[i] if isinstance(generator, list) else generator
                out.append(dist.mode() if gen is None else dist.sample(gen))
        return torch.cat(out)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.pipe.vae.config.scaling_factor * self._encode(pixels, generator)

    # -- stage 2 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def conditioning(self, canvas_shape: tuple[int, ...], **kw) -> Conditioning:
        pipe, config = self.pipe, self.pipe.transformer.config
        params = inspect.signature(pipe.__call__).parameters
        unknown = sorted(set(kw) - set(params))
        if unknown:
            raise TypeError(f"{type(pipe).__name__} takes no argument(s) {unknown}.")
        B, C, T, H, W = (int(v) for v in canvas_shape)
        if C != self.spec.latent_channels:
            raise ValueError(f"canvas has {C} channels but the model's latent has {self.spec.latent_channels}.")

        def value(name):  # the call's value, else the pipeline's own default
            return kw.get(name, params[name].default)

        guidance_scale = float(value("guidance_scale"))
        guided = guidance_scale > 1.0
        prompt_embeds, negative_embeds = kw.get("prompt_embeds"), kw.get("negative_prompt_embeds")
        if prompt_embeds is not None and kw.get("prompt") is not None:
            raise ValueError("Cannot forward both `prompt` and `prompt_embeds`; pass one of the two.")
        missing = prompt_embeds is None or (guided and negative_embeds is None)
        if missing and (pipe.tokenizer is None or pipe.text_encoder is None):
            raise ValueError(
                "this pipeline has no tokenizer/text encoder: pass `prompt_embeds`"
                + (" and `negative_prompt_embeds` (guidance_scale > 1)" if guided else "")
                + "."
            )
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            kw.get("prompt"), kw.get("negative_prompt"), guided, num_videos_per_prompt=1,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
            max_sequence_length=value("max_sequence_length"), device=pipe._execution_device,
        )  # fmt: skip
        if prompt_embeds.shape[0] != B:
            raise ValueError(f"{prompt_embeds.shape[0]} prompt(s) for a canvas batch of {B}.")
        if (not self.rotary or config.use_learned_positional_embeddings) and (
            prompt_embeds.shape[1] != config.max_text_seq_length
        ):
            raise ValueError(
                f"this CogVideoX adds positions over text and video tokens together, so prompts must be exactly "
                f"`max_text_seq_length`={config.max_text_seq_length} tokens long but are {prompt_embeds.shape[1]}."
            )
        embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
        dtype = pipe.transformer.dtype
        extra = {
            "family": "cogvideox",
            "batch": B,
            "frames": T,
            "canvas_hw": (H, W),
            "attention_kwargs": value("attention_kwargs"),
            # The I2V pipelines' offset embedding (CogVideoX 1.5): a constant 2.0.
            "ofs": None if config.ofs_embed_dim is None else torch.full((1,), 2.0, device=embeds.device, dtype=dtype),
            # `use_dynamic_cfg` rescales guidance from the timestep value and the call's step count.
            "dynamic_cfg_steps": int(value("num_inference_steps")) if kw.get("use_dynamic_cfg") else None,
        }
        canvas_extra = None
        if self.image_to_video:
            canvas_extra = self._image_latents((B, C, T, H, W), kw.get("image"), kw.get("generator"))
        return Conditioning(embeds.to(dtype), guidance_scale, canvas_extra, extra)

    def _image_latents(self, canvas_shape, image, generator) -> torch.Tensor:
        """``(B, C, T + pad, H, W)``: the encoded image on the first (padded) frame, zeros after, as the
        I2V pipeline's ``prepare_latents`` builds it, but at canvas size."""
        if image is None:
            raise ValueError("image-to-video needs `image` (the first frame).")
        pipe, vae = self.pipe, self.pipe.vae
        B, C, T, H, W = canvas_shape
        s = self.spec.vae_scale[1]
        pixels = pipe.video_processor.preprocess(image, height=H * s, width=W * s).to(pipe._execution_device)
        if pixels.shape[0] != B:
            raise ValueError(f"{pixels.shape[0]} image(s) for a canvas batch of {B}.")
        latents = self._encode(pixels.unsqueeze(2), generator).to(pipe.transformer.dtype)
        # 1.5-I2V was trained on unscaled image latents ("invert_scale_latents", see the pipeline).
        scale = vae.config.scaling_factor
        latents = latents / scale if vae.config.get("invert_scale_latents", False) else latents * scale
        rest = latents.new_zeros(B, C, T + self._padding(T) - 1, H, W)
        return torch.cat([latents, rest], dim=2)

    def rotary_emb(self, frames: int, tile_hw, origin, canvas_hw) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` of shape ``(T' * h/p * w/p, head_dim)`` for a tile of ``frames`` (padded) latent
        frames at ``origin`` (canvas mode), or ``None`` for sincos models."""
        if not self.rotary:
            return None
        p = self.spec.patch[1]
        grid = (tile_hw[0] // p, tile_hw[1] // p)
        if self.positions == "local":
            return self._rope_table(frames, grid)
        canvas_grid = (canvas_hw[0] // p, canvas_hw[1] // p)
        cos, sin = self._rope_table(frames, canvas_grid)
        rows = (torch.arange(grid[0]) + int(origin[0]) // p) % canvas_grid[0]
        cols = (torch.arange(grid[1]) + int(origin[1]) // p) % canvas_grid[1]

        def window(table):
            table = table.view(-1, *canvas_grid, table.shape[-1])
            return table[:, rows.to(table.device)][:, :, cols.to(table.device)].reshape(-1, table.shape[-1])

        return window(cos), window(sin)

    def _rope_table(self, frames: int, grid: tuple[int, int]):
        """The pipeline's ``_prepare_rotary_positional_embeddings`` for a ``grid`` of tokens (cached)."""
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        device = self.pipe._execution_device
        key = (frames, grid, str(device))
        if key in self._rope_tables:
            return self._rope_tables[key]
        config = self.pipe.transformer.config
        p, pt = config.patch_size, config.patch_size_t
        base = (config.sample_height // p, config.sample_width // p)
        if pt is None:  # 1.0: the grid resized into the base grid (linspace positions)
            crops = get_resize_crop_region_for_grid(grid, base[1], base[0])
            table = get_3d_rotary_pos_embed(config.attention_head_dim, crops, grid, frames, device=device)
        else:  # 1.5: integer positions, a slice of a `max_size` table
            if (grid[0] > base[0] or grid[1] > base[1]) and not self.extend_positions:
                raise ValueError(
                    f"{grid[0]}x{grid[1]} rotary positions exceed this CogVideoX 1.5's `max_size` {base[0]}x{base[1]} "
                    f"(its sample grid); use a smaller canvas, `positions='local'` or `extend_positions=True` "
                    f"(extrapolated positions)."
                )
            table = get_3d_rotary_pos_embed(
                config.attention_head_dim, None, grid, (frames + pt - 1) // pt, grid_type="slice",
                max_size=(max(base[0], grid[0]), max(base[1], grid[1])), device=device,
            )  # fmt: skip
        self._rope_tables[key] = table
        return table

    def _check(self, tiles, cond: Conditioning, origins, canvas_hw) -> tuple[int, int]:
        if cond.extra.get("family") != "cogvideox":
            raise ValueError("`cond` was not built by CogVideoXAdapter.conditioning.")
        if not isinstance(tiles, torch.Tensor) or tiles.dim() != 5:
            raise ValueError("`tiles` must be a (N * B, C, T, h, w) tensor.")
        n, batch = origins.shape[0], cond.extra["batch"]
        _, C, T, h, w = tiles.shape
        if tiles.shape[0] != n * batch or C != self.spec.latent_channels or T != cond.extra["frames"]:
            raise ValueError(
                f"`tiles` {tuple(tiles.shape)} must be ({n} tiles * batch {batch}, {self.spec.latent_channels}, "
                f"{cond.extra['frames']} frames as in `cond`, h, w)."
            )
        if tuple(int(v) for v in canvas_hw) != cond.extra["canvas_hw"]:
            raise ValueError(f"`canvas_hw` {tuple(canvas_hw)} is not the canvas {cond.extra['canvas_hw']} of `cond`.")
        p = self.spec.patch[1]
        if h % p or w % p or bool((origins % p).any()):
            raise ValueError(f"tile size {h}x{w} and origins must be multiples of the patch {p}.")
        config = self.pipe.transformer.config
        if config.use_learned_positional_embeddings and (h, w) != (config.sample_height, config.sample_width):
            raise ValueError(
                f"this CogVideoX has learned positions for {config.sample_height}x{config.sample_width} latents "
                f"only; tiles are {h}x{w}."
            )
        return n, batch

    def _guided(self, cond: Conditioning) -> bool:
        return cond.guidance_scale > 1.0

    def _guidance_scale(self, cond: Conditioning, t) -> float:
        scale = cond.guidance_scale
        if cond.extra["dynamic_cfg_steps"] is not None:  # the pipeline's formula, from the timestep value
            steps = cond.extra["dynamic_cfg_steps"]
            scale = 1 + scale * ((1 - math.cos(math.pi * ((steps - float(t)) / steps) ** 5.0)) / 2)
        return scale

    def guide(self, outputs: dict, cond: Conditioning, timestep) -> torch.Tensor:
        uncond = outputs["uncond"].float()  # same expression (and rounding) as the pipeline
        return uncond + self._guidance_scale(cond, timestep) * (outputs["cond"].float() - uncond)

    @torch.no_grad()
    def _predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branch) -> torch.Tensor:
        transformer = self.pipe.transformer
        origins = torch.as_tensor(origins, dtype=torch.int64)
        n_tiles, batch = self._check(tiles, cond, origins, canvas_hw)
        frames, (h, w) = tiles.shape[2], tiles.shape[-2:]
        pad = self._padding(frames)
        t = torch.as_tensor(timestep, device=tiles.device)
        x = self.pipe.scheduler.scale_model_input(tiles, t)
        if pad:  # 1.5: repeat the first frame (same noise level); its prediction rows are dropped below
            x = torch.cat([x[:, :, :1].expand(-1, -1, pad, -1, -1), x], dim=2)
        if cond.canvas_extra is not None:
            if cond.canvas_extra.shape[2] != frames + pad:
                raise ValueError(f"`cond.canvas_extra` has {cond.canvas_extra.shape[2]} frames, not {frames + pad}.")
            # Torus windows: a plain crop inside the canvas, wrapped like the latent windows outside it.
            x = torch.cat([x, halo_gather(cond.canvas_extra, origins, (h, w), 0, "torus").to(x.dtype)], dim=1)
        x = x.permute(0, 2, 1, 3, 4).to(transformer.dtype)  # the model's (B, T, C, H, W)
        # One rotary table per forward: canvas positions differ per tile, so they go one tile at a time.
        group = 1 if self.positions == "canvas" and self.rotary else self.max_tile_batch
        context = {k: v for k, v in self.step_context.items() if v is not None}
        guided = cond.guidance_scale > 1.0 and branch is None
        texts = cond.embeds.reshape(-1, batch, *cond.embeds.shape[1:])  # ([uncond,] cond, B, L, D)
        if branch is not None:
            texts = texts[{"uncond": 0, "cond": 1}[branch]][None]
        label = "cond_uncond" if branch is None else branch
        outputs = []
        for start in range(0, n_tiles, group):
            stop = min(start + group, n_tiles)
            xs = x[start * batch : stop * batch]
            text = texts.repeat_interleave(stop - start, 0).flatten(0, 1)
            name = f"{label}/tile{start}" if stop - start == 1 else f"{label}/tiles{start}-{stop - 1}"
            with transformer.cache_context(name, **context):
                pred = transformer(
                    hidden_states=torch.cat([xs, xs]) if guided else xs,
                    encoder_hidden_states=text,
                    timestep=t.expand(2 * xs.shape[0] if guided else xs.shape[0]),
                    ofs=cond.extra["ofs"],
                    image_rotary_emb=self.rotary_emb(frames + pad, (h, w), origins[start], canvas_hw),
                    attention_kwargs=cond.extra["attention_kwargs"],
                    return_dict=False,
                )[0]
            if branch is None:
                pred = pred.float()
            if guided:
                uncond, text_pred = pred.chunk(2)
                pred = self.guide({"uncond": uncond, "cond": text_pred}, cond, t)
            outputs.append(pred)
        pred = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return pred[:, pad:].permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def scheduler_step(self, scheduler, noise_pred, t, latents, *, step_index: int, state: dict, generator=None):
        """One update of the whole canvas, as the CogVideoX pipelines step.

        ``CogVideoXDPMScheduler.step`` is not the common signature: it takes the previous step's
        predicted ``x0`` and the timestep before ``t``, and returns the new ``x0``, which ``state`` (a dict
        the refine loop creates empty per generation) carries to the next call. ``step_index`` is ``t``'s
        index in ``scheduler.timesteps``. It draws SDE noise from ``generator`` each step.
        """
        from diffusers import CogVideoXDPMScheduler

        # Stepped in the pipeline's (B, T, C, H, W) layout: the SDE noise is drawn in that order, so the
        # same generator gives the pipeline's noise (updates are elementwise: the layout changes nothing else).
        latents, noise_pred = latents.permute(0, 2, 1, 3, 4), noise_pred.permute(0, 2, 1, 3, 4)
        if isinstance(scheduler, CogVideoXDPMScheduler):
            back = scheduler.timesteps[step_index - 1] if step_index > 0 else None
            latents, state["old_pred_original_sample"] = scheduler.step(
                noise_pred, state.get("old_pred_original_sample"), t, back, latents, generator=generator,
                return_dict=False,
            )  # fmt: skip
        else:
            accepts = inspect.signature(scheduler.step).parameters
            kwargs = {"generator": generator} if "generator" in accepts else {}
            latents = scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]
        return latents.permute(0, 2, 1, 3, 4)
