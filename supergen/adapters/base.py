"""The small protocol every model family implements, and the registry that picks an adapter.

An adapter owns every quirk of one model family so that ``stages.py`` never branches on the model:
the latent layout (supergen works in ``(B, C, T, H, W)``; CogVideoX's transformer wants
``(B, T, C, H, W)``), patch multiples, text/negative embeddings, classifier-free guidance (batched or
two calls), image conditioning built at canvas size and cropped with each tile's window, and the
positions each tile sees (``local``: the model's own; ``canvas``: the tile's absolute place on the
canvas, so objects are not repeated per tile).

Adding a family (as HunyuanVideo and LTX-Video were) is one new file: subclass :class:`ModelAdapter`,
fill in :class:`ModelSpec`, implement the abstract methods and decorate the class with
:func:`register_adapter` naming the transformer classes it serves. A family whose pipeline runs
guidance as two forwards per tile subclasses :class:`TwoForwardGuidance` instead and implements one
``_predict`` over named forwards, which also lets tile parallelism run a tile's two forwards on two
ranks.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

POSITIONS = ("local", "canvas")


@dataclass(frozen=True)
class ModelSpec:
    """Facts about one model that the orchestrator needs.

    Attributes:
        family: short name, e.g. ``"wan"``, ``"cogvideox"``.
        patch: ``(pt, ph, pw)`` latent cells per token; tile sizes and origins are multiples of it.
        vae_scale: ``(temporal, spatial)`` pixels per latent cell.
        latent_channels: channels of the (denoised) latent.
        native_latent: ``(h, w)`` latent size the model was trained at: the default tile size.
        prediction: what the transformer predicts: ``"flow"`` (velocity), ``"v"`` or ``"epsilon"``.
    """

    family: str
    patch: tuple[int, int, int]
    vae_scale: tuple[int, int]
    latent_channels: int
    native_latent: tuple[int, int]
    prediction: str

    def pixel_multiple(self) -> int:
        """Target heights/widths in pixels must be multiples of this (VAE stride × patch)."""
        return self.vae_scale[1] * max(self.patch[1], self.patch[2])

    def valid_frames(self, frames: int) -> bool:
        """Whether a clip of ``frames`` pixel frames maps onto whole latent frames (causal VAEs: 4k+1)."""
        return frames >= 1 and (frames - 1) % self.vae_scale[0] == 0


@dataclass
class Conditioning:
    """Everything a tile forward needs besides its noisy latent, built once per generation.

    Attributes:
        embeds: adapter-specific text conditioning (per guidance branch).
        guidance_scale: classifier-free guidance scale (``<= 1`` means one branch only).
        canvas_extra: optional canvas-size tensor in ``(B, C', T, H, W)`` (e.g. the encoded first
            frame and mask of image-to-video), cropped per tile with the tile's window.
        extra: adapter-specific values (e.g. ``ofs`` for CogVideoX 1.5).
    """

    embeds: Any
    guidance_scale: float
    canvas_extra: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class ModelAdapter(ABC):
    """Wraps one diffusers pipeline of a known family. Subclasses set :attr:`spec` in ``__init__``."""

    spec: ModelSpec

    def __init__(self, pipe, positions: str = "local", max_tile_batch: int = 1):
        if positions not in POSITIONS:
            raise ValueError(f"`positions` must be one of {POSITIONS} but is {positions!r}.")
        if not isinstance(max_tile_batch, int) or max_tile_batch < 1:
            raise ValueError(f"`max_tile_batch` must be an int >= 1 but is {max_tile_batch!r}.")
        self.pipe = pipe
        self.positions = positions
        self.max_tile_batch = max_tile_batch

    # -- stage 1 ------------------------------------------------------------------------------------

    @abstractmethod
    def sketch(self, height: int, width: int, num_frames: int, **pipeline_kwargs) -> torch.Tensor:
        """Run the stock pipeline at ``height x width`` and return its final latent ``(B, C, T, h, w)``
        (normalised as the pipeline's denoiser sees it)."""

    def stock_latents(self, height: int, width: int, num_frames: int, **pipeline_kwargs):
        """The stock pipeline at ``height x width``, its final latent as it returns it with
        ``output_type="latent"`` (which, like ``return_dict``, the caller may not set)."""
        for key in ("output_type", "return_dict"):
            if key in pipeline_kwargs:
                raise TypeError(f"`{key}` is set by supergen's sketch and cannot be passed.")
        kwargs = dict(height=height, width=width, num_frames=num_frames, output_type="latent", return_dict=False)
        return self.pipe(**kwargs, **pipeline_kwargs)[0]

    # -- VAE ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent ``(B, C, T, H, W)`` → pixels ``(B, 3, F, H*s, W*s)`` in [-1, 1] (tiled VAE):
        :meth:`vae_inputs`, then :meth:`vae_decode`."""
        z, args = self.vae_inputs(latents)
        return self.vae_decode(z, *args)

    @abstractmethod
    def vae_inputs(self, latents: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """What the pipeline does to the whole latent before ``vae.decode``: the decoder's input ``z``
        (denormalised, the same shape) and the decode's extra arguments. Everything here is over the whole
        canvas (an LTX-Video decoder's noise is drawn here), so :meth:`vae_decode` sees no randomness and
        tile parallelism may decode bands of ``z`` on several ranks (:func:`supergen.parallel.decode_in_blocks`)."""

    @abstractmethod
    def vae_decode(self, z: torch.Tensor, *args) -> torch.Tensor:
        """``vae.decode`` of :meth:`vae_inputs`' output, tiled as :meth:`decode_tiling` sets it."""

    def decode_tiling(self):
        """The context the VAE decodes in: its own tiling switched on (restored after)."""
        return vae_tiling(self.pipe.vae)

    def vae_tile_geometry(self) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """``((tile, stride), (tile, stride))``: the latent rows and columns of the tiles the VAE decodes
        in, and how far apart they start (diffusers' tiled decoders start a tile every ``stride`` cells from
        0 and blend each with the one above and the one to its left); ``None`` where this VAE's are unknown."""
        vae, scale = self.pipe.vae, self.spec.vae_scale[1]
        with self.decode_tiling():
            if hasattr(vae, "tile_sample_stride_height"):  # Wan, HunyuanVideo, LTX-Video
                return tuple(
                    (getattr(vae, f"tile_sample_min_{a}") // scale, getattr(vae, f"tile_sample_stride_{a}") // scale)
                    for a in ("height", "width")
                )
            if hasattr(vae, "tile_overlap_factor_height"):  # CogVideoX: a tile and an overlap factor
                tiles = (vae.tile_latent_min_height, vae.tile_latent_min_width)
                factors = (vae.tile_overlap_factor_height, vae.tile_overlap_factor_width)
                return tuple((t, int(t * (1 - f))) for t, f in zip(tiles, factors))
        return None

    @abstractmethod
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] → normalised latent ``(B, C, T, H/s, W/s)`` (tiled VAE)."""

    # -- stage 2 ------------------------------------------------------------------------------------

    def begin_step(self, step_index: int, timestep: torch.Tensor, sigma: float | None, num_steps: int) -> None:
        """Called by the refine loop before each step's predictions.

        diffusers' stateful caches read ``step_index``/``sigma``/``num_inference_steps`` from the cache
        context a pipeline opens around each forward (SeaCache needs them); ``predict`` has no step
        argument, so adapters that open such contexts read :attr:`step_context`.
        """
        self.step_context = {"step_index": step_index, "sigma": sigma, "num_inference_steps": num_steps}

    def denoiser_index(self, timestep) -> int:
        """Which of the pipeline's denoisers predicts at ``timestep``: 0, the only one, except in pipelines
        that switch models along the schedule (Wan 2.2's two experts). A tile cache's gains and residuals
        do not carry across a switch (:meth:`supergen.cache.TileCache.set_denoiser`)."""
        return 0

    def set_timesteps(self, scheduler, num_inference_steps: int, device=None, sketch_shape=None) -> None:
        """Give ``scheduler`` the N-step schedule the family's pipeline uses (stage 2 continues it).

        The default is the scheduler's own spacing; pipelines that pass explicit sigmas override it.
        ``sketch_shape``: the sketch's latent ``(T, h, w)``, for families whose pipeline shifts the
        schedule by the sequence length it generates (LTX-Video).
        """
        scheduler.set_timesteps(num_inference_steps, device=device)

    def scheduler_step(self, scheduler, noise_pred, t, latents, *, step_index: int, state: dict, generator=None):
        """One scheduler update of the whole canvas (``(B, C, T, H, W)``), as the family's pipeline steps.

        The default is the common ``scheduler.step(noise_pred, t, latents)``; families whose pipelines
        step differently (CogVideoX's DPM carries the previous ``x0`` in ``state``, a dict the refine
        loop creates empty per generation) override it. ``step_index`` is ``t``'s index in
        ``scheduler.timesteps``.
        """
        return scheduler.step(noise_pred, t, latents, return_dict=False)[0]

    @abstractmethod
    def conditioning(self, canvas_shape: tuple[int, ...], **pipeline_kwargs) -> Conditioning:
        """Encode prompts (or take ``prompt_embeds``) and build canvas-size conditioning once."""

    def prediction_dtype(self, latents_dtype: torch.dtype) -> torch.dtype:
        """The dtype :meth:`predict` returns with latents in ``latents_dtype`` (tile parallelism sends
        predictions and blends them in it, as the one process blends what ``predict`` returns). The
        default is the transformer's dtype, for adapters that return the model's output as it comes
        (Wan, HunyuanVideo: guidance in the model's dtype, as their pipelines do); adapters that
        upcast it first (CogVideoX, LTX-Video: guidance in fp32, as theirs do) return ``float32``."""
        return getattr(self.pipe.transformer, "dtype", latents_dtype)

    def tile_input_dtype(self, latents_dtype: torch.dtype) -> torch.dtype:
        """A dtype ``tiles`` may be rounded to before :meth:`predict` without changing its result (tile
        parallelism sends input halos in it). The default keeps ``latents_dtype``; an adapter whose
        ``predict`` casts the tiles to the transformer's dtype before any other arithmetic returns
        :func:`cast_first_dtype` (rounding to a dtype twice is rounding once)."""
        return latents_dtype

    @abstractmethod
    def predict(
        self,
        tiles: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        origins: torch.Tensor,
        canvas_hw: tuple[int, int],
    ) -> torch.Tensor:
        """Guided model prediction for tile-major ``tiles`` ``(N * B, C, T, h, w)`` at ``timestep``.

        ``origins`` ``(N, 2)`` are the tiles' canvas places (for cropping ``cond.canvas_extra`` and
        for ``canvas`` positions). Returns the prediction in the same layout, guidance applied, in the
        scheduler's prediction space, computing at most :attr:`max_tile_batch` tiles per forward.
        """

    # -- guidance split (tile parallelism) -----------------------------------------------------------

    def guidance_branches(self, cond: Conditioning) -> tuple[str, ...]:
        """The separate forwards :meth:`predict` combines for ``cond`` (classifier-free guidance:
        ``("cond", "uncond")``), which tile parallelism may run on two ranks: :meth:`predict_branch` on
        each, then :meth:`guide` (the same forwards and the same arithmetic as ``predict``, so the same
        result). ``()``, the default: ``predict`` is one forward per tile (unguided, guidance embedded,
        or both branches batched into one forward as the CogVideoX and LTX-Video pipelines do)."""
        return ()

    def batches_guidance(self, cond: Conditioning) -> bool:
        """Whether :meth:`predict` runs both guidance branches for ``cond`` batched in one forward, which
        the adapter option ``separate_guidance=True`` turns into two forwards that tile parallelism may
        run on two ranks (CogVideoX, LTX-Video). ``False``, the default."""
        return False

    def sketch_guidance_pairs(self, pipeline_kwargs: dict) -> bool:
        """Whether the stock pipeline, called with ``pipeline_kwargs`` (the sketch's, ``guidance_scale``
        included), runs guidance as two calls of its transformer per step, conditional then
        unconditional on the same latent input, which tile parallelism may run on two ranks
        (:class:`supergen.parallel.SketchGuidanceSplit`). ``False``, the default: one call per step."""
        return False

    def sketch_guidance_batched(self, pipeline_kwargs: dict) -> bool:
        """Whether the stock pipeline, called with ``pipeline_kwargs``, runs guidance as one call of its
        transformer per step on a batch of both branches, which tile parallelism may cut in two across
        ranks where that is exact (:class:`supergen.parallel.SketchBatchSplit`). ``False``, the default."""
        return False

    def predict_branch(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branch: str) -> torch.Tensor:
        """The output of forward ``branch`` (one of :meth:`guidance_branches`) for ``tiles``, as
        :meth:`predict` computes it before combining."""
        raise NotImplementedError(f"{type(self).__name__} runs guidance in one forward; it has no `{branch}` branch.")

    def guide(self, outputs: dict, cond: Conditioning, timestep) -> torch.Tensor:
        """:meth:`predict`'s result at ``timestep`` from its branches' outputs (``{branch: output}``,
        each shaped as :meth:`predict_branch` returns it or with its cells flattened: the arithmetic is
        per sample)."""
        raise NotImplementedError(f"{type(self).__name__} runs guidance in one forward.")


class TwoForwardGuidance(ModelAdapter):
    """An adapter whose pipeline runs classifier-free guidance as two forwards per tile (conditional,
    unconditional) combined as ``uncond + scale * (cond - uncond)`` (Wan, HunyuanVideo's true CFG): one
    ``_predict`` runs the named forwards, so :meth:`predict` and :meth:`predict_branch` + :meth:`guide`
    (tile parallelism's guidance split) are the same forwards and the same arithmetic."""

    @abstractmethod
    def _predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branches) -> torch.Tensor:
        """The forwards ``branches`` (names of :meth:`guidance_branches`, or ``("cond",)`` unguided) of every
        tile, combined by :meth:`guide` when both run."""

    def predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw) -> torch.Tensor:
        return self._predict(tiles, timestep, cond, origins, canvas_hw, self.guidance_branches(cond) or ("cond",))

    def predict_branch(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branch: str) -> torch.Tensor:
        if branch not in self.guidance_branches(cond):
            raise ValueError(f"`branch` must be one of {self.guidance_branches(cond)} but is {branch!r}.")
        return self._predict(tiles, timestep, cond, origins, canvas_hw, (branch,))

    def guidance_scale_at(self, cond: Conditioning, timestep=None) -> float:
        """The scale :meth:`guide` applies at ``timestep``: ``cond.guidance_scale``, unless the pipeline
        guides its models differently along the schedule (Wan 2.2's second expert)."""
        return cond.guidance_scale

    def guide(self, outputs: dict, cond: Conditioning, timestep=None) -> torch.Tensor:
        # The pipelines' expression (and rounding): WanPipeline's and HunyuanVideoPipeline's true CFG.
        uncond = outputs["uncond"]
        return uncond + self.guidance_scale_at(cond, timestep) * (outputs["cond"] - uncond)


class BatchedGuidance(ModelAdapter):
    """An adapter whose pipeline runs classifier-free guidance as one forward of both branches batched,
    upcasting the output to fp32 before combining them (CogVideoX, LTX-Video). With
    ``separate_guidance`` (set by the subclass's constructor) :meth:`predict` runs the branches as two
    forwards instead, exactly :meth:`predict_branch` of each and :meth:`guide`, which tile parallelism
    may run on two ranks."""

    separate_guidance: bool = False

    @abstractmethod
    def _guided(self, cond: Conditioning) -> bool:
        """Whether ``cond`` asks for classifier-free guidance (two branches)."""

    @abstractmethod
    def _predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branch: str | None) -> torch.Tensor:
        """``branch=None``: the prediction, guidance batched in one forward as the pipeline runs it; else
        that guidance branch's forward alone, its output in the model's dtype."""

    def prediction_dtype(self, latents_dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # the model's output is upcast before guidance, as the pipelines do

    def sketch_guidance_batched(self, pipeline_kwargs: dict) -> bool:
        import inspect

        default = inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default
        return float(pipeline_kwargs.get("guidance_scale", default)) > 1.0  # the pipelines' CFG condition

    def batches_guidance(self, cond: Conditioning) -> bool:
        return self._guided(cond) and not self.separate_guidance

    def guidance_branches(self, cond: Conditioning) -> tuple[str, ...]:
        return ("cond", "uncond") if self._guided(cond) and self.separate_guidance else ()

    def predict(self, tiles, timestep, cond: Conditioning, origins, canvas_hw) -> torch.Tensor:
        branches = self.guidance_branches(cond)
        if branches:  # separate_guidance: exactly what tile parallelism computes on two ranks
            outputs = {b: self._predict(tiles, timestep, cond, origins, canvas_hw, b) for b in branches}
            return self.guide(outputs, cond, timestep)
        return self._predict(tiles, timestep, cond, origins, canvas_hw, None)

    def predict_branch(self, tiles, timestep, cond: Conditioning, origins, canvas_hw, branch: str) -> torch.Tensor:
        """A guidance branch's forward alone, with or without ``separate_guidance`` (tile parallelism
        may run a batched prediction as its two halves where that is exact:
        :func:`supergen.parallel.exact_guidance_halves`)."""
        branches = ("cond", "uncond") if self._guided(cond) else ()
        if branch not in branches:
            raise ValueError(f"`branch` must be one of {branches} but is {branch!r}.")
        return self._predict(tiles, timestep, cond, origins, canvas_hw, branch)


def denoisers(pipe) -> list:
    """The pipeline's denoising models: ``transformer`` and, in two-expert pipelines (Wan 2.2), ``transformer_2``."""
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def call_default_latent(pipe, spatial_scale: int) -> tuple[int, int]:
    """The pipeline's default ``height``/``width`` in latent cells: the size its model is made for (the
    native tile of families whose pipelines say it only there)."""
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    return params["height"].default // spatial_scale, params["width"].default // spatial_scale


def cast_first_dtype(transformer, latents_dtype: torch.dtype) -> torch.dtype:
    """``transformer.dtype`` where it is a narrower float than ``latents_dtype`` (a bf16/fp16 model
    with fp32 latents), else ``latents_dtype``: what :meth:`ModelAdapter.tile_input_dtype` returns for
    adapters whose ``predict`` starts with ``tiles.to(transformer.dtype)``."""
    model_dtype = getattr(transformer, "dtype", latents_dtype)
    if model_dtype.is_floating_point and latents_dtype.is_floating_point:
        if torch.finfo(model_dtype).bits < torch.finfo(latents_dtype).bits:
            return model_dtype
    return latents_dtype


@contextlib.contextmanager
def vae_tiling(vae):
    """Tiled VAE encode/decode inside the block (memory bounded at any canvas); restores the user's setting."""
    was_tiling = bool(getattr(vae, "use_tiling", False))
    vae.enable_tiling()
    try:
        yield vae
    finally:
        if not was_tiling:
            vae.disable_tiling()


_ROPE_HOOK = "supergen_canvas_rope"


def rope_window_hook(rope, canvas_rope: Callable):
    """The (idempotent) hook on a model's rotary module ``rope`` for canvas positions.

    It passes through to the stock module unless its ``window`` is set, in which case it returns
    ``canvas_rope(module, hidden_states, *window)``: the family's tables for the tiles' canvas places.
    Adapters set ``hook.window`` around their forwards and reset it to ``None`` after.
    """
    from diffusers.hooks import HookRegistry, ModelHook

    class CanvasRopeHook(ModelHook):
        def __init__(self):
            super().__init__()
            self.window = None

        def new_forward(self, module, hidden_states):
            if self.window is None:  # outside supergen's refine loop the model behaves as stock
                return self.fn_ref.original_forward(hidden_states)
            return canvas_rope(module, hidden_states, *self.window)

    registry = HookRegistry.check_if_exists_or_initialize(rope)
    hook = registry.get_hook(_ROPE_HOOK)
    if hook is None:
        hook = CanvasRopeHook()
        registry.register_hook(hook, _ROPE_HOOK)
    return hook


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register_adapter(*transformer_class_names: str):
    """Class decorator: serve pipelines whose ``transformer`` is one of these class names."""

    def wrap(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for name in transformer_class_names:
            _REGISTRY[name] = cls
        return cls

    return wrap


def supported_transformers() -> tuple[str, ...]:
    _import_builtin_adapters()
    return tuple(sorted(_REGISTRY))


def _import_builtin_adapters() -> None:
    import importlib

    for module in ("wan", "cogvideox", "hunyuan_video", "ltx_video"):
        try:
            importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module}":
                raise


def adapter_for(pipe, **kwargs) -> ModelAdapter:
    """The adapter for ``pipe``, chosen by its transformer's class; ``ValueError`` names the supported ones."""
    _import_builtin_adapters()
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__ if transformer is not None else None
    if name not in _REGISTRY:
        raise ValueError(
            f"unsupported model: pipeline {type(pipe).__name__} with transformer {name}; supported "
            f"transformers: {', '.join(sorted(_REGISTRY)) or 'none registered'}."
        )
    return _REGISTRY[name](pipe, **kwargs)
