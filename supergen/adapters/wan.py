"""Wan 2.1 and Wan 2.2 A14B (``WanPipeline`` text-to-video, ``WanImageToVideoPipeline`` image-to-video).

Model facts this adapter owns:

* latents are already ``(B, C, T, H, W)``; patch ``(1, 2, 2)``; VAE 8x spatial, 4x temporal (4k+1
  frames); latents are normalised ``(z - latents_mean) / latents_std`` per channel;
* the transformer predicts a flow velocity; guidance is two calls (cond, uncond), each in a
  ``cache_context`` named per branch *and per tile* (``"cond/tile3"``), because diffusers' stateful
  caches keep one state per context name and a shared name silently mixes tiles;
* image-to-video concatenates ``y`` = (first-frame mask | encoded first frame) on channels. ``y`` is
  built once at canvas size with the pipeline's own ``prepare_latents`` and cropped per tile with the
  tile's window, so each tile sees exactly its part of the image;
* rotary positions come from ``transformer.rope``, which always starts at 0 (tile-local). ``canvas``
  positions install a hook on that module returning, for each tile, the rows of the full-canvas
  table at the tile's place, wrapped around the torus like the windows themselves;
* Wan 2.2 A14B has two experts: ``transformer`` predicts at timesteps ``>= boundary_ratio *
  num_train_timesteps``, ``transformer_2`` below, guided with ``guidance_scale_2`` (default: the same
  scale), the test and the arithmetic ``WanPipeline`` uses; stage 2 mostly runs in the second expert's
  range. Wan 2.2 TI2V-5B (per-token timesteps, ``expand_timesteps``) is not supported.
"""

from __future__ import annotations

import contextlib

import torch

from ..ops import halo_gather
from .base import (
    Conditioning,
    ModelSpec,
    TwoForwardGuidance,
    cast_first_dtype,
    register_adapter,
    rope_window_hook,
    vae_tiling,
)

#: Wan 2.1 native sizes in pixels: 1.3B was trained at 480p (the pipeline default), the 14B T2V and
#: I2V-720P models at 720p. The config cannot tell I2V-14B-480P from -720P (one architecture), so the
#: 14B guess is 720p; pass ``SuperGen(native_size=...)`` to say otherwise.
NATIVE_720P = (720, 1280)
NATIVE_480P = (480, 832)


