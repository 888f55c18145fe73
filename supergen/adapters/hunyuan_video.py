"""HunyuanVideo text-to-video (``HunyuanVideoPipeline``).

Model facts this adapter owns:

* latents are ``(B, C, T, H, W)`` already; patch ``(patch_size_t, 2, 2)``; VAE 8x spatial, 4x temporal,
  latents scaled by ``scaling_factor``; native size = the pipeline's default 720x1280;
* the transformer predicts a flow velocity. Guidance is *embedded* (``guidance_scale * 1000`` goes in
  as an input, one forward); true CFG (``true_cfg_scale > 1`` with a negative prompt) adds a second
  forward. Each forward runs in a ``cache_context`` named per branch and per tile (``"cond/tile3"``);
* the pipeline sets explicit sigmas ``linspace(1, 0, N + 1)[:-1]``, not the scheduler's default
  spacing: :meth:`HunyuanVideoAdapter.set_timesteps` gives stage 2 the same N-step schedule;
* text is three tensors: LLaMA token embeddings, their attention mask and pooled CLIP embeddings;
* rotary positions come from ``transformer.rope``, which builds ``arange`` grids from the input size
  (tile-local, no maximum). ``canvas`` positions install a hook on that module returning each tile's
  positions on the canvas, wrapped around the torus like the windows. The module returns one table
  for the whole batch, so canvas positions run one tile per forward.

Image-to-video (``image_condition_type``) is not supported yet and is refused at construction.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .base import (
    Conditioning,
    ModelSpec,
    TwoForwardGuidance,
    call_default_latent,
    cast_first_dtype,
    register_adapter,
    rope_window_hook,
    vae_tiling,
)


def canvas_rope(rope, hidden_states: torch.Tensor, origin: tuple[int, int], canvas_hw: tuple[int, int]):
    """``(cos, sin)`` for a tile at ``origin`` (latent cells) of a ``canvas_hw`` canvas: the rows of the
    table ``rope`` builds for the whole canvas, computed for the tile's positions only."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    _, _, frames, height, width = hidden_states.shape
    p, pt, device = rope.patch_size, rope.patch_size_t, hidden_states.device
    axes = (
        torch.arange(frames // pt, device=device),
        (torch.arange(height // p, device=device) + origin[0] // p) % (canvas_hw[0] // p),
        (torch.arange(width // p, device=device) + origin[1] // p) % (canvas_hw[1] // p),
    )
    grid = torch.stack(torch.meshgrid(*(a.float() for a in axes), indexing="ij"))
    freqs = [
        get_1d_rotary_pos_embed(rope.rope_dim[i], grid[i].reshape(-1), rope.theta, use_real=True) for i in range(3)
    ]
    return torch.cat([f[0] for f in freqs], dim=1), torch.cat([f[1] for f in freqs], dim=1)


def _canvas_rope_hook(rope):
    """The canvas-position hook on ``transformer.rope`` (pass-through unless a window is set)."""
    return rope_window_hook(rope, canvas_rope)


@register_adapter("HunyuanVideoTransformer3DModel")
class HunyuanVideoAdapter(TwoForwardGuidance):
    """HunyuanVideo text-to-video, guidance embedded (plus true CFG when asked)."""

    def __init__(self, pipe, positions: str = "local", max_tile_batch: int = 1):
        super().__init__(pipe, positions=positions, max_tile_batch=max_tile_batch)
        config = pipe.transformer.config
        if config.image_condition_type is not None:
            raise ValueError(
                f"HunyuanVideo image-to-video (`image_condition_type={config.image_condition_type!r}`) is not "
                "supported yet; use the text-to-video model."
            )
        s = pipe.vae_scale_factor_spatial
        self.spec = ModelSpec(
            family="hunyuan_video",
            patch=(config.patch_size_t, config.patch_size, config.patch_size),
            vae_scale=(pipe.vae_scale_factor_temporal, s),
            latent_channels=config.out_channels,
            native_latent=call_default_latent(pipe, s),
            prediction="flow",
        )
        self.step_context: dict = {}
        self._rope_hook = _canvas_rope_hook(pipe.transformer.rope) if positions == "canvas" else None

    # -- stage 1 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sketch(self, height: int, width: int, num_frames: int, **pipeline_kwargs) -> torch.Tensor:
        return self.stock_latents(height, width, num_frames, **pipeline_kwargs)

    def set_timesteps(self, scheduler, num_inference_steps: int, device=None, sketch_shape=None) -> None:
        """The pipeline's N-step schedule: explicit sigmas ``linspace(1, 0, N + 1)[:-1]`` (shifted by the
        scheduler), not the scheduler's default spacing; stage 2 must continue this very schedule."""
        import numpy as np

        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], device=device)

    # -- VAE ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def vae_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        vae = self.pipe.vae
        return latents.to(vae.dtype) / vae.config.scaling_factor, ()  # the pipeline's decode

    @torch.no_grad()
    def vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        with self.decode_tiling() as vae:
            return vae.decode(z, return_dict=False)[0]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.pipe.vae
        with vae_tiling(vae):
            dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        # A posterior sample from `generator`; without one the mode, so stage 2 stays reproducible.
        return vae.config.scaling_factor * (dist.mode() if generator is None else dist.sample(generator))

    # -- stage 2 ------------------------------------------------------------------------------------

    @torch.no_grad()
    def conditioning(self, canvas_shape: tuple[int, ...], **kw) -> Conditioning:
        pipe = self.pipe
        params = inspect.signature(pipe.__call__).parameters
        unknown = sorted(set(kw) - set(params))
        if unknown:
            raise TypeError(f"{type(pipe).__name__} takes no argument(s) {unknown}.")

        def value(name):  # the call's value, else the pipeline's own default
            return kw.get(name, params[name].default)

        def encode(prefix: str, prompt, prompt_2):
            embeds = [kw.get(f"{prefix}{name}") for name in ("prompt_embeds", "pooled_prompt_embeds")]
            mask = kw.get(f"{prefix}prompt_attention_mask")
            if (embeds[0] is None or embeds[1] is None) and (pipe.tokenizer is None or pipe.tokenizer_2 is None):
                raise ValueError(
                    f"this pipeline has no tokenizers: pass `{prefix}prompt_embeds` and `{prefix}pooled_prompt_embeds`."
                )
            if embeds[0] is not None and mask is None:
                raise ValueError(f"`{prefix}prompt_embeds` needs `{prefix}prompt_attention_mask` too.")
            out = pipe.encode_prompt(
                prompt=prompt, prompt_2=prompt_2, prompt_template=value("prompt_template"), num_videos_per_prompt=1,
                prompt_embeds=embeds[0], pooled_prompt_embeds=embeds[1], prompt_attention_mask=mask,
                device=pipe._execution_device, max_sequence_length=value("max_sequence_length"),
            )  # fmt: skip
            return {k: v.to(dtype) for k, v in zip(("embeds", "pooled", "mask"), out)}

        dtype, B = pipe.transformer.dtype, int(canvas_shape[0])
        true_cfg = float(value("true_cfg_scale"))
        embeds = {"cond": encode("", kw.get("prompt"), kw.get("prompt_2")), "uncond": None}
        if self._true_cfg(kw):
            embeds["uncond"] = encode("negative_", kw.get("negative_prompt"), kw.get("negative_prompt_2"))
        if embeds["cond"]["embeds"].shape[0] != B:
            raise ValueError(f"{embeds['cond']['embeds'].shape[0]} prompt(s) for a canvas batch of {B}.")
        guidance = torch.full((B,), float(value("guidance_scale")), device=pipe._execution_device, dtype=dtype) * 1000.0
        extra = {"guidance": guidance, "attention_kwargs": value("attention_kwargs")}
        return Conditioning(embeds, true_cfg if embeds["uncond"] is not None else 1.0, None, extra)

    def _true_cfg(self, kw: dict) -> bool:
        """As the pipeline: true CFG (a second, unconditional forward) only with a negative prompt."""
        has_negative = kw.get("negative_prompt") is not None or (
            kw.get("negative_prompt_embeds") is not None and kw.get("negative_pooled_prompt_embeds") is not None
        )
        default = inspect.signature(self.pipe.__call__).parameters["true_cfg_scale"].default
        return float(kw.get("true_cfg_scale", default)) > 1 and has_negative

    def sketch_guidance_pairs(self, pipeline_kwargs: dict) -> bool:
        return self._true_cfg(pipeline_kwargs)

    def tile_input_dtype(self, latents_dtype: torch.dtype) -> torch.dtype:
        return cast_first_dtype(self.pipe.transformer, latents_dtype)  # predict's first step is that cast

    def guidance_branches(self, cond: Conditioning) -> tuple[str, ...]:
        return ("cond", "uncond") if cond.embeds["uncond"] is not None else ()  # true CFG: two forwards

    @torch.no_grad()
    def _predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branches) -> torch.Tensor:
        origins = torch.as_tensor(origins, dtype=torch.int64)
        n_tiles = origins.shape[0]
        batch = cond.extra["guidance"].shape[0]
        if tiles.dim() != 5 or tiles.shape[0] != n_tiles * batch:
            raise ValueError(f"`tiles` {tuple(tiles.shape)} must be ({n_tiles} tiles * batch {batch}, C, T, h, w).")
        group = 1 if self._rope_hook is not None else self.max_tile_batch  # one rotary table per forward
        context = {k: v for k, v in self.step_context.items() if v is not None}
        outputs = []
        for start in range(0, n_tiles, group):
            stop = min(start + group, n_tiles)
            n, x = stop - start, tiles[start * batch : stop * batch]
            name = f"tile{start}" if n == 1 else f"tiles{start}-{stop - 1}"
            with self._positions(origins[start], canvas_hw):
                out = {b: self._forward(b, name, x, n, timestep, cond, context) for b in branches}
            outputs.append(self.guide(out, cond, timestep) if len(branches) == 2 else out[branches[0]])
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _forward(self, branch: str, name: str, x, n: int, timestep, cond: Conditioning, context: dict):
        """One forward of ``n`` tiles for one guidance branch, as the pipeline calls the transformer."""
        transformer, text = self.pipe.transformer, cond.embeds[branch]
        with transformer.cache_context(f"{branch}/{name}", **context):
            return transformer(
                hidden_states=x.to(transformer.dtype),
                timestep=torch.as_tensor(timestep, device=x.device).expand(x.shape[0]).to(x.dtype),
                encoder_hidden_states=text["embeds"].repeat(n, 1, 1),
                encoder_attention_mask=text["mask"].repeat(n, 1),
                pooled_projections=text["pooled"].repeat(n, 1),
                guidance=cond.extra["guidance"].repeat(n),
                attention_kwargs=cond.extra["attention_kwargs"],
                return_dict=False,
            )[0]

    @contextlib.contextmanager
    def _positions(self, origin: torch.Tensor, canvas_hw):
        if self._rope_hook is None:
            yield
            return
        self._rope_hook.window = ((int(origin[0]), int(origin[1])), tuple(int(v) for v in canvas_hw))
        try:
            yield
        finally:
            self._rope_hook.window = None
