"""LTX-Video text-to-video (``LTXPipeline``).

Model facts this adapter owns:

* the transformer reads *packed* tokens ``(B, T·H·W, C)`` (patch ``(patch_size_t, patch_size,
  patch_size)``, 1 in the released models), not ``(B, C, T, H, W)``: tiles are packed and the
  predictions unpacked with the pipeline's own ``_pack_latents``/``_unpack_latents``, and the
  pipeline's ``output_type="latent"`` (packed too) is unpacked for the sketch;
* latents are normalised per channel, ``(z - mean) * scaling / std`` (the VAE's ``latents_mean``/
  ``latents_std``); VAE 32x spatial, 8x temporal in the released models (the VAE's own ratios here);
* the transformer predicts a flow velocity; classifier-free guidance is batched (uncond first, one
  forward named ``"cond_uncond/tile3"``), with the pipeline's ``guidance_rescale``, on the output
  upcast to fp32 (predictions are fp32 whatever the model's dtype: ``prediction_dtype``).
  ``separate_guidance=True`` runs the two branches as two forwards that tile parallelism may put on
  two ranks;
* the schedule is ``sigmas = linspace(1, 1/N, N)`` shifted by ``mu = calculate_shift(T·h·w)`` of the
  video the pipeline generates, so :meth:`LTXVideoAdapter.set_timesteps` needs the *sketch's* latent
  shape to give stage 2 the sketch's very schedule (tiles have the sketch's size, not the canvas');
* rotary positions are fractional pixel coordinates, ``rope_interpolation_scale = (vae_t /
  frame_rate, vae_s, vae_s)`` times the latent grid. ``local`` lets the transformer build each tile's
  own grid, as the pipeline does; ``canvas`` passes ``video_coords``: each tile cell's place on the
  canvas (wrapped around the torus like the windows), in the same units and arithmetic order, so a
  tile's table is a slice of the whole canvas' one. ``video_coords`` is per sample, so tiles batch
  in either mode;
* the decoder of LTX-Video 0.9.1+ is timestep-conditioned (``decode_timestep``,
  ``decode_noise_scale``): the decode stage runs before stage 2 sees the call's arguments, so they
  are adapter options (``SuperGen(..., adapter_options={"decode_timestep": 0.03,
  "decode_noise_scale": 0.025})``), and the decode noise is drawn from ``decode_seed``.

Image-to-video and conditioning pipelines (``LTXImageToVideoPipeline``, ``LTXConditionPipeline``)
condition tokens with per-token timesteps and are refused at construction.
"""

from __future__ import annotations

import inspect

import torch

from .base import (
    BatchedGuidance,
    Conditioning,
    ModelSpec,
    call_default_latent,
    cast_first_dtype,
    register_adapter,
    vae_tiling,
)

#: Arguments of the pipeline's call that the adapter takes as options instead (see the module notes).
DECODE_ARGUMENTS = ("decode_timestep", "decode_noise_scale")