def canvas_rope(rope, hidden_states: torch.Tensor, origins: torch.Tensor, canvas_hw: tuple[int, int], batch: int):
    """Wan rotary tables for tiles placed at ``origins`` (latent cells) on a ``canvas_hw`` canvas.

    Returns ``(cos, sin)`` of shape ``(N * batch, L, 1, D)`` (tile-major rows, as the tiles): for tile
    ``n`` the rows/columns of the full-canvas table starting at its origin, wrapped modulo the canvas
    — exactly the slice of what ``rope`` returns for the whole canvas.
    """
    _, _, frames, height, width = hidden_states.shape
    pt, ph, pw = rope.patch_size
    ppf, pph, ppw = frames // pt, height // ph, width // pw
    grid_h, grid_w = canvas_hw[0] // ph, canvas_hw[1] // pw
    if max(ppf, grid_h, grid_w) > rope.max_seq_len:
        raise ValueError(
            f"canvas positions need {max(ppf, grid_h, grid_w)} rotary positions per axis but the model's "
            f"`rope_max_seq_len` is {rope.max_seq_len}; use `positions='local'` or a smaller canvas."
        )
    origins = origins.to(rope.freqs_cos.device)
    rows = (origins[:, :1] // ph + torch.arange(pph, device=origins.device)) % grid_h  # (N, pph)
    cols = (origins[:, 1:] // pw + torch.arange(ppw, device=origins.device)) % grid_w  # (N, ppw)
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    tables = []
    for freqs in (rope.freqs_cos, rope.freqs_sin):
        ft, fh, fw = freqs.split(split, dim=1)
        per_tile = []
        for r, c in zip(rows, cols):
            per_tile.append(
                torch.cat(
                    [
                        ft[:ppf].view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                        fh[r].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                        fw[c].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
                    ],
                    dim=-1,
                ).reshape(ppf * pph * ppw, 1, -1)
            )
        tables.append(torch.stack(per_tile).repeat_interleave(batch, dim=0))
    return tables[0], tables[1]


def _canvas_rope_hook(rope):
    """The canvas-position hook on ``transformer.rope`` (pass-through unless a window is set)."""
    return rope_window_hook(rope, canvas_rope)


@register_adapter("WanTransformer3DModel")
class WanAdapter(TwoForwardGuidance):
    """Wan 2.1 and 2.2 A14B text-to-video and image-to-video (CLIP image embeddings included when the model
    has them)."""

    def __init__(self, pipe, positions: str = "local", max_tile_batch: int = 1):
        super().__init__(pipe, positions=positions, max_tile_batch=max_tile_batch)
        transformer, vae = pipe.transformer, pipe.vae
        if getattr(pipe.config, "expand_timesteps", False):
            raise ValueError("Wan 2.2 TI2V (`expand_timesteps=True`) is not supported yet; use Wan 2.1 or 2.2 A14B.")
        # Wan 2.2 A14B: `transformer` at timesteps >= the boundary, `transformer_2` below (WanPipeline's rule)
        ratio = getattr(pipe.config, "boundary_ratio", None)
        second = getattr(pipe, "transformer_2", None)
        if transformer is None or (ratio is not None and second is None):
            missing = "transformer" if transformer is None else "transformer_2"
            raise ValueError(f"this Wan pipeline has no `{missing}`; supergen needs both experts of a two-expert Wan.")
        self.boundary = None if ratio is None else float(ratio) * pipe.scheduler.config.num_train_timesteps
        self.experts = (transformer,) if self.boundary is None else (transformer, second)
        self.image_to_video = transformer.config.in_channels != vae.config.z_dim
        big = transformer.config.num_attention_heads * transformer.config.attention_head_dim >= 5120
        native_px = NATIVE_720P if big else NATIVE_480P
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        self.spec = ModelSpec(
            family="wan",
            patch=tuple(int(p) for p in transformer.config.patch_size),
            vae_scale=(temporal, spatial),
            latent_channels=vae.config.z_dim,
            native_latent=(native_px[0] // spatial, native_px[1] // spatial),
            prediction="flow",
        )
        self.step_context = {}
        self._rope_hooks = [_canvas_rope_hook(m.rope) for m in self.experts] if positions == "canvas" else []

    # -- stage 1 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sketch(self, height: int, width: int, num_frames: int, **pipeline_kwargs) -> torch.Tensor:
        return self.stock_latents(height, width, num_frames, **pipeline_kwargs)

    # -- VAE ----------------------------------------------------------------------------------------

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, inv_std

    def vae_tile_geometry(self):
        if getattr(self.pipe.vae.config, "patch_size", None):  # Wan 2.2's patchified VAE crops in other units
            return None
        return super().vae_tile_geometry()

    @torch.no_grad()
    def vae_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        latents = latents.to(self.pipe.vae.dtype)
        mean, inv_std = self._stats(latents)
        # Same expression as WanPipeline's decode, so decoding the sketch matches the stock output.
        return latents / inv_std + mean, ()

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.decode_tiling() as vae:
            return vae.decode(z, return_dict=False)[0]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        with vae_tiling(vae):
            # The posterior mode, as Wan's own video-to-video and image-to-video pipelines encode:
            # the fresh randomness of stage 2 is the seeded re-noise, not a posterior sample.
            z = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()
        mean, inv_std = self._stats(z)
        return (z - mean) * inv_std

    # -- stage 2 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def conditioning(self, canvas_shape: tuple[int, ...], **kw) -> Conditioning:
        pipe, transformer = self.pipe, self.pipe.transformer
        device, dtype = pipe._execution_device, transformer.dtype
        guidance_scale = float(kw.get("guidance_scale", 5.0))
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=kw.get("prompt"),
            negative_prompt=kw.get("negative_prompt"),
            do_classifier_free_guidance=guidance_scale > 1.0,
            num_videos_per_prompt=1,
            prompt_embeds=kw.get("prompt_embeds"),
            negative_prompt_embeds=kw.get("negative_prompt_embeds"),
            max_sequence_length=kw.get("max_sequence_length", 512),
            device=device,
        )
        if prompt_embeds.shape[0] != canvas_shape[0]:
            raise ValueError(f"{prompt_embeds.shape[0]} prompts for a canvas batch of {canvas_shape[0]}.")
        embeds = {
            "cond": prompt_embeds.to(dtype),
            "uncond": None if negative_embeds is None else negative_embeds.to(dtype),
            "image": None,
            "attention_kwargs": kw.get("attention_kwargs"),
        }
        canvas_extra = None
        if self.image_to_video:
            canvas_extra, embeds["image"] = self._image_condition(canvas_shape, **kw)
        extra = {}
        if kw.get("guidance_scale_2") is not None:  # the second expert's scale (default: the same, as WanPipeline)
            if self.boundary is None:
                raise ValueError("`guidance_scale_2` is only for two-expert Wan 2.2 pipelines (`boundary_ratio` set).")
            extra["guidance_scale_2"] = float(kw["guidance_scale_2"])
        return Conditioning(embeds=embeds, guidance_scale=guidance_scale, canvas_extra=canvas_extra, extra=extra)

    def _image_condition(self, canvas_shape, image=None, last_image=None, image_embeds=None, num_frames=None, **_):
        """Canvas-size ``y`` (mask | encoded first frame), built by the pipeline's own code, and CLIP embeds."""
        pipe, transformer = self.pipe, self.pipe.transformer
        if image is None:
            raise ValueError("image-to-video needs `image` (the first frame).")
        device, dtype = pipe._execution_device, transformer.dtype
        B, C, T, H, W = canvas_shape
        s = self.spec.vae_scale[1]
        if transformer.config.image_dim is not None and image_embeds is None:
            image_embeds = pipe.encode_image(image if last_image is None else [image, last_image], device)
        if image_embeds is not None:
            image_embeds = image_embeds.repeat(B, 1, 1).to(dtype)
        pixels = pipe.video_processor.preprocess(image, height=H * s, width=W * s).to(device, dtype=torch.float32)
        if last_image is not None:
            last_image = pipe.video_processor.preprocess(last_image, height=H * s, width=W * s)
            last_image = last_image.to(device, dtype=torch.float32)
        # `latents` is given (zeros, unused) so that building `y` draws nothing from any generator.
        _, y = pipe.prepare_latents(
            pixels, B, C, H * s, W * s, num_frames, torch.float32, device, None,
            torch.zeros(canvas_shape, device=device), last_image,
        )  # fmt: skip
        return y, image_embeds

    def tile_input_dtype(self, latents_dtype: torch.dtype) -> torch.dtype:
        return cast_first_dtype(self.pipe.transformer, latents_dtype)  # predict's first step is that cast

    def sketch_guidance_pairs(self, pipeline_kwargs: dict) -> bool:
        return float(pipeline_kwargs.get("guidance_scale", 5.0)) > 1.0  # WanPipeline's two calls, as below

    def guidance_branches(self, cond: Conditioning) -> tuple[str, ...]:
        return ("cond", "uncond") if cond.guidance_scale > 1.0 else ()  # two forwards, as WanPipeline runs them

    def denoiser_index(self, timestep) -> int:
        # WanPipeline's test, in the timestep's own dtype: `t >= boundary_ratio * num_train_timesteps`
        return 0 if self.boundary is None or bool(torch.as_tensor(timestep) >= self.boundary) else 1

    def guidance_scale_at(self, cond: Conditioning, timestep=None) -> float:
        second = timestep is not None and self.denoiser_index(timestep) == 1
        return cond.extra.get("guidance_scale_2", cond.guidance_scale) if second else cond.guidance_scale

    @torch.no_grad()
    def _predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branches) -> torch.Tensor:
        transformer = self.experts[self.denoiser_index(timestep)]
        origins = torch.as_tensor(origins, dtype=torch.int64)
        n_tiles = origins.shape[0]
        batch = tiles.shape[0] // n_tiles
        h, w = tiles.shape[-2:]
        embeds = cond.embeds
        context = {k: v for k, v in self.step_context.items() if v is not None}
        out = None
        for start in range(0, n_tiles, self.max_tile_batch):
            stop = min(start + self.max_tile_batch, n_tiles)
            n = stop - start
            x = tiles[start * batch : stop * batch]
            if cond.canvas_extra is not None:
                # Torus mode is a plain crop for windows inside the canvas and wraps the others,
                # exactly as the latent windows were gathered.
                y = halo_gather(cond.canvas_extra, origins[start:stop], (h, w), 0, "torus")
                x = torch.cat([x, y], dim=1)
            x = x.to(self.experts[0].dtype)  # WanPipeline feeds both experts in the first one's dtype
            kwargs = {
                "timestep": timestep.expand(x.shape[0]),
                "encoder_hidden_states_image": None if embeds["image"] is None else embeds["image"].repeat(n, 1, 1),
                "attention_kwargs": embeds["attention_kwargs"],
                "return_dict": False,
            }
            name = f"tile{start}" if n == 1 else f"tiles{start}-{stop - 1}"
            outputs = {}
            with self._positions(origins[start:stop], canvas_hw, batch):
                for branch in branches:
                    with transformer.cache_context(f"{branch}/{name}", **context):
                        text = embeds[branch].repeat(n, 1, 1)
                        outputs[branch] = transformer(hidden_states=x, encoder_hidden_states=text, **kwargs)[0]
            pred = self.guide(outputs, cond, timestep) if len(branches) == 2 else outputs[branches[0]]
            if stop - start == n_tiles:
                return pred
            if out is None:  # written in place: a list + cat would hold two canvas-size copies
                out = pred.new_empty((tiles.shape[0], *pred.shape[1:]))
            out[start * batch : stop * batch] = pred
        return out

    @contextlib.contextmanager
    def _positions(self, origins: torch.Tensor, canvas_hw: tuple[int, int], batch: int):
        for hook in self._rope_hooks:  # both experts' rotary modules: the step decides which one runs
            hook.window = (origins, tuple(canvas_hw), batch)
        try:
            yield
        finally:
            for hook in self._rope_hooks:
                hook.window = None
