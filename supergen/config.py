"""Validated configuration dataclasses. Every field is checked at construction, so a bad value fails
before any model work with a message naming the field, the value and what would be valid."""

from __future__ import annotations

import math
from dataclasses import dataclass

BOUNDARIES = ("torus", "clamp")
RAMPS = ("linear", "cosine")


def as_pair(name: str, value, minimum: int, allow_none: bool = False) -> tuple[int, int] | None:
    """``value`` as an ``(int, int)`` pair (an int means both axes), each ``>= minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"`{name}` must be an int or a pair of ints but is {value!r}.")
    if min(pair) < minimum:
        raise ValueError(f"`{name}` must be >= {minimum} on both axes but is {pair}.")
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class TilingConfig:
    """How stage 2 cuts the canvas into native-size tiles.

    Attributes:
        tile: tile size ``(h, w)`` in latent cells; ``None`` = the model's native latent size.
        overlap: cells by which neighbouring tiles overlap (blended with ``ramp``); 0 = none.
        boundary: ``torus`` (windows wrap around the canvas, every tile full size) or ``clamp``
            (windows stay inside the canvas; edge tiles move inward).
        shift: move the grid between refinement steps so tile edges never stay in one place.
        shift_every: move the grid every this many refinement steps.
        shift_period: the longest cycle (in shift events) an axis may take to sweep its tile once;
            each axis picks its own step, a divisor of its tile size, so that every band is crossed.
            The default 16 is the published cadence (3-5 patches per step on 720p tiles); the number
            of refined steps gives the slowest drift that still sweeps every tile once over the run
            (1-2 patches per step), which under tile parallelism lets regions follow the grid for
            fewer bytes (on 720p tiles with UniPC in fp32, a third to two fifths of the default
            grid's: ``bench/parallel.py``).
        ramp: blend ramp for overlapping tiles, ``linear`` or ``cosine``.
    """

    tile: tuple[int, int] | None = None
    overlap: int | tuple[int, int] = 0
    boundary: str = "torus"
    shift: bool = True
    shift_every: int = 1
    shift_period: int = 16
    ramp: str = "linear"

    def __post_init__(self):
        object.__setattr__(self, "tile", as_pair("tile", self.tile, 1, allow_none=True))
        object.__setattr__(self, "overlap", as_pair("overlap", self.overlap, 0))
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"`boundary` must be one of {BOUNDARIES} but is {self.boundary!r}.")
        if not isinstance(self.shift, bool):
            raise ValueError(f"`shift` must be a bool but is {self.shift!r}.")
        for name in ("shift_every", "shift_period"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1 but is {value!r}.")
        if self.ramp not in RAMPS:
            raise ValueError(f"`ramp` must be one of {RAMPS} but is {self.ramp!r}.")


PARALLEL_BACKENDS = ("auto", "gloo", "nccl")
PARALLEL_REGIONS = ("auto", "fixed", "follow")
#: Stage 1 under tile parallelism with diffusers' context parallelism (``ParallelConfig.sketch_context``).
SKETCH_CONTEXT = (None, "ulysses", "ring")


@dataclass(frozen=True)
class ParallelConfig:
    """Tile parallelism across processes (:mod:`supergen.parallel`), launched with ``torchrun``.

    The world size and rank come from the launcher's environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); with one process no process group is created.

    Attributes:
        backend: ``gloo`` (CPU tensors), ``nccl`` (CUDA tensors) or ``auto`` (``nccl`` when the
            pipeline runs on CUDA, else ``gloo``).
        timeout: seconds any collective or point-to-point transfer may wait before it fails; a rank
            that dies or raises makes every other rank fail (exit non-zero) after at most this long
            instead of hanging. Ranks waiting for the sketch follow its forwards, so a sketch may take
            longer than this; one forward (or the time from one to the next) may not.
        rebalance: assign each step's computed tiles to ranks by predicted cost (longest processing
            time first, preferring each rank's own tiles); ``False`` = every tile on its home rank.
        fill_idle: with the tile cache (``gate``/``budget``), a step lasts as long as its busiest rank's
            forwards, so ranks with fewer tiles would wait: they compute the skipped tiles the cache
            predicts to change most instead (their own tiles first), up to the busiest rank's count.
            The step takes no longer and reuses less. ``False``: exactly the single-process decisions
            (the final latent then equals the one-process run's).
        regions: ``auto`` (default): whichever of the two below makes the busiest rank send fewer bytes
            over this run, counted before the loop with the run's dtypes and state (the scheduler's
            multistep history measured on a one-cell copy, the tile cache's per-cell state; with the
            tile cache on seeded random skip patterns at its budget, since the real skips are learnt
            during the run, so it can misjudge). On 720p-size tiles that is in practice ``follow``
            without the cache (UniPC too: its latents are rebuilt from its history, which is what
            moves) and mostly ``fixed`` with it; on overlapping 480p tiles ``fixed`` for UniPC with a
            bf16 model (``bench/parallel.py`` lists each pick). ``fixed``: each
            rank keeps one region for the whole run (of a few balanced partitions, the one whose halos
            are fewest over the run), and tiles that the
            shifted grid moves across a region boundary take their input halo from, and send their
            predictions back to, the neighbour; no scheduler or cache state ever moves.
            ``follow``: regions move with the grid so that no shifted tile straddles a boundary, and
            each step the strip that changes owner carries its latents, the scheduler's multistep
            history and the cache's state along. ``fixed`` moves fewer bytes wherever that state is
            larger than the halos: a half-precision model (predictions and halos travel in its dtype,
            the state in fp32), a multistep scheduler or the tile cache (``bench/parallel.py`` counts
            both); ``follow`` wins for a history-free scheduler or a slowly drifting grid.
        split_guidance: with classifier-free guidance run as two forwards per tile (the Wan and
            HunyuanVideo adapters, CogVideoX and LTX-Video with their ``separate_guidance`` option:
            ``ModelAdapter.guidance_branches``; or the halves of CogVideoX's and LTX-Video's batched
            forward where they are exact, :func:`supergen.parallel.exact_guidance_halves`), a step's
            busiest rank may hand
            the unconditional forward of a tile to an idle rank, which sends that output back (one
            tile in the model's dtype) for the computer to combine: same result, and a step of ``C``
            tiles on ``R`` ranks takes ``ceil(2 C / R)`` forwards instead of ``2 ceil(C / R)`` (4 tiles
            on 8 ranks: half the time). Only where it shortens the step; needs ``rebalance``. Stage 1
            too: ranks 0 and 1 run the stock pipeline together, one guidance forward each per step
            (``ModelAdapter.sketch_guidance_pairs``; half the sketch's forwards per rank, the same
            latent), or, where the pipeline batches both branches in one call (CogVideoX, LTX-Video:
            ``ModelAdapter.sketch_guidance_batched``), half the batch each where a half is exactly a
            slice of the whole call (probed on the first call). ``False``: whole tiles, and stage 1 on
            rank 0 alone.
        sketch_context: ``None`` (default) or ``"ulysses"`` / ``"ring"``: stage 1 runs on every rank, each
            forward of the transformer split along its token sequence with diffusers' context parallelism
            (``ContextParallelConfig(ulysses_degree=D)`` or ``ring_degree=D``), instead of on rank 0 (and rank 1
            with ``split_guidance``) while the others wait. Where the pipeline guides with two calls per step
            and ``split_guidance`` is on, an even number of ranks splits in two halves, each computing one call
            of every pair over its ``D=R/2`` ranks (at 2 ranks: the guidance split alone); otherwise ``D=R``.
            Needs a transformer with a context-parallel plan (diffusers: Wan, LTX-Video; LTX-Video's masked
            cross-attention fails diffusers' Ulysses up to 0.42.1, so there ring only), a token count of every
            sketch size divisible by D, with ``"ulysses"`` a head count divisible by it, with ``"ring"`` an
            attention backend that returns the log-sum-exp (flash on a GPU, or supergen's kernel on any device:
            :func:`supergen.attention.enable_masked_attention`), and an accelerator per rank;
            checked before any model work. The sketch's latent equals the one-process sketch's only where the
            kernels give a token the same bits in a shard as in the whole sequence (so on the CPU in the tests
            with Ulysses, not necessarily on a GPU; ring attention merges the shards' partial outputs, which
            rounds differently); rank 0's is the one every rank goes on with.
    """

    backend: str = "auto"
    timeout: float = 600.0
    rebalance: bool = True
    fill_idle: bool = True
    regions: str = "auto"
    split_guidance: bool = True
    sketch_context: str | None = None

    def __post_init__(self):
        if self.backend not in PARALLEL_BACKENDS:
            raise ValueError(f"`backend` must be one of {PARALLEL_BACKENDS} but is {self.backend!r}.")
        if not (isinstance(self.timeout, int | float) and not isinstance(self.timeout, bool) and self.timeout > 0):
            raise ValueError(f"`timeout` must be a number of seconds > 0 but is {self.timeout!r}.")
        if self.regions not in PARALLEL_REGIONS:
            raise ValueError(f"`regions` must be one of {PARALLEL_REGIONS} but is {self.regions!r}.")
        if self.sketch_context not in SKETCH_CONTEXT:
            raise ValueError(f"`sketch_context` must be one of {SKETCH_CONTEXT} but is {self.sketch_context!r}.")
        for name in ("rebalance", "fill_idle", "split_guidance"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool but is {getattr(self, name)!r}.")


@dataclass(frozen=True)
class ReshiftConfig:
    """Noise reshifting of the sketch (stage 1, after SURF's preview stage): the layout is decided at the
    native size, the rest of the sketch is generated at a lower size.

    The stock pipeline runs the first ``native_steps`` of the N steps at the native size; the model's
    clean estimate at that step is area-averaged down by ``scale`` per side (latent cells, rounded to the
    model's patch), re-noised to the same step with fresh noise, and the remaining ``N - native_steps``
    steps denoise it at that size. Stage 2 upscales this smaller sketch like any other.

    Attributes:
        native_steps: steps run at the native size, in ``[1, N)`` (checked against N per call).
        scale: the lower size per side as a fraction of the native size, in ``(0, 1)``.
    """

    native_steps: int
    scale: float = 0.5

    def __post_init__(self):
        if not isinstance(self.native_steps, int) or isinstance(self.native_steps, bool) or self.native_steps < 1:
            raise ValueError(f"`native_steps` must be an int >= 1 but is {self.native_steps!r}.")
        ok = isinstance(self.scale, int | float) and not isinstance(self.scale, bool) and 0 < self.scale < 1
        if not ok:
            raise ValueError(f"`scale` must be a number in (0, 1) but is {self.scale!r}.")


#: Share of the N steps that stage 2 refines when the caller gives no ``refine_steps`` (the Wan port of
#: the method uses 0.7); a model folder's ``supergen.json`` may set its own ``refine_fraction``.
REFINE_FRACTION = 0.7


def default_refine_steps(num_inference_steps: int, fraction: float = REFINE_FRACTION) -> int:
    """k, the last k of N steps refined: ``round(fraction * N)``, at least 1."""
    return max(1, round(fraction * num_inference_steps))


def check_guidance(name: str, value) -> float:
    """A guidance scale, as a pipeline's ``guidance_scale``: a finite number >= 0; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 but is {value!r}.")
    return float(value)