@register_adapter("LTXVideoTransformer3DModel")
class LTXVideoAdapter(BatchedGuidance):
    """LTX-Video text-to-video, classifier-free guidance batched in one forward.

    Args:
        decode_timestep, decode_noise_scale, decode_seed: the timestep-conditioned decoder's arguments
            (module notes).
        separate_guidance: run stage 2's classifier-free guidance as two forwards per tile (conditional,
            unconditional) instead of the pipeline's one forward of both batched, so that tile
            parallelism may run them on two ranks (:meth:`guidance_branches`). The same model and
            arithmetic at batch 1: equal to the batched prediction up to float rounding, not bit for bit.
    """

    def __init__(self, pipe, positions: str = "local", max_tile_batch: int = 1, decode_timestep: float = 0.0,
                 decode_noise_scale: float | None = None, decode_seed: int = 0,
                 separate_guidance: bool = False):  # fmt: skip
        from diffusers import LTXPipeline

        super().__init__(pipe, positions=positions, max_tile_batch=max_tile_batch)
        self.separate_guidance = bool(separate_guidance)
        if not isinstance(pipe, LTXPipeline):
            raise ValueError(
                f"{type(pipe).__name__} is not supported yet: the LTX-Video adapter serves LTXPipeline "
                "(text-to-video); image-to-video and conditioning pipelines give tokens their own timesteps."
            )
        for name, value in (("decode_timestep", decode_timestep), ("decode_noise_scale", decode_noise_scale)):
            if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool)):
                raise ValueError(f"`{name}` must be a number but is {value!r}.")
        config = pipe.transformer.config
        s = pipe.vae_spatial_compression_ratio
        self.spec = ModelSpec(
            family="ltx_video",
            patch=(config.patch_size_t, config.patch_size, config.patch_size),
            vae_scale=(pipe.vae_temporal_compression_ratio, s),
            latent_channels=config.out_channels,
            native_latent=call_default_latent(pipe, s),
            prediction="flow",
        )
        self.decode_timestep = float(decode_timestep)
        self.decode_noise_scale = self.decode_timestep if decode_noise_scale is None else float(decode_noise_scale)
        self.decode_seed = int(decode_seed)
        self.step_context: dict = {}

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._pack_latents(latents, self.spec.patch[1], self.spec.patch[0])

    def _unpack(self, tokens: torch.Tensor, shape) -> torch.Tensor:
        """Packed ``(B, S, C')`` → ``(B, C, T, H, W)`` for a latent of ``shape[-3:]``."""
        pt, p = self.spec.patch[0], self.spec.patch[1]
        frames, height, width = shape[-3:]
        return self.pipe._unpack_latents(tokens, frames // pt, height // p, width // p, p, pt)

    @staticmethod
    def _refuse_decode_arguments(kwargs: dict) -> None:
        given = sorted(k for k in DECODE_ARGUMENTS if k in kwargs)
        if given:
            raise ValueError(
                f"pass {given} as adapter options (SuperGen(..., adapter_options={{{given[0]!r}: ...}})): "
                "the decode stage does not see the call's arguments."
            )

    # -- stage 1 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sketch(self, height: int, width: int, num_frames: int, **pipeline_kwargs) -> torch.Tensor:
        self._refuse_decode_arguments(pipeline_kwargs)
        packed = self.stock_latents(height, width, num_frames, **pipeline_kwargs)  # packed tokens
        s, t = self.spec.vae_scale[1], self.spec.vae_scale[0]
        return self._unpack(packed, ((num_frames - 1) // t + 1, height // s, width // s))

    def set_timesteps(self, scheduler, num_inference_steps: int, device=None, sketch_shape=None) -> None:
        """The pipeline's N-step schedule for a video of the sketch's latent ``sketch_shape`` ``(T, h, w)``:
        sigmas ``linspace(1, 1/N, N)`` shifted by ``mu`` of its sequence length."""
        import numpy as np
        from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

        if sketch_shape is None:
            raise ValueError("LTX-Video's schedule depends on the sketch's size: pass `sketch_shape` (T, h, w).")
        frames, height, width = (int(v) for v in sketch_shape)
        config = scheduler.config
        mu = calculate_shift(
            frames * height * width, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )  # fmt: skip
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)

    # -- VAE ----------------------------------------------------------------------------------------

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def vae_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The pipeline's decode: denormalise, then (timestep-conditioned decoders) blend in noise at
        ``decode_noise_scale`` and decode at ``decode_timestep``."""
        vae = self.pipe.vae
        mean, std = self._stats(latents)
        z = latents * std / vae.config.scaling_factor + mean
        timestep = None
        if vae.config.timestep_conditioning:
            generator = torch.Generator(device=z.device).manual_seed(self.decode_seed)
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            timestep = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
            z = (1 - self.decode_noise_scale) * z + self.decode_noise_scale * noise
        return z.to(vae.dtype), (timestep,)

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        with self.decode_tiling() as vae:
            return vae.decode(z, timestep, return_dict=False)[0]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        with vae_tiling(vae):
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        # A posterior sample from `generator`; without one the mode, so stage 2 stays reproducible.
        z = (dist.mode() if generator is None else dist.sample(generator)).float()
        mean, std = self._stats(z)
        return (z - mean) * vae.config.scaling_factor / std

    # -- stage 2 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def conditioning(self, canvas_shape: tuple[int, ...], **kw) -> Conditioning:
        pipe = self.pipe
        params = inspect.signature(pipe.__call__).parameters
        unknown = sorted(set(kw) - set(params))
        if unknown:
            raise TypeError(f"{type(pipe).__name__} takes no argument(s) {unknown}.")
        self._refuse_decode_arguments(kw)

        def value(name):  # the call's value, else the pipeline's own default
            return kw.get(name, params[name].default)

        for name in ("prompt_embeds", "negative_prompt_embeds"):
            mask = name.replace("embeds", "attention_mask")
            if kw.get(name) is not None and kw.get(mask) is None:
                raise ValueError(f"`{name}` needs `{mask}` too.")
        guidance_scale = float(value("guidance_scale"))
        guided = guidance_scale > 1.0
        for prefix in ("", "negative_") if guided else ("",):
            if kw.get(f"{prefix}prompt_embeds") is None and pipe.tokenizer is None:
                raise ValueError(
                    f"this pipeline has no tokenizer: pass `{prefix}prompt_embeds` and `{prefix}prompt_attention_mask`."
                )
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompt=kw.get("prompt"), negative_prompt=kw.get("negative_prompt"), do_classifier_free_guidance=guided,
            num_videos_per_prompt=1, prompt_embeds=kw.get("prompt_embeds"),
            negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            prompt_attention_mask=kw.get("prompt_attention_mask"),
            negative_prompt_attention_mask=kw.get("negative_prompt_attention_mask"),
            max_sequence_length=value("max_sequence_length"), device=pipe._execution_device,
        )  # fmt: skip
        B = int(canvas_shape[0])
        if embeds.shape[0] != B:
            raise ValueError(f"{embeds.shape[0]} prompt(s) for a canvas batch of {B}.")
        dtype = pipe.transformer.dtype
        text = {"cond": (embeds.to(dtype), mask), "uncond": (negative.to(dtype), negative_mask) if guided else None}
        t, s = self.spec.vae_scale
        extra = {
            "rope_interpolation_scale": (t / value("frame_rate"), s, s),
            "guidance_rescale": float(value("guidance_rescale")),
            "attention_kwargs": value("attention_kwargs"),
        }
        return Conditioning(text, guidance_scale, None, extra)

    def tile_input_dtype(self, latents_dtype: torch.dtype) -> torch.dtype:
        return cast_first_dtype(self.pipe.transformer, latents_dtype)  # predict packs (no arithmetic), then casts

    def _video_coords(self, origins: torch.Tensor, shape, canvas_hw, scale, batch: int, device) -> torch.Tensor:
        """``(n * batch, 3, T·h·w)`` coordinates of the tiles' cells on the canvas, as the transformer's
        rotary module computes them for a whole video (grid × interpolation scale × patch)."""
        pt, p = self.spec.patch[0], self.spec.patch[1]
        frames, height, width = shape[-3:]
        H, W = canvas_hw
        f = torch.arange(frames // pt, dtype=torch.float32, device=device)
        coords = []
        for oy, ox in origins.tolist():
            h = (torch.arange(height // p, device=device) + oy // p) % (H // p)
            w = (torch.arange(width // p, device=device) + ox // p) % (W // p)
            grid = torch.stack(torch.meshgrid(f, h.float(), w.float(), indexing="ij"))
            grid = torch.stack([grid[0] * scale[0] * pt, grid[1] * scale[1] * p, grid[2] * scale[2] * p])
            coords.append(grid.flatten(1).unsqueeze(0).expand(batch, -1, -1))
        return torch.cat(coords)

    def _guided(self, cond: Conditioning) -> bool:
        return cond.embeds["uncond"] is not None

    def guide(self, outputs: dict, cond: Conditioning, timestep=None) -> torch.Tensor:
        """The pipeline's expressions, with ``guidance_rescale``'s standard deviations taken over each
        sample's values in ``(C, T, h, w)`` order (flattened cells or not: the same values, the same sum)."""
        from diffusers.pipelines.ltx.pipeline_ltx import rescale_noise_cfg

        uncond, text = outputs["uncond"].float(), outputs["cond"].float()
        pred = uncond + cond.guidance_scale * (text - uncond)
        if cond.extra["guidance_rescale"] > 0:
            shape = pred.shape
            pred = rescale_noise_cfg(pred.flatten(1), text.flatten(1), guidance_rescale=cond.extra["guidance_rescale"])
            pred = pred.view(shape)
        return pred

    @torch.no_grad()
    def _predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branch) -> torch.Tensor:
        from diffusers.pipelines.ltx.pipeline_ltx import rescale_noise_cfg

        transformer = self.pipe.transformer
        origins = torch.as_tensor(origins, dtype=torch.int64)
        n_tiles = origins.shape[0]
        batch = cond.embeds["cond"][0].shape[0]
        if tiles.dim() != 5 or tiles.shape[0] != n_tiles * batch:
            raise ValueError(f"`tiles` {tuple(tiles.shape)} must be ({n_tiles} tiles * batch {batch}, C, T, h, w).")
        pt, p = self.spec.patch[0], self.spec.patch[1]
        frames, height, width = tiles.shape[-3:]
        scale = cond.extra["rope_interpolation_scale"]
        guided = cond.embeds["uncond"] is not None and branch is None
        if branch is not None:
            branches = [cond.embeds[branch]]
        else:
            branches = [cond.embeds["uncond"], cond.embeds["cond"]] if guided else [cond.embeds["cond"]]
        label = "cond_uncond" if branch is None else branch
        context = {k: v for k, v in self.step_context.items() if v is not None}
        out = None
        for start in range(0, n_tiles, self.max_tile_batch):
            stop = min(start + self.max_tile_batch, n_tiles)
            n = stop - start
            x = self._pack(tiles[start * batch : stop * batch]).to(transformer.dtype)
            text = torch.cat([e.repeat(n, 1, 1) for e, _ in branches])
            mask = torch.cat([m.repeat(n, 1) for _, m in branches])
            coords = None
            if self.positions == "canvas":
                coords = self._video_coords(origins[start:stop], tiles.shape, canvas_hw, scale, batch, x.device)
                coords = coords.repeat(len(branches), 1, 1)
            hidden = torch.cat([x] * len(branches))
            name = f"{label}/tile{start}" if n == 1 else f"{label}/tiles{start}-{stop - 1}"
            with transformer.cache_context(name, **context):
                pred = transformer(
                    hidden_states=hidden, encoder_hidden_states=text, timestep=timestep.expand(hidden.shape[0]),
                    encoder_attention_mask=mask, num_frames=frames // pt, height=height // p, width=width // p,
                    rope_interpolation_scale=scale, video_coords=coords,
                    attention_kwargs=cond.extra["attention_kwargs"], return_dict=False,
                )[0]  # fmt: skip
            if branch is None:
                pred = pred.float()
            if guided:  # the pipeline's expressions (and rounding), on its packed tokens
                uncond, text_pred = pred.chunk(2)
                pred = uncond + cond.guidance_scale * (text_pred - uncond)
                if cond.extra["guidance_rescale"] > 0:
                    pred = rescale_noise_cfg(pred, text_pred, guidance_rescale=cond.extra["guidance_rescale"])
            pred = self._unpack(pred, tiles.shape)
            if n == n_tiles:
                return pred
            if out is None:  # written in place: a list + cat would hold two canvas-size copies
                out = pred.new_empty((tiles.shape[0], *pred.shape[1:]))
            out[start * batch : stop * batch] = pred
        return out
