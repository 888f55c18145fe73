"""Tile parallelism across processes: region ownership, point-to-point halo exchange, rebalancing.

Launched with ``torchrun`` (``WORLD_SIZE`` > 1): rank 0 runs the sketch and broadcasts it with the state
of the random generator it drew from (:func:`share_sketch`); every rank then upscales and re-noises it
itself (same input, same seed; a checksum confirms the canvases agree, else rank 0's is broadcast:
:func:`agree_on_canvas`), and the ranks share stage 2. With one process nothing here runs and no
process group is created.

Design (why it is shaped this way)
----------------------------------
* **A region is a set of canvas cells, held flat.** Each rank owns the cells whose *home tile* (the
  covering tile with the nearest centre) is one of its home tiles, and the home tiles of the ranks are
  contiguous runs of the step's tiles in row-major order, balanced by tile count (sizes differ by at
  most one). A rank keeps its region as a ``(B, C, T, 1, K)`` tensor of its ``K`` cells in canvas
  row-major order. The scheduler update is elementwise, so each rank's own scheduler steps this
  tensor: multistep history (UniPC's ``model_outputs``/``last_sample``, CogVideoX's DPM ``x0``, a Step
  Rehash residual) is region-shaped and stays local. A flat region accepts any shape — bands, the
  staircase of a tile run that ends mid-row, overlapping and clamped windows — with one indexing
  rule, which is what lets every grid mode and every rank count share one code path.
* **Two region policies, and the default counts which to use.** ``ParallelConfig.regions="auto"``
  counts both below over the run before the loop (:func:`choose_regions`), with the run's dtypes and
  the state that would migrate (the scheduler's history measured on a one-cell copy,
  :func:`probe_scheduler`; the caches' state), and takes the one whose busiest rank sends less.
  With the tile cache it counts seeded random skip patterns at the cache's budget
  (:func:`random_skips`): the real skips are learnt only as the run goes, and the computed tiles
  that rebalancing moves between ranks weigh as much as the halos or the migration.
* **Fixed regions (``regions="fixed"``) stay where they are.** Each rank keeps one region for the whole
  run, chosen before the loop among a few balanced partitions (runs of home tiles, bands, blocks:
  :func:`fixed_owner`) as the one whose counted halos are fewest over the run's grid placements; a
  tile the shifted grid moves across a boundary is computed by the rank owning most of it, with the
  rest of its window as halo. Nothing else moves: the scheduler's multistep history, a Step Rehash
  residual and the tile cache's state stay on their rank for the whole run. ``regions="follow"`` is
  the alternative: home tiles move with the grid, so each step the region moves by the shift and a
  rank hands its neighbour one shift-wide strip per boundary, carrying the latents and every
  region-shaped scheduler/cache tensor (found generically); on the torus the run of home tiles is
  rotated to move the fewest cells. Where the latents a step returns are a function of the history
  the scheduler keeps (UniPC: its predictor applied to ``last_sample`` and ``model_outputs``; checked
  on a one-cell probe, :func:`probe_scheduler`), they do not travel: the receiver rebuilds
  them with the scheduler's own arithmetic. Which moves fewer bytes is arithmetic (``bench/parallel.py``
  counts both): a fixed boundary is straddled by a quarter tile on average, for which the halo and
  the predictions cross it, in the model's dtype; a following boundary moves by the shift, for which
  every state tensor crosses it in fp32 (3 with UniPC, 1 with Euler, plus the tile cache's). So a
  slow drift, aligned tiles and a history-free scheduler favour ``follow``; overlapping windows, a
  bf16 model (its halos are half the size, the state is not) and the tile cache favour ``fixed``.
* **Halos travel in the model's dtype** where the adapter's ``predict`` casts its tiles to the model's
  dtype before any arithmetic (``ModelAdapter.tile_input_dtype``: the Wan, HunyuanVideo and LTX-Video adapters),
  since rounding twice to a dtype is rounding once: a bf16 model reads the same input for half the
  bytes. Predictions travel in the model's output dtype; region state in its own (fp32).
* **Per step, only halos move.** A tile whose window leaves its computing rank's region receives those
  cells from their owners (``batch_isend_irecv``), and its predictions for cells owned by other ranks
  go back to them the same way, per tile, so the owner blends every cell in tile order with the same
  fp32 arithmetic as :func:`supergen.reference.blend_scatter`. No rank ever holds another rank's
  predictions for its own cells, and nothing canvas-sized is all-gathered inside the loop.
* **Rebalancing** (:func:`assign_tiles`): tiles the cache skips cost nothing (their owners rebuild the
  reused prediction from their own cells, no forward, no bytes); computed tiles are assigned longest
  first, each rank keeping its own tiles up to its fair share, the rest going to the least-loaded rank
  and, among equally loaded ranks, to the one that moves the fewest bytes.
* **Guidance split** (:func:`assign_branches`, ``ParallelConfig.split_guidance``): whole tiles leave
  ``2 ceil(C / R)`` forwards on the busiest rank where guidance is two forwards per tile (4 tiles on 8
  ranks: 2, with half the ranks idle). Adapters that run the branches as separate forwards
  (``ModelAdapter.guidance_branches``: Wan, HunyuanVideo's true CFG) let a busy rank hand a tile's
  second branch to a rank with a free slot (the pair moving the fewest cells), down to
  ``ceil(2 C / R)``; the helper receives the tile's
  input like any computer and sends its branch output back whole, and the computer combines the two
  with ``adapter.guide``, the arithmetic ``predict`` uses, so the result is the single-process one.
  CogVideoX and LTX-Video batch the branches in one forward: its halves split the same way where,
  run apart, they give the batched prediction bit for bit (every rank checks the first tile before the
  loop: :func:`exact_guidance_halves`), or where the adapters run them apart anyway
  (``separate_guidance``); a run that leaves ranks idle says so.
  This departs from "only halos move" on purpose: a tile's input and output per split tile and step
  are megabytes, a forward is seconds. Only where it shortens the step.
* **Stage 1 splits its guidance too** (:class:`SketchGuidanceSplit`): the sketch is one native-size
  forward pair per step for all N steps, on one rank while the others wait; on 8 ranks at 2K that is
  more forwards than a rank's share of the refinement. Where the stock pipeline guides with two calls
  per step, ranks 0 and 1 both run it and compute one call each, swapping the outputs, so the
  pipeline itself stays unmodified and its latent is the one-process latent. Where it batches both
  branches in one call (CogVideoX, LTX-Video), each computes half the batch (:class:`SketchBatchSplit`),
  but only after the first call of each size has shown, on both ranks, that a half is bit for bit a
  slice of the whole call (kernels may not give a sample the same bits in another batch size).
  Splitting one forward's tokens over all ranks is diffusers' context parallelism, which supergen uses
  only on request (``ParallelConfig.sketch_context``, :class:`SketchContextParallel`): it moves
  activations inside every layer (Ulysses' all-to-all or ring attention's key/value rotation), the one
  traffic of a run that is inside a forward, and its latent is the one process's only where the kernels
  give a token the same bits in a shard of the sequence as in the whole (so on the CPU in the tests, not
  promised on a GPU). Where it fits (models with a context-parallel plan: Wan, and LTX-Video with ring
  attention only up to diffusers 0.42.1; token and head counts dividing by the degree) every rank takes
  part in the sketch's forwards, so the sketch no longer bounds the run's speed-up at many ranks. Where
  guidance is two calls per step the ranks split in two halves, one call of every pair each, and each
  call's tokens over its half (:func:`sketch_context_split`: CFG parallelism times context parallelism,
  as xDiT composes them; the halves swap one output per step, and each all-to-all spans half the
  ranks). Its hooks come off before stage 2, whose tile forwards are each one rank's.
* **The tile cache (gate/budget) keeps its state per region.** Its per-cell state (residual, last
  prediction, gain, accumulated change, skip count, motion, last input change) is region-shaped and
  stays with its cells (with ``follow`` regions it migrates with them, like the scheduler's). Its
  decisions need per-tile window means: each rank sums its own cells of every window in float64 and
  an all-reduce of the ``(N + 1) x 11`` sums gives every rank the same numbers, hence the same skip
  decision and the same report totals (the one process runs the same code on sums over the whole
  canvas): one reduction before the forwards (the decision, only on steps where the gate can skip)
  and one after (the gain). The decision feeds the assignment, so skipped tiles are never computed
  and the computed ones are rebalanced. A step lasts as long as its busiest rank, so ranks that
  would wait compute the skipped tiles with the largest predicted change instead, their own first
  (:func:`fill_idle_slots`, ``ParallelConfig.fill_idle``): whole-tile granularity leaves
  ``ceil(C / R)`` forwards on the busiest rank whatever is done, and filling the others' slots turns that idle
  time into fewer reused tiles, not into imbalance.
* **Start-up and failure.** Every rank hashes its generation settings; a mismatch raises on every
  rank, naming the differing values. The process group carries a timeout, so a rank that raises or
  dies makes the others' transfers fail (non-zero exit) instead of hanging. The one long wait, for
  the sketch, is cut into one tiny all-reduce per forward of rank 0 (:class:`SketchHeartbeat`), so the
  timeout bounds a forward, not the sketch.

The final latent is gathered to rank 0 (the only collective-like transfer of a canvas, after the
loop), and the VAE work at the canvas size is shared in blocks of whole VAE tiles: for the decode
(:func:`decode_in_blocks`) rank 0 broadcasts the latent, every rank decodes a block with the VAE's own
tiled decode, from one tile row and column before it (the tiles its first ones blend with) to the start
of the next, and sends rank 0 its block's pixels; the upscale's encode (:func:`encode_in_blocks`) is
cut the same way, each rank sending its latent block to the others. Blocks cut there give, cropped,
exactly the one-process pixels and latent (tested bit for bit on each family's VAE; a probe checks it
before a run relies on it), at about half the VAE's time on 2 ranks and a fifth on 8
(``bench/parallel.py``).

Per step a rank holds one canvas-size scratch buffer to cut its tiles from (memory, not traffic: only
halo cells are ever filled from other ranks).

Schedulers that draw noise inside ``step`` (CogVideoX's DPM, DDPM, ancestral samplers) draw it with
diffusers' ``randn_tensor`` in the shape of what they step: a region. While a rank steps its region,
:func:`canvas_noise` has that draw take the canvas-size draw from the same generator and keep the
region's cells, so every rank consumes the generator as one process does and each cell gets the
one-process noise (every rank draws the whole canvas's noise: memory and time of one ``randn``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import NamedTuple

import torch

from .config import ParallelConfig
from .reference import blend_ramp

# --------------------------------------------------------------------------------------------------
# Process group
# --------------------------------------------------------------------------------------------------


@dataclass
class ExchangeStats:
    """Bytes this rank sent, per refinement step and by kind (inputs, predictions, guidance branches of split
    tiles, migration, and the tile cache's window sums: the ring all-reduce's share of a rank,
    ``2 (R - 1) / R`` of the vector)."""

    per_step: list[dict] = field(default_factory=list)
    final_gather: int = 0
    sketch_broadcast: int = 0  # rank 0: the sketch latent it broadcast (:func:`share_sketch`)
    sketch_branches: int = 0  # ranks 0 and 1: stage 1's guidance outputs they swapped (:class:`SketchGuidanceSplit`)
    canvas_broadcast: int = 0  # rank 0: the canvas it broadcast when the ranks' differed (:func:`agree_on_canvas`)
    decode_broadcast: int = 0  # rank 0: the refined latent it broadcast to share the decode (:func:`decode_in_blocks`)
    decode_gather: int = 0  # the pixels of this rank's decode block, sent to rank 0
    encode_exchange: int = 0  # this rank's block of the upscale's encode, sent to every other rank

    def add(self, kind: str, nbytes: int) -> None:
        step = self.per_step[-1]
        step[kind] = step.get(kind, 0) + int(nbytes)

    def as_dict(self) -> dict:
        totals = [sum(s.values()) for s in self.per_step]
        return {
            "bytes_sent_per_step": totals,
            "bytes_sent_by_kind": {
                k: sum(s.get(k, 0) for s in self.per_step)
                for k in ("inputs", "predictions", "branches", "migration", "cache_stats")
            },
            "final_gather_bytes": self.final_gather,
            "sketch_broadcast_bytes": self.sketch_broadcast,
            "sketch_branches_bytes": self.sketch_branches,
            "canvas_broadcast_bytes": self.canvas_broadcast,
            "decode_broadcast_bytes": self.decode_broadcast,
            "decode_gather_bytes": self.decode_gather,
            "encode_exchange_bytes": self.encode_exchange,
        }


@dataclass
class ParallelContext:
    """This process's place in the run: ``world_size == 1`` means the plain single-process path."""

    rank: int = 0
    world_size: int = 1
    config: ParallelConfig = field(default_factory=ParallelConfig)
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    computed_tiles: list[list[int]] = field(default_factory=list)  # per step: tiles computed by each rank
    # per step: the forwards each rank ran (a tile's guidance branches count one each, :func:`assign_branches`)
    forwards: list[list[int]] = field(default_factory=list)
    regions: str | None = None  # the region policy the last refinement ran with (``auto`` resolved)
    latents_rebuilt: bool = False  # following regions rebuilt the latents from the scheduler's history
    # a batched guidance forward's halves give its prediction exactly (None: not checked, no split possible)
    guidance_halves: bool | None = None
    sketch_forwards: int | None = None  # forwards this rank ran (or took part in) when stage 1 was shared
    decode_plan: VaeBlocks | None = None  # how the ranks shared the final decode (:func:`decode_in_blocks`)
    groups: dict = field(default_factory=dict)  # process subgroups made for this run (:func:`sketch_waiters_group`)
    encode_plan: VaeBlocks | None = None  # and the upscale's encode (:func:`encode_in_blocks`)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check_no_callback(self, callback) -> None:
        """No rank holds the whole canvas during a distributed refinement, so no step callback can see it."""
        if self.distributed and callback is not None:
            raise ValueError(
                f"`callback_on_step_end` is not available with tile parallelism (world size {self.world_size}): "
                "no rank holds the whole canvas during refinement."
            )


def setup(config: ParallelConfig, device: torch.device | str = "cpu") -> ParallelContext:
    """Join (or create) the process group from the launcher's environment; no group for one process."""
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"`parallel` must be a ParallelConfig or None but is {type(config).__name__}.")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int but is {os.environ['WORLD_SIZE']!r}.") from None
    if world <= 1:
        return ParallelContext(config=config)
    import torch.distributed as dist

    device = torch.device(device)
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs the pipeline on a CUDA device but it runs on {device}; use 'gloo'.")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(config.timeout)))
        atexit.register(_destroy)
    elif dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}.")
    return ParallelContext(rank=dist.get_rank(), world_size=dist.get_world_size(), config=config)


def _flatten(value, prefix: str = "") -> dict:
    """Nested dicts as ``{"a.b": leaf}``, so that a mismatch names the leaf that differs."""
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for k, v in value.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(ctx: ParallelContext) -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.randn(..., generator=None, device=device)`` draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _broadcast_layout(ctx: ParallelContext, t: torch.Tensor | None, what: str) -> tuple[tuple, torch.dtype]:
    """The shape and dtype of rank 0's tensor ``t`` (``None`` on the others) on every rank (8 numbers)."""
    import torch.distributed as dist

    meta = torch.zeros(8, dtype=torch.int64, device=_comm_device(ctx))
    if ctx.rank == 0:
        if t.dim() > 6 or t.dtype not in _DTYPES:
            raise ValueError(f"cannot share a {what} of shape {tuple(t.shape)} and dtype {t.dtype}.")
        meta[0], meta[1] = t.dim(), _DTYPES.index(t.dtype)
        meta[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(meta, src=0)
    ndim, code = int(meta[0]), int(meta[1])
    return tuple(int(s) for s in meta[2 : 2 + ndim]), _DTYPES[code]


def _broadcast_from_rank0(ctx: ParallelContext, t: torch.Tensor | None, what: str, layout=None) -> torch.Tensor:
    """Rank 0's tensor ``t`` (``None`` on the others) on every rank, on the backend's device: its shape and
    dtype first (unless every rank has them already: ``layout``), then the data."""
    import torch.distributed as dist

    comm = _comm_device(ctx)
    shape, dtype = layout if layout is not None else _broadcast_layout(ctx, t, what)
    data = t.to(comm).contiguous() if ctx.rank == 0 else torch.empty(shape, dtype=dtype, device=comm)
    dist.broadcast(data, src=0)
    return data


def share_sketch(ctx: ParallelContext, low: torch.Tensor | None, generator: torch.Generator | None,
                 device: torch.device | str) -> torch.Tensor:  # fmt: skip
    """Stage 1 runs once, on rank 0: its sketch latent ``low`` (``None`` on the other ranks) and the state
    of the random generator it drew from (``generator``, or ``device``'s default one) are broadcast, so
    every rank continues from the same sketch and draws the same re-noising noise. The other ranks wait
    instead of computing the same thing, and no rank can hold a different sketch (kernels that are not
    bitwise reproducible across GPUs or nodes would otherwise let them drift apart). Returns the sketch
    on ``device``; rank 0 counts the payload in ``ctx.stats.sketch_broadcast``."""
    import torch.distributed as dist

    comm = _comm_device(ctx)
    device = torch.device(device)
    data = _broadcast_from_rank0(ctx, low, "sketch")
    rng = generator if generator is not None else _default_generator(device)
    payload = rng.get_state().to(comm)  # the same size on every rank: the same kind of generator
    dist.broadcast(payload, src=0)
    if ctx.rank != 0:
        rng.set_state(payload.cpu())
    else:
        ctx.stats.sketch_broadcast = data.numel() * data.element_size()
    return low if ctx.rank == 0 else data.to(device)


def sketch_waiters_group(ctx: ParallelContext, runners: tuple[int, ...]):
    """The process group of rank 0 and the ranks that wait while ``runners`` run stage 1 (``None``
    where no rank waits). Every rank must call it (creating a group is collective)."""
    import torch.distributed as dist

    waiting = [r for r in range(ctx.world_size) if r not in runners]
    if not waiting:
        return None
    key = ("sketch", *runners)
    if key not in ctx.groups:  # once per generation (a calibration pass reuses it): a group is a communicator
        timeout = datetime.timedelta(seconds=float(ctx.config.timeout))  # not the default group's by default
        ctx.groups[key] = dist.new_group([0, *waiting], timeout=timeout)
    return ctx.groups[key]


class _WrapsForwards:
    """Between :meth:`_wrap` and :meth:`_unwrap`, each of ``self.modules`` calls ``self._call(forward, ...)``
    with its own ``forward`` (restored after, diffusers' hooks included)."""

    def __init__(self, modules):
        self.modules = [m for m in modules if m is not None]
        self._saved: list = []

    def _wrap(self) -> None:
        self._saved = [module.__dict__.get("forward") for module in self.modules]
        for module in self.modules:
            module.forward = partial(self._call, module.forward)

    def _unwrap(self) -> None:
        for module, saved in zip(self.modules, self._saved):
            if saved is None:
                del module.forward
            else:
                module.forward = saved
        self._saved = []


class SketchHeartbeat(_WrapsForwards):
    """Rank 0's progress through stage 1, for the ranks that wait for its sketch (:func:`wait_for_sketch`).

    A sketch of a real model is many minutes of forwards on rank 0 (and rank 1), longer than
    ``ParallelConfig.timeout``: a waiting rank blocked that long in one collective would be failed by
    the process group's timeout. So after each call of the model's transformer rank 0 sends a tiny
    all-reduce (one number) to the waiting ranks' group, and a last one when the sketch is done: the
    timeout then bounds the time between two forwards, not the sketch, and a rank 0 that raises or dies
    still makes the waiting ranks fail within it. Rank 1, computing half of each guidance pair
    (:class:`SketchGuidanceSplit`), is not in the group, so nothing waits for it mid-pair.
    """

    def __init__(self, ctx: ParallelContext, group, modules):
        super().__init__(modules)
        self.ctx, self.group = ctx, group

    def _beat(self, value: int) -> None:
        import torch.distributed as dist

        dist.all_reduce(torch.tensor([value], device=_comm_device(self.ctx)), op=dist.ReduceOp.MAX, group=self.group)

    def _call(self, forward, *args, **kwargs):
        out = forward(*args, **kwargs)
        self._beat(0)
        return out

    def __enter__(self) -> SketchHeartbeat:
        if self.group is not None:
            self._wrap()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._unwrap()
        if self.group is not None and exc_type is None:
            self._beat(1)  # done: the waiting ranks go on to the sketch's broadcast


def wait_for_sketch(ctx: ParallelContext, group) -> None:
    """On a rank that waits for stage 1: follow rank 0's :class:`SketchHeartbeat` until it says done."""
    import torch.distributed as dist

    while True:
        beat = torch.zeros(1, dtype=torch.int64, device=_comm_device(ctx))
        dist.all_reduce(beat, op=dist.ReduceOp.MAX, group=group)
        if int(beat):
            return


class _SketchPair(_WrapsForwards):
    """Two ranks computing stage 1 together (ranks 0 and 1, or this rank and ``peer``): the model's forwards
    are wrapped while inside, and each counts the forwards it computed and the bytes it sent; the higher
    rank of the two is ``second``; ``_learned`` maps an input signature to the output it learnt (shape,
    dtype, device, container)."""

    def __init__(self, ctx: ParallelContext, modules, peer: int | None = None):
        if peer is None and (ctx.rank not in (0, 1) or ctx.world_size < 2):
            raise ValueError(f"the sketch's guidance splits between ranks 0 and 1, not rank {ctx.rank}.")
        if peer is not None and not (0 <= peer < ctx.world_size and peer != ctx.rank):
            raise ValueError(f"rank {ctx.rank} cannot pair with rank {peer} of {ctx.world_size}.")
        super().__init__(modules)
        self.ctx, self.peer = ctx, 1 - ctx.rank if peer is None else peer
        self.second = ctx.rank > self.peer
        self.enabled = True
        self.forwards = 0  # forwards this rank computed
        self.sent = 0  # bytes this rank sent
        self._learned: dict = {}  # input signature -> (shape, dtype, device, rebuild)

    def __enter__(self):
        self._wrap()
        return self

    def __exit__(self, *exc) -> None:
        self._unwrap()


class SketchGuidanceSplit(_SketchPair):
    """Stage 1's two guidance forwards per step on two ranks, the stock pipeline unchanged.

    Ranks 0 and 1 both run the stock pipeline with this context around it. Where a pipeline runs
    classifier-free guidance as two calls of its transformer per step (Wan, HunyuanVideo's true CFG:
    the conditional call, then the unconditional one, on the same latent input; the adapter says so,
    ``ModelAdapter.sketch_guidance_pairs``), rank 0 computes the first call of each pair and rank 1 the
    second, at the same time: at the first call rank 1 returns at once an empty output, at the second
    the two ranks swap their outputs (one native-size output each, in the model's dtype), rank 1
    filling that empty output in place before the pipeline reads it. Both ranks then hold both outputs,
    computed by the stock forward from the pipeline's own arguments, and combine them with the
    pipeline's own arithmetic: the same latent as one process, for half the forwards per rank.

    Safeguards: each pair's second call must have the first's latent input and timestep (else this is
    not a guidance pair: the first pair of each input shape runs whole on both ranks, and a mismatch
    there turns the split off; a later mismatch, after an empty output went out, raises on both ranks,
    which see the same calls); the first pair of each input shape also learns the output's shape, dtype
    and container, which the later empty outputs take (and the computed ones are checked against).

    With ``peer``, the pair is this rank and ``peer`` (the lower one computing the first calls): under
    ``sketch_context`` each rank of one half of the ranks pairs with its counterpart in the other half,
    each half running its calls with context parallelism (:class:`SketchContextParallel`).
    """

    def __init__(self, ctx: ParallelContext, modules, peer: int | None = None):
        super().__init__(ctx, modules, peer)
        self._first = None  # (hidden_states, timestep, signature, split, output) of a pair's first call

    @staticmethod
    def _inputs(args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        return hidden, timestep

    @staticmethod
    def _output(out):
        """The output tensor of a transformer's return value and how to rebuild one around another
        tensor: ``(tensor,)`` (``return_dict=False``) or a one-field diffusers output."""
        if isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], torch.Tensor):
            return out[0], lambda t: (t,)
        keys = list(out.keys()) if hasattr(out, "keys") else []
        if len(keys) == 1 and isinstance(out[keys[0]], torch.Tensor):
            kind, key = type(out), keys[0]
            return out[key], lambda t: kind(**{key: t})
        return None, None

    @staticmethod
    def _same(a, b) -> bool:
        if a is b:
            return True
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        return a == b

    def _call(self, forward, *args, **kwargs):
        if not self.enabled:
            self.forwards += 1
            return forward(*args, **kwargs)
        hidden, timestep = self._inputs(args, kwargs)
        if self._first is None:  # the first call of a pair
            signature = None
            if isinstance(hidden, torch.Tensor):
                signature = (tuple(hidden.shape), hidden.dtype, hidden.device)
            split = signature in self._learned
            if split and self.second:  # the second rank computes the second call instead
                shape, dtype, device, rebuild = self._learned[signature]
                empty = torch.empty(shape, dtype=dtype, device=device)  # filled at the second call
                self._first = (hidden, timestep, signature, True, empty)
                return rebuild(empty)
            out = forward(*args, **kwargs)
            self.forwards += 1
            self._first = (hidden, timestep, signature, split, out)
            return out
        first_hidden, first_timestep, signature, split, first_out = self._first
        self._first = None
        paired = signature is not None and self._same(hidden, first_hidden) and self._same(timestep, first_timestep)
        if not split:  # a pair run whole on both ranks: learn its output, or stop splitting
            out = forward(*args, **kwargs)
            self.forwards += 1
            (a, rebuild), (b, _) = self._output(first_out), self._output(out)
            if not paired or a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                self.enabled = False  # not (conditional, unconditional) pairs of one step: no split
            else:
                self._learned[signature] = (tuple(a.shape), a.dtype, a.device, rebuild)
            return out
        if not paired:
            raise RuntimeError(
                "split stage-1 guidance: the pipeline's transformer calls are not (conditional, unconditional) "
                "pairs on one latent input; run with ParallelConfig(split_guidance=False)."
            )
        shape, dtype, device, rebuild = self._learned[signature]
        if not self.second:  # this rank computed the first call; the second rank computed this one
            mine = self._output(first_out)[0]
            theirs = torch.empty(shape, dtype=dtype, device=device)
            self.sent += _transfer(self.ctx, {self.peer: [mine]}, {self.peer: [theirs]}, None)
            return rebuild(theirs)
        out = forward(*args, **kwargs)
        self.forwards += 1
        mine = self._output(out)[0]
        if mine is None or tuple(mine.shape) != shape or mine.dtype != dtype:
            raise RuntimeError(
                f"split stage-1 guidance: the second call's output {getattr(mine, 'shape', None)} "
                f"{getattr(mine, 'dtype', None)} differs from the first's {shape} {dtype}."
            )
        self.sent += _transfer(self.ctx, {self.peer: [mine]}, {self.peer: [first_out]}, None)
        return out


def _has_foreign_hooks(module) -> bool:
    """Whether ``module`` or a submodule carries diffusers hooks other than supergen's rotary one (a cache
    such as FirstBlockCache keeps state across calls, which splitting a call in two would change)."""
    from .adapters.base import _ROPE_HOOK
    from .cache import hook_names

    return any(name != _ROPE_HOOK for m in module.modules() for name in hook_names(m))


class SketchBatchSplit(_SketchPair):
    """Stage 1's batched guidance on two ranks, the stock pipeline unchanged, where the result is the
    same bit for bit.

    CogVideoX and LTX-Video run classifier-free guidance as one transformer call on a batch of both
    branches (``[uncond; cond]``; ``ModelAdapter.sketch_guidance_batched``). Ranks 0 and 1 both run
    the stock pipeline with this context around it: rank 0 computes the first half of each call's
    batch, rank 1 the second (every tensor argument whose first dimension is the call's batch is cut
    in two), and the two swap their halves, so both return the whole output. That equals the batched
    call only where the model's kernels give a sample the same bits in a batch of one as in a batch of
    two, which depends on the kernels (GPU matrix products may pick another algorithm for another
    size): so the first call of each input size runs whole on both ranks *and* in halves, and the split
    goes on only if both ranks' halves equal their slices of the whole call exactly; otherwise every
    call stays whole (the one-process result either way). Models with diffusers hooks (a cache such
    as FirstBlockCache keeps state across calls) are never split. ``forwards`` counts half-batch
    forwards (a whole call is two).
    """

    def __init__(self, ctx: ParallelContext, modules):
        super().__init__(ctx, modules)
        self.enabled = not any(_has_foreign_hooks(m) for m in self.modules)  # the same on both ranks

    def _half(self, args, kwargs, n: int):
        """This rank's half of a call's arguments: tensors whose first dimension is the batch ``n``."""
        lo, hi = (0, n // 2) if not self.second else (n // 2, n)

        def cut(v):
            return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

        return [cut(a) for a in args], {k: cut(v) for k, v in kwargs.items()}

    def _agree(self, ok: bool) -> bool:
        """Both ranks' verdicts combined (both must hold)."""
        device = _comm_device(self.ctx)
        mine, theirs = torch.tensor([int(ok)], device=device), torch.zeros(1, dtype=torch.int64, device=device)
        _transfer(self.ctx, {self.peer: [mine]}, {self.peer: [theirs]}, None)
        return bool(ok) and bool(int(theirs))

    def _call(self, forward, *args, **kwargs):
        hidden, _ = SketchGuidanceSplit._inputs(args, kwargs)
        n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else 0
        if not self.enabled or n < 2 or n % 2:
            self.forwards += 2
            return forward(*args, **kwargs)
        signature = (tuple(hidden.shape), hidden.dtype, hidden.device)
        if signature not in self._learned:  # whole, and in halves: does this model split exactly?
            out = forward(*args, **kwargs)
            whole, rebuild = SketchGuidanceSplit._output(out)
            half_args, half_kwargs = self._half(args, kwargs, n)
            half, _ = SketchGuidanceSplit._output(forward(*half_args, **half_kwargs))
            self.forwards += 3
            lo = 0 if not self.second else n // 2
            exact = whole is not None and half is not None and half.shape[0] == n // 2
            exact = exact and half.dtype == whole.dtype and torch.equal(half, whole[lo : lo + n // 2])
            if self._agree(exact):
                self._learned[signature] = (tuple(whole.shape), whole.dtype, whole.device, rebuild)
            else:
                self.enabled = False
            return out
        shape, dtype, device, rebuild = self._learned[signature]
        half_args, half_kwargs = self._half(args, kwargs, n)
        mine, _ = SketchGuidanceSplit._output(forward(*half_args, **half_kwargs))
        self.forwards += 1
        half = shape[0] // 2
        if mine is None or tuple(mine.shape) != (half, *shape[1:]) or mine.dtype != dtype:
            raise RuntimeError(
                f"split stage-1 guidance: a half-batch output {getattr(mine, 'shape', None)} "
                f"{getattr(mine, 'dtype', None)} is not half of the whole call's {shape} {dtype}."
            )
        full = torch.empty(shape, dtype=dtype, device=device)
        ours, theirs = (full[:half], full[half:]) if not self.second else (full[half:], full[:half])
        ours.copy_(mine)
        self.sent += _transfer(self.ctx, {self.peer: [ours]}, {self.peer: [theirs]}, None)  # contiguous halves
        return rebuild(full)


# Transformers whose context-parallel plan diffusers' Ulysses attention cannot run (up to diffusers 0.42.1): a
# per-head attention mask keeps all heads while the all-to-all leaves each rank a share of them.
_ULYSSES_MASK_HEADS = {"LTXVideoTransformer3DModel": "huggingface/diffusers#14316"}


def sketch_context_split(ctx: ParallelContext, pairs: bool) -> tuple[int, int]:
    """``(groups, degree)`` of stage 1 under ``ParallelConfig.sketch_context``. Where the pipeline guides
    with two calls per step (``pairs``) and ``split_guidance`` is on, an even number of ranks splits in
    two halves, each computing one call of every pair with context parallelism over its half (CFG
    parallelism times Ulysses or ring, as xDiT composes them: the halves swap one output per step, with
    no transfer inside the layers, and each call's sequence is split half as many ways): ``(2, R / 2)``;
    at 2 ranks that is the guidance split alone. Otherwise one group over all ranks: ``(1, R)``."""
    R = ctx.world_size
    if pairs and ctx.config.split_guidance and R % 2 == 0:
        return 2, R // 2
    return 1, R


def check_sketch_context(ctx: ParallelContext, modules, token_counts: dict, degree: int | None = None) -> None:
    """Before any model work: whether stage 1 can run with diffusers' context parallelism of ``degree``
    ranks (default: all; :func:`sketch_context_split`; 1: none, nothing to check) for
    ``ParallelConfig.sketch_context``. ``token_counts`` maps each size the sketch's transformer sees (a
    name for the message) to its token count; raises ``ValueError`` naming what does not fit."""
    import diffusers
    from packaging.version import Version

    kind, world = ctx.config.sketch_context, ctx.world_size if degree is None else degree
    if world == 1:
        return
    for module in (m for m in modules if m is not None):
        name = type(module).__name__
        if not hasattr(module, "enable_parallelism"):
            raise ValueError(
                f"sketch_context={kind!r} needs diffusers' context parallelism (`enable_parallelism`), which "
                f"diffusers {diffusers.__version__}'s {name} lacks; upgrade diffusers or leave `sketch_context` unset."
            )
        if getattr(module, "_cp_plan", None) is None:
            raise ValueError(
                f"sketch_context={kind!r}: {name} has no context-parallel plan (`_cp_plan`; diffusers gives one to "
                "Wan and LTX-Video); leave `sketch_context` unset to run the sketch on rank 0."
            )
        if getattr(module, "_parallel_config", None) is not None:
            raise ValueError(f"sketch_context={kind!r}: {name} already has diffusers parallelism enabled.")
        backend = _attention_backend(module)
        if kind == "ring" and backend == "native":
            raise ValueError(
                f"sketch_context='ring' needs an attention backend that returns the log-sum-exp, and {name}'s is "
                "'native'; set one first (e.g. `transformer.set_attention_backend('_native_flash')` on a GPU), or "
                "use 'ulysses'."
            )
        if kind == "ulysses" and name in _ULYSSES_MASK_HEADS and Version(diffusers.__version__) <= Version("0.42.1"):
            raise ValueError(
                f"sketch_context='ulysses': diffusers {diffusers.__version__}'s Ulysses attention does not split the "
                f"head axis of the cross-attention mask {name} passes ({_ULYSSES_MASK_HEADS[name]}), so its forward "
                "fails; use 'ring', or leave `sketch_context` unset."
            )
        heads = getattr(module.config, "num_attention_heads", None)
        if kind == "ulysses" and heads is not None and heads % world:
            raise ValueError(
                f"sketch_context='ulysses' splits the attention heads over the {world} ranks, but {name} has "
                f"{heads}; use 'ring', or a number of ranks per sequence dividing {heads} (the world size, or half "
                "of it where the ranks split guidance in halves)."
            )
    for what, tokens in token_counts.items():
        if tokens % world:
            raise ValueError(
                f"sketch_context={kind!r} splits the tokens over the {world} ranks, but the {what} has {tokens} "
                f"tokens; use a sketch size or world size whose token count divides evenly."
            )
    if accelerator_count() == 0:
        raise ValueError(
            f"sketch_context={kind!r} needs an accelerator per rank (diffusers places rank r on device r % count), "
            "and this machine has none; leave `sketch_context` unset to run the sketch on rank 0."
        )


def accelerator_count() -> int:
    """Accelerators on this machine as diffusers' context parallelism counts them (``torch.accelerator``,
    torch >= 2.6; 0 without it)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.device_count() if accelerator is not None else 0


class SketchContextParallel(_WrapsForwards):
    """Stage 1 on every rank, each forward of the transformer(s) split along its token sequence over the
    ranks of its group with diffusers' context parallelism (``ParallelConfig.sketch_context``: Ulysses or
    ring attention of degree ``world_size / groups``; ``groups`` = 2: the halves of the ranks, each
    computing one call of every guidance pair, :func:`sketch_context_split`), the stock pipeline unchanged.

    Inside, the modules carry diffusers' context-parallel hooks (``enable_parallelism`` with the model's
    own ``_cp_plan``: inputs split along the sequence, outputs gathered, so every rank's pipeline sees
    whole tensors); on exit they are removed and the attention processors given back their previous
    parallel config, so that stage 2's tile forwards, each on one rank, run the model as before. The
    device mesh (``(groups, ring, ulysses)``) is made once per process group and kept (making one is
    collective). ``forwards`` counts the calls this rank took part in, each a ``1 / degree`` share of a
    forward's tokens.
    """

    def __init__(self, ctx: ParallelContext, modules, groups: int = 1):
        if groups < 1 or ctx.world_size % groups or ctx.world_size // groups < 2:
            raise ValueError(f"{ctx.world_size} ranks do not split in {groups} groups of 2 or more.")
        super().__init__(modules)
        self.ctx, self.forwards, self.groups = ctx, 0, groups
        self.degree = ctx.world_size // groups
        self._processors: list = []

    def _mesh(self):
        key = ("sketch_context", self.ctx.config.sketch_context, self.groups)
        if key not in self.ctx.groups:
            from torch.distributed.device_mesh import init_device_mesh

            ring_ulysses = (1, self.degree) if self.ctx.config.sketch_context == "ulysses" else (self.degree, 1)
            device_type = _comm_device(self.ctx).type
            self.ctx.groups[key] = init_device_mesh(
                device_type, (self.groups, *ring_ulysses), mesh_dim_names=("cfg", "ring", "ulysses")
            )
        return self.ctx.groups[key]

    def _call(self, forward, *args, **kwargs):
        self.forwards += 1
        return forward(*args, **kwargs)

    def __enter__(self) -> SketchContextParallel:
        from diffusers import ContextParallelConfig

        mesh, degree = self._mesh(), {f"{self.ctx.config.sketch_context}_degree": self.degree}
        try:
            for module in self.modules:
                self._processors += [(p, p._parallel_config) for p in _attention_processors(module)]
                module.enable_parallelism(config=ContextParallelConfig(**degree, mesh=mesh))
        except BaseException:
            self.__exit__(None, None, None)  # a module enabled before the failure goes back to how it was
            raise
        self._wrap()
        return self

    def __exit__(self, *exc) -> None:
        from diffusers.hooks.context_parallel import remove_context_parallel

        self._unwrap()
        for module in self.modules:
            if module._parallel_config is not None:
                remove_context_parallel(module, module._cp_plan)
                module._parallel_config = None
        for processor, previous in self._processors:
            processor._parallel_config = previous
        self._processors = []


def _attention_backend(module) -> str | None:
    """The name of the attention backend ``module``'s first dispatching processor uses (``None``: none)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for processor in _attention_processors(module):
        if hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
            return getattr(backend, "value", str(backend))
    return None


def _attention_processors(module) -> list:
    """The attention processors of ``module`` that carry a diffusers parallel config."""
    out = []
    for m in module.modules():
        processor = getattr(m, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config") and processor not in out:
            out.append(processor)
    return out


def agree_on_canvas(ctx: ParallelContext, latents: torch.Tensor) -> torch.Tensor:
    """The re-noised canvas each rank built from the shared sketch, made the same on every rank.

    Where the upscale's encode is not shared in blocks (:func:`encode_in_blocks`: a canvas of one VAE tile,
    an unknown VAE tiling), every rank runs it, which gives every rank the same canvas only where its
    kernels are bitwise reproducible. The ranks compare a checksum (sum and sum of
    squares in float64, two numbers each); if any rank's differs from rank 0's, rank 0 broadcasts its
    canvas to all (once, counted in ``ctx.stats.canvas_broadcast``) and the run goes on from it."""
    import torch.distributed as dist

    comm = _comm_device(ctx)
    mine = torch.zeros(2, dtype=torch.float64, device=latents.device)
    for frame in latents.detach().unbind(2):  # one latent frame in float64 at a time, not the canvas
        f = frame.double()
        mine += torch.stack([f.sum(), (f * f).sum()])
    mine = mine.to(comm)
    sums = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(sums, mine)
    if all(torch.equal(s, sums[0]) for s in sums[1:]):
        return latents
    data = latents.to(comm).contiguous()
    dist.broadcast(data, src=0)
    if ctx.rank == 0:
        ctx.stats.canvas_broadcast = data.numel() * data.element_size()
        return latents
    return data.to(latents.device)


def check_same_config(ctx: ParallelContext, settings: dict) -> None:
    """Raise ``ValueError`` on every rank unless every rank passes the same ``settings``.

    The ranks exchange a SHA-256 of the canonical JSON of ``settings`` (32 numbers each, before any
    generation work); only when the hashes differ are the settings themselves gathered, to name the
    differing keys and each rank's value.
    """
    if not ctx.distributed:
        return
    import torch.distributed as dist

    text = json.dumps(settings, sort_keys=True, default=repr)
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int32, device=_comm_device(ctx))
    hashes = [torch.empty_like(digest) for _ in range(ctx.world_size)]
    dist.all_gather(hashes, digest)
    if all(torch.equal(h, hashes[0]) for h in hashes):
        return
    everyone: list[dict] = [None] * ctx.world_size  # type: ignore[list-item]
    dist.all_gather_object(everyone, _flatten(json.loads(text)))
    keys = sorted({k for s in everyone for k in s})
    differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in everyone}) > 1]
    detail = "; ".join(
        f"{k}: " + ", ".join(f"rank {r}={s.get(k)!r}" for r, s in enumerate(everyone)) for k in differing
    )
    raise ValueError(f"the ranks were started with different settings ({detail}); every rank must get the same ones.")


# --------------------------------------------------------------------------------------------------
# Geometry: home tiles, regions, windows (shared by the runtime and bench/parallel.py)
# --------------------------------------------------------------------------------------------------


def _axis_delta(centres: torch.Tensor, size: int, wrap: bool) -> torch.Tensor:
    """(N, size) signed distance from every cell centre of an axis to each tile centre."""
    cells = torch.arange(size, dtype=torch.float64) + 0.5
    delta = cells[None, :] - centres[:, None]
    return torch.remainder(delta + size / 2, size) - size / 2 if wrap else delta


def home_tiles(origins: torch.Tensor, tile_hw, canvas_hw, wrap: bool) -> torch.Tensor:
    """``(H, W)`` index of each cell's home tile: of the tiles covering it, the one whose centre is
    nearest (max of the per-axis distances in tile units; ties to the lower index). Overlaps split in
    the middle, so each side of an overlap needs half of it as halo."""
    h, w = tile_hw
    H, W = canvas_hw
    origins = origins.to("cpu", torch.float64)
    dy = _axis_delta(origins[:, 0] + h / 2, H, wrap)
    dx = _axis_delta(origins[:, 1] + w / 2, W, wrap)
    inside = (dy.abs() < h / 2)[:, :, None] & (dx.abs() < w / 2)[:, None, :]
    dist = torch.maximum((dy.abs() / h)[:, :, None], (dx.abs() / w)[:, None, :])
    dist = torch.where(inside, dist, torch.inf)
    home = dist.argmin(dim=0)
    if bool(torch.isinf(dist.gather(0, home[None])).any()):
        raise ValueError("the tile windows do not cover the canvas; every cell needs a tile.")
    return home


def window_cells(origins: torch.Tensor, tile_hw, canvas_hw, wrap: bool) -> torch.Tensor:
    """``(N, h * w)`` flat canvas index (``row * W + col``) of every window cell, window row-major."""
    h, w = tile_hw
    H, W = canvas_hw
    rows = origins[:, 0:1].to(torch.int64) + torch.arange(h)
    cols = origins[:, 1:2].to(torch.int64) + torch.arange(w)
    if wrap:
        rows, cols = rows % H, cols % W
    return (rows[:, :, None] * W + cols[:, None, :]).reshape(origins.shape[0], h * w)


def _owned_counts(owner: torch.Tensor, windows: torch.Tensor, world_size: int) -> torch.Tensor:
    """``(N, world)`` cells of each window owned by each rank."""
    N = windows.shape[0]
    pairs = owner[windows] + world_size * torch.arange(N)[:, None]  # (tile, owner) as one index
    return torch.bincount(pairs.flatten(), minlength=N * world_size).view(N, world_size)


def fixed_owner(grid, world_size: int, steps: int, rebalance: bool = True) -> torch.Tensor:
    """``(H * W,)`` owner of each cell for regions that stay fixed over a run of ``steps`` grid placements.

    Candidates, each a balanced partition: runs of the first step's home tiles in row-major order (the
    regions ``follow`` starts from) and in column-major order, bands of rows, bands of columns, and
    blocks of ``r x c`` with ``r * c == world_size``. Chosen: the one under which the busiest rank sends
    the fewest cells (:func:`exchange_bytes` with every tile computed and assigned as the run assigns
    them, ``rebalance``), summed over the steps; ties to the earlier candidate. Deterministic, so every
    rank picks the same."""
    _, H, W = grid.canvas
    R = world_size
    first = grid.at_step(0)
    N = first.shape[0]
    home = home_tiles(first, grid.tile, (H, W), grid.wrap).flatten()
    rows = torch.arange(H).repeat_interleave(W)
    cols = torch.arange(W).repeat(H)
    nx = len(set(first[:, 1].tolist()))  # the first step's tiles are row-major over a full product grid
    n = torch.arange(N)
    column_major = (n % nx) * (N // nx) + n // nx
    candidates = [home_ranks(N, R)[home], (column_major * R // N)[home], rows * R // H, cols * R // W]
    candidates += [(rows * r // H) * (R // r) + cols * (R // r) // W for r in range(2, R) if R % r == 0]
    placements = [grid.at_step(i) for i in range(steps)]
    best, best_cost = None, None
    for owner in candidates:
        cost = 0
        for origins in placements:
            layout = Layout.with_owner(origins, grid.tile, (H, W), grid.wrap, R, owner)
            cost += int(sum(exchange_bytes(layout, computers(layout, None, rebalance), 1).values()).max())
        if best_cost is None or cost < best_cost:
            best, best_cost = owner, cost
    return best


def home_ranks(num_tiles: int, world_size: int, rotation: int = 0) -> torch.Tensor:
    """``(N,)`` home rank of each tile: contiguous runs of the row-major order started at ``rotation``,
    balanced by count (sizes differ by at most one; with more ranks than tiles some ranks own none)."""
    position = (torch.arange(num_tiles) - rotation) % num_tiles
    return position * world_size // num_tiles


@dataclass
class Layout:
    """Where everything lies at one refinement step (identical on every rank)."""

    origins: torch.Tensor  # (N, 2)
    tile_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    world_size: int
    home_rank: torch.Tensor  # (N,) rank owning each tile
    owner: torch.Tensor  # (H * W,) rank owning each cell
    windows: torch.Tensor  # (N, h * w) flat canvas cells of each window
    rotation: int

    @classmethod
    def at_step(cls, grid, step: int, world_size: int, previous: Layout | None = None,
                regions: str = "follow") -> Layout:  # fmt: skip
        return cls.build(grid.at_step(step), grid.tile, grid.canvas[1:], grid.wrap, world_size, previous, regions)

    @classmethod
    def build(cls, origins, tile_hw, canvas_hw, wrap, world_size, previous: Layout | None = None,
              regions: str = "follow") -> Layout:  # fmt: skip
        """The layout of a step whose tiles lie at ``origins``. Without ``previous`` (the first step), or
        with ``regions="follow"``, regions are runs of home tiles (they follow the grid); with
        ``regions="fixed"`` the cells keep ``previous``'s owners and each tile's home rank is the one
        owning most of its window (ties to the lower rank)."""
        tile_hw, canvas_hw = tuple(tile_hw), tuple(canvas_hw)
        if regions not in ("fixed", "follow"):
            raise ValueError(f"`regions` must be 'fixed' or 'follow' but is {regions!r}.")
        if regions == "fixed" and previous is not None:
            return cls.with_owner(origins, tile_hw, canvas_hw, wrap, world_size, previous.owner, previous.rotation)
        home = home_tiles(origins, tile_hw, canvas_hw, wrap).flatten()
        windows = window_cells(origins, tile_hw, canvas_hw, wrap)
        N = origins.shape[0]
        # Regions may wrap only on the torus; there, the runs of home tiles are rotated, or each tile
        # inherits the rank owning most of its window before (where that is as balanced: when an axis's
        # shift wraps round, the row-major order of the same windows changes, which no rotation undoes),
        # whichever moves fewest cells.
        candidates = [(home_ranks(N, world_size, 0), 0)]
        if wrap and previous is not None and world_size > 1:
            candidates += [(home_ranks(N, world_size, rotation), rotation) for rotation in range(1, N)]
            inherited = _owned_counts(previous.owner, windows, world_size).argmax(dim=1)
            balanced = torch.bincount(candidates[0][0], minlength=world_size).sort().values
            if torch.equal(torch.bincount(inherited, minlength=world_size).sort().values, balanced):
                candidates.append((inherited, previous.rotation))
        best = None
        for ranks, rotation in candidates:
            owner = ranks[home]
            moved = 0 if previous is None else int((owner != previous.owner).sum())
            if best is None or moved < best[0]:
                best = (moved, rotation, ranks, owner)
        _, rotation, ranks, owner = best
        return cls(origins, tile_hw, canvas_hw, world_size, ranks, owner, windows, rotation)

    @classmethod
    def with_owner(cls, origins, tile_hw, canvas_hw, wrap, world_size, owner, rotation: int = 0) -> Layout:
        """The layout of tiles at ``origins`` over cells owned as ``owner`` says: each tile's home rank is
        the one owning most of its window (ties to the lower rank)."""
        tile_hw, canvas_hw = tuple(tile_hw), tuple(canvas_hw)
        windows = window_cells(origins, tile_hw, canvas_hw, wrap)
        ranks = _owned_counts(owner, windows, world_size).argmax(dim=1)  # the first maximum
        return cls(origins, tile_hw, canvas_hw, world_size, ranks, owner, windows, rotation)

    @classmethod
    def first(cls, grid, world_size: int, steps: int, regions: str, rebalance: bool = True,
              owner: torch.Tensor | None = None) -> Layout:  # fmt: skip
        """The first step's layout of a run of ``steps`` under ``regions`` (``fixed`` or ``follow``);
        ``owner``: fixed regions already chosen by :func:`fixed_owner`."""
        if regions == "fixed":
            return cls.fixed(grid, world_size, steps, rebalance, owner)
        return cls.at_step(grid, 0, world_size)

    @classmethod
    def fixed(cls, grid, world_size: int, steps: int, rebalance: bool = True,
              owner: torch.Tensor | None = None) -> Layout:  # fmt: skip
        """The first step's layout with fixed regions (``owner``, else :func:`fixed_owner` over the
        run's ``steps``)."""
        owner = fixed_owner(grid, world_size, steps, rebalance) if owner is None else owner
        return cls.with_owner(grid.at_step(0), grid.tile, grid.canvas[1:], grid.wrap, world_size, owner)

    @property
    def num_tiles(self) -> int:
        return self.origins.shape[0]

    def cells(self, rank: int) -> torch.Tensor:
        """Sorted flat canvas cells owned by ``rank``."""
        return (self.owner == rank).nonzero().flatten()

    def local_index(self, rank: int) -> torch.Tensor:
        """``(H * W,)`` position of each cell in ``rank``'s region tensor (``-1`` where not owned)."""
        index = torch.full_like(self.owner, -1)
        cells = self.cells(rank)
        index[cells] = torch.arange(cells.numel())
        return index

    @cached_property
    def move_cells(self) -> list[list[int]]:
        """``[n][r]``: cells that would travel (halo in + predictions out) if rank ``r`` computed tile ``n``;
        computed once per layout (the tile assignment and the guidance split both read it)."""
        owners = self.owner[self.windows]  # (N, h * w)
        foreign = (owners[:, :, None] != torch.arange(self.world_size)).sum(dim=1)
        return (2 * foreign).tolist()

    def needs(self, computer: torch.Tensor, helper: torch.Tensor | None = None) -> torch.Tensor:
        """``(world, H * W)`` bool: the window cells each rank's computed tiles read (the tiles whose
        second guidance branch it runs, ``helper``, too)."""
        need = torch.zeros((self.world_size, self.owner.numel()), dtype=torch.bool)
        for assigned in (computer,) if helper is None else (computer, helper):
            for n, r in enumerate(assigned.tolist()):
                if r >= 0:
                    need[r, self.windows[n]] = True
        return need

    def input_cells(self, computer: torch.Tensor, sender: int, receiver: int, need=None) -> torch.Tensor:
        """Sorted cells ``sender`` owns that ``receiver``'s computed tiles read (the input halo)."""
        need = self.needs(computer) if need is None else need
        return (need[receiver] & (self.owner == sender)).nonzero().flatten()

    def output_positions(self, tile: int, rank: int) -> torch.Tensor:
        """Window-local positions of ``tile``'s cells that ``rank`` owns (window row-major)."""
        return (self.owner[self.windows[tile]] == rank).nonzero().flatten()


def exchange_bytes(layout: Layout, computer: torch.Tensor, cell_bytes: int, next_layout: Layout | None = None,
                   state_tensors: int = 1, cache_cell_bytes: int = 0, cache_reductions: int = 0,
                   halo_cell_bytes: int | None = None, prediction_cell_bytes: int | None = None,
                   helper: torch.Tensor | None = None,
                   branch_cell_bytes: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """``(world,)`` bytes each rank sends in one step, by kind: ``inputs`` (halo cells its tiles' other
    computers read), ``predictions`` (its tiles' predictions for cells other ranks own), ``branches``
    (with ``helper``, :func:`assign_branches`: the second guidance branch of a split tile, its whole
    window, from the helper to the computer, ``branch_cell_bytes`` a cell: the model's output dtype,
    default the predictions'), with
    ``next_layout`` ``migration`` (``state_tensors`` region-shaped tensors plus ``cache_cell_bytes`` of
    tile-cache state per cell changing owner, :func:`tile_cache_cell_bytes`) and ``cache_stats``
    (``cache_reductions`` all-reduces of the tile cache's window sums, :func:`window_sums_bytes`).
    ``cell_bytes`` is one cell of one latent-shaped tensor (``B * C * T * element size``);
    ``halo_cell_bytes``/``prediction_cell_bytes`` (default ``cell_bytes``) the same in the dtypes the
    halos and predictions travel in (:func:`_halo_dtype`, the model's dtype). The runtime moves exactly
    these (bench/parallel.py counts with this function; tests compare it with what the ranks sent)."""
    R = layout.world_size
    need = layout.needs(computer, helper)
    inputs = torch.zeros(R, dtype=torch.int64)
    predictions = torch.zeros(R, dtype=torch.int64)
    branches = torch.zeros(R, dtype=torch.int64)
    migration = torch.zeros(R, dtype=torch.int64)
    for q in range(R):
        owned = layout.owner == q
        inputs[q] = sum(int((need[r] & owned).sum()) for r in range(R) if r != q)
    for n, r in enumerate(computer.tolist()):
        if r >= 0:
            predictions[r] += int((layout.owner[layout.windows[n]] != r).sum())
    if helper is not None:
        for n, q in enumerate(helper.tolist()):
            if q >= 0:
                branches[q] += layout.windows[n].numel()
    if next_layout is not None:
        moved = layout.owner != next_layout.owner
        migration = torch.bincount(layout.owner[moved], minlength=R) * (state_tensors * cell_bytes + cache_cell_bytes)
    stats = torch.full((R,), cache_reductions * window_sums_bytes(layout.num_tiles, R), dtype=torch.int64)
    halo = cell_bytes if halo_cell_bytes is None else halo_cell_bytes
    prediction = cell_bytes if prediction_cell_bytes is None else prediction_cell_bytes
    branch = prediction if branch_cell_bytes is None else branch_cell_bytes
    return {"inputs": inputs * halo, "predictions": predictions * prediction, "branches": branches * branch,
            "migration": migration, "cache_stats": stats}  # fmt: skip


def _ring_share(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return round(2 * (world - 1) / world * nbytes)


def window_sums_bytes(num_tiles: int, world: int) -> int:
    """Bytes a rank sends per all-reduce of the tile cache's ``(N + 1) x 11`` float64 window sums."""
    from .cache import WINDOW_SUM_COLUMNS

    return _ring_share((num_tiles + 1) * WINDOW_SUM_COLUMNS * 8, world)


def tile_cache_cell_bytes(cache, like: torch.Tensor, prediction_dtype: torch.dtype | None = None) -> int:
    """Bytes of a :class:`supergen.cache.TileCache`'s region state per cell, for cells of ``like``
    ``(B, C, T, K)`` and predictions in ``prediction_dtype`` (default ``like``'s; what migrates with each
    cell changing owner): measured on a one-cell holder."""
    probe = type(cache)(cache.config)
    probe.start_cells(like[..., :1], prediction_dtype)
    probe.set_input_change(torch.zeros(1, dtype=torch.float64, device=like.device))
    return sum(t.numel() * t.element_size() for t in probe.cell_state().values())


def _probe_cell(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A one-cell tensor shaped like ``like[..., :1]`` of seeded normal values (the global RNG untouched)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(like[..., :1].shape, generator=g, dtype=torch.float64).to(like.device, like.dtype)


def _rebuild_latents(scheduler):
    """For a scheduler whose latents after a step are a function of the history it keeps, the function
    ``rebuild(refs, values) -> latents``: the latents of the cells whose history tensors (the scheduler's
    own ``refs``, :func:`_region_refs`) are ``values``, by the scheduler's own arithmetic; else ``None``.

    UniPC (``UniPCMultistepScheduler`` without a ``solver_p``) returns from ``step`` its predictor applied
    to what it keeps: ``last_sample`` and ``model_outputs``. Re-running that predictor (with the step index
    it had) on a subset of cells gives exactly those cells' latents, elementwise, so following regions
    need not send them: 3 tensors travel instead of 4. ``values`` may go on past the history (what
    :func:`migrate` received after it); only the first ``len(refs)`` are read."""
    try:
        from diffusers import UniPCMultistepScheduler
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    if not isinstance(scheduler, UniPCMultistepScheduler) or getattr(scheduler, "solver_p", None) is not None:
        return None

    def rebuild(refs: list, values: list) -> torch.Tensor:  # values[: len(refs)] are the history's
        saved, index = [c[k] for c, k in refs], scheduler._step_index
        try:
            for (c, k), v in zip(refs, values):
                c[k] = v
            scheduler._step_index = index - 1
            return scheduler.multistep_uni_p_bh_update(None, sample=scheduler.last_sample, order=scheduler.this_order)
        finally:
            for (c, k), v in zip(refs, saved):
                c[k] = v
            scheduler._step_index = index

    return rebuild


class SchedulerProbe(NamedTuple):
    """What :func:`probe_scheduler` measured."""

    state_bytes: int  # region-shaped state per cell beyond the latents, the most held after any step
    rebuilds_latents: bool  # the latents a step returns are rebuilt exactly from that state


def probe_scheduler(adapter, scheduler, like: torch.Tensor, begin: int, steps: int = 3) -> SchedulerProbe:
    """The region-shaped state a scheduler carries between steps, measured on a copy of it stepped
    ``steps`` times from ``begin`` through ``adapter.scheduler_step`` on one cell of seeded values (the
    warm-up's lower orders included; the global RNG untouched): its bytes per cell beyond the latents
    (UniPC's history, CogVideoX DPM's ``x0``; none for Euler), and whether every step's latents equal,
    bit for bit, the ones :func:`_rebuild_latents` gets from the scheduler's own history, so following
    regions migrate only the history. Checked, not assumed: every rank probes the same values, so they
    agree without a message."""
    import copy

    probe = copy.deepcopy(scheduler)
    rebuild = _rebuild_latents(probe)
    if hasattr(probe, "set_begin_index"):
        probe.set_begin_index(begin)
    x = _probe_cell(like, 0)
    state: dict = {}
    noise = torch.Generator(device=x.device).manual_seed(0)  # schedulers that draw noise leave the global RNG be
    most, rebuilds = 0, rebuild is not None
    for i, t in enumerate(probe.timesteps[begin : begin + steps]):
        x = adapter.scheduler_step(probe, _probe_cell(like, i + 1), t, x, step_index=begin + i, state=state,
                                   generator=noise)  # fmt: skip
        refs = _region_refs([probe, state], x)
        most = max(most, sum(c[k].numel() * c[k].element_size() for c, k in refs))
        if rebuilds:
            history = _region_refs([probe], x)
            rebuilds = bool(history) and torch.equal(rebuild(history, [c[k] for c, k in history]), x)
    return SchedulerProbe(most, rebuilds)


# The share of tiles the gate is assumed to compute when choosing regions (it learns its skips only as
# the run goes; the budget policy's share is its budget).
GATE_SHARE = 0.5
SKIP_DRAWS = 2  # simulated skip patterns per step when choosing regions with the tile cache


def random_skips(layout: Layout, step: int, steps: int, cache, draw: int, fill_idle: bool = True,
                 rebalance: bool = True, branches: int = 1) -> torch.Tensor | None:  # fmt: skip
    """``(N,)`` bool: a seeded random skip pattern of the tile cache ``cache`` at ``step`` (``None`` where it
    computes every tile): its budget's share of the tiles (:data:`GATE_SHARE` for the gate), anywhere,
    then the idle slots filled as the run fills them (:func:`fill_idle_slots`). Used to count the region
    policies before the loop, when the real skips are not known; the same on every rank."""
    if cache is None or not cache.decides(step, steps):
        return None
    N = layout.num_tiles
    share = cache.config.budget if cache.config.mode == "budget" else GATE_SHARE
    g = torch.Generator().manual_seed(draw * 1_000_003 + step)
    compute = torch.zeros(N, dtype=torch.bool)
    compute[torch.randperm(N, generator=g)[: math.ceil(share * N)]] = True
    if fill_idle:
        priority = torch.rand(N, generator=g)
        compute = fill_idle_slots(compute, priority, layout.home_rank, layout.world_size, rebalance, branches)
    return compute


def count_regions(grid, world_size: int, steps: int, regions: str, cell_bytes: int, state_cell_bytes: int,
                  halo_cell_bytes: int, prediction_cell_bytes: int, rebalance: bool = True,
                  owner: torch.Tensor | None = None, latents_migrate: bool = True, cache=None,
                  fill_idle: bool = True, split: bool = False,
                  branch_cell_bytes: int | None = None) -> int:  # fmt: skip
    """Bytes the busiest rank sends over a run of ``steps`` under ``regions`` (``state_cell_bytes``: what
    migrates with a cell besides its latent, for ``follow``, and the latent too unless
    ``latents_migrate`` is false, :func:`probe_scheduler`; ``owner``: fixed regions already
    chosen). Every tile computed; with a tile ``cache``, the sum over :data:`SKIP_DRAWS` of its
    :func:`random_skips` patterns (rebalancing moves computed tiles, which costs bytes); ``split``:
    guidance branches split across ranks where that shortens a step (:func:`assign_branches`), a split
    tile's branch output ``branch_cell_bytes`` a cell (default ``prediction_cell_bytes``)."""
    split = split and rebalance
    total = 0
    for draw in range(SKIP_DRAWS if cache is not None else 1):
        layout = Layout.first(grid, world_size, steps, regions, rebalance, owner)
        for i in range(steps):
            nxt = Layout.at_step(grid, i + 1, world_size, previous=layout, regions=regions) if i + 1 < steps else None
            compute = random_skips(layout, i, steps, cache, draw, fill_idle, rebalance, 2 if split else 1)
            computer = computers(layout, compute, rebalance)
            helper = branch_helpers(layout, computer) if split else None
            sent = exchange_bytes(layout, computer, cell_bytes, nxt, state_tensors=int(latents_migrate),
                                  cache_cell_bytes=state_cell_bytes, halo_cell_bytes=halo_cell_bytes,
                                  prediction_cell_bytes=prediction_cell_bytes, helper=helper,
                                  branch_cell_bytes=branch_cell_bytes)  # fmt: skip
            total += int(sum(sent.values()).max())
            layout = nxt
    return total


def choose_regions(config: ParallelConfig, grid, world_size: int, steps: int, cell_bytes: int, state_cell_bytes: int,
                   halo_cell_bytes: int, prediction_cell_bytes: int, latents_migrate: bool = True,
                   cache=None, split: bool = False, owner: torch.Tensor | None = None,
                   branch_cell_bytes: int | None = None) -> tuple[str, torch.Tensor | None]:  # fmt: skip
    """``(regions, owner)``: ``config.regions``, or for ``auto`` the policy under which the busiest rank
    sends fewer bytes over the run (:func:`count_regions`: every tile computed, or with the tile
    ``cache`` its simulated skips; ties to ``fixed``); ``owner`` is the fixed regions :func:`fixed_owner`
    chose on the way (``None`` when not chosen here), for the run to start from instead of choosing
    them again (or, given, the candidate fixed regions). Deterministic."""
    if config.regions != "auto":
        return config.regions, None
    sizes = (cell_bytes, state_cell_bytes, halo_cell_bytes, prediction_cell_bytes, config.rebalance)
    owner = fixed_owner(grid, world_size, steps, config.rebalance) if owner is None else owner
    skips = {"cache": cache, "fill_idle": config.fill_idle, "split": split, "branch_cell_bytes": branch_cell_bytes}
    fixed = count_regions(grid, world_size, steps, "fixed", *sizes, owner=owner, **skips)
    follow = count_regions(grid, world_size, steps, "follow", *sizes, latents_migrate=latents_migrate, **skips)
    return ("fixed", owner) if fixed <= follow else ("follow", None)


def computers(layout: Layout, compute: torch.Tensor | None, rebalance: bool) -> torch.Tensor:
    """``(N,)`` rank computing each tile this step (``-1``: skipped). ``compute``: ``(N,)`` bool from the
    cache (``None`` = every tile); skipped tiles cost nothing, computed tiles one forward each."""
    N = layout.num_tiles
    costs = [1.0] * N if compute is None else [1.0 if bool(c) else 0.0 for c in compute]
    if not rebalance:
        return torch.where(torch.tensor(costs) > 0, layout.home_rank, -1)
    return assign_tiles(costs, layout.home_rank, layout.move_cells, layout.world_size)


def branch_helpers(layout: Layout, computer: torch.Tensor) -> torch.Tensor:
    """:func:`assign_branches` for this step's ``computer`` (``(N,)``; ``-1``: not split)."""
    return assign_branches(computer, layout.move_cells, layout.world_size)


# --------------------------------------------------------------------------------------------------
# Rebalancing
# --------------------------------------------------------------------------------------------------


def fill_idle_slots(
    compute: torch.Tensor, priority: torch.Tensor | None, home_rank, world_size: int, rebalance: bool = True,
    branches: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``compute`` plus the skipped tiles that ranks would otherwise idle for: ``(N,)`` bool.

    A step lasts as long as its busiest rank's forwards: ``ceil(C / R)`` tiles for ``C`` computed tiles
    with rebalancing (:func:`assign_tiles` reaches it for equal costs), the largest home count without;
    with ``branches=2`` (guidance split across ranks, :func:`assign_branches`) ``ceil(2 C / R)`` branch
    forwards. Every rank can compute that many at no cost in time, so skipped tiles are added, highest
    ``priority`` (the cache's predicted change) first, until the ranks' slots are full (at most all
    ``N``): first only tiles whose home rank still has room for the whole tile (they move no bytes),
    then, with rebalancing, any tile (the assignment sends it to a rank with room). Deterministic, like
    the decision it extends, so every rank gets the same set. One rank: ``compute`` unchanged.
    """
    compute = compute.clone()
    N, R, k = compute.numel(), world_size, branches if rebalance else 1
    C = int(compute.sum())
    if priority is None or R <= 1 or C == 0 or C == N:
        return compute
    home = [int(r) for r in home_rank]
    load = [0] * R
    for n in compute.nonzero().flatten().tolist():
        load[home[n]] += k
    slots = math.ceil(k * C / R) if rebalance else max(load)  # in forwards
    target = min(N, slots * R // k)  # every rank's slots full (without rebalancing, as far as its own tiles go)
    order = sorted((n for n in range(N) if not compute[n]), key=lambda n: (-float(priority[n]), n))
    for n in order:  # 1. tiles whose home rank has room: no bytes move
        if C < target and load[home[n]] + k <= slots:
            compute[n], C = True, C + 1
            load[home[n]] += k
    if rebalance:  # 2. what is left goes where the assignment finds room
        for n in order:
            if C < target and not compute[n]:
                compute[n], C = True, C + 1
    return compute


def assign_tiles(costs, home_rank, move_cells, world_size: int) -> torch.Tensor:
    """``(N,)`` rank computing each tile (``-1`` for tiles of cost 0: skipped, computed by nobody).

    Longest processing time first, with two preferences: a rank keeps its own tiles (costliest first;
    among equal costs the ones dearest to move elsewhere, ``move_cells[n][q] - move_cells[n][home]``)
    while its load stays within its fair share ``sum(costs) / world``; every other tile goes to a
    least-loaded rank, costliest first, and among tiles of equal cost and equally loaded ranks the
    pair that moves the fewest cells (``move_cells[n][r]``) goes first, then the lowest tile and rank.
    Deterministic: every rank computes the same answer.
    """
    costs = [float(c) for c in costs]
    home = [int(r) for r in home_rank]
    N, R = len(costs), world_size
    share = sum(costs) / R
    load = [0.0] * R
    computer = [-1] * N

    def dearness(n: int) -> int:  # cells it moves beyond staying home, if it had to go anywhere
        others = [int(move_cells[n][q]) for q in range(R) if q != home[n]]
        return (min(others) if others else 0) - int(move_cells[n][home[n]])

    keep = sorted((n for n in range(N) if costs[n] > 0), key=lambda n: (-costs[n], -dearness(n), n))
    for n in keep:  # 1. keep own tiles up to the fair share
        r = home[n]
        if load[r] + costs[n] <= share * (1 + 1e-9):
            computer[n] = r
            load[r] += costs[n]
    rest = [n for n in keep if computer[n] < 0]
    while rest:  # 2. LPT for the rest: costliest first, each to a least-loaded rank, cheapest move first
        top = max(costs[n] for n in rest)
        low = min(load)
        ranks = [q for q in range(R) if load[q] == low]
        _, n, r = min((int(move_cells[n][q]), n, q) for n in rest if costs[n] == top for q in ranks)
        computer[n] = r
        load[r] += costs[n]
        rest.remove(n)
    return torch.tensor(computer, dtype=torch.int64)


def assign_branches(computer: torch.Tensor, move_cells, world_size: int) -> torch.Tensor:
    """``(N,)`` rank running the second guidance branch of each tile (``-1``: its computer runs both).

    With classifier-free guidance a tile is two forwards (conditional, unconditional) whose outputs
    combine elementwise, so they may run on two ranks (xDiT's "CFG parallel"). Whole tiles leave
    ``2 ceil(C / R)`` forwards on the busiest rank (4 tiles on 8 ranks: 2, and 4 ranks idle); split
    branches reach ``ceil(2 C / R)`` (1). Each rank above that (in rank order) hands the second branch
    of one of its tiles to a rank with room, choosing the tile and helper whose window moves the fewest
    cells (``move_cells[n][q]``: a helper owning part of the window needs less of it), then the
    least-loaded helper, the first tile, the lowest rank, until it is at ``ceil(2 C / R)``; nothing is
    split where it would not shorten the step. A split tile costs its window's input on the helper and
    one tile of branch output sent back to the computer, which combines the two (the adapter's own
    arithmetic, so the result is the single-process one). Deterministic: every rank computes the same
    answer.
    """
    R = world_size
    comp = [int(r) for r in computer]
    helper = [-1] * len(comp)
    C = sum(r >= 0 for r in comp)
    if R <= 1 or C == 0:
        return torch.tensor(helper, dtype=torch.int64)
    slots = math.ceil(2 * C / R)
    load = [0] * R
    for r in comp:
        if r >= 0:
            load[r] += 2
    for r in range(R):
        while load[r] > slots:  # from assign_tiles (at most ceil(C/R) tiles a rank) this always ends there
            pairs = [(int(move_cells[n][q]), load[q], n, q) for n in range(len(comp)) if comp[n] == r and helper[n] < 0
                     for q in range(R) if q != r and load[q] < slots]  # fmt: skip
            if not pairs:  # an unbalanced ``computer``: every tile of r already split
                break
            _, _, n, q = min(pairs)
            helper[n] = q
            load[r] -= 1
            load[q] += 1
    return torch.tensor(helper, dtype=torch.int64)


def forwards_per_rank(computer: torch.Tensor, helper: torch.Tensor | None, world_size: int,
                      branches: int = 1) -> list[int]:  # fmt: skip
    """Forwards each rank runs: ``branches`` per tile it computes whole, one per branch of a split tile."""
    load = [0] * world_size
    for n, r in enumerate(computer.tolist()):
        if r >= 0:
            split = helper is not None and int(helper[n]) >= 0
            load[r] += 1 if split else branches
            if split:
                load[int(helper[n])] += 1
    return load


# --------------------------------------------------------------------------------------------------
# Point-to-point transfers
# --------------------------------------------------------------------------------------------------


def _transfer(ctx: ParallelContext, sends: dict, recvs: dict, kind: str | None) -> int:
    """One batch of point-to-point transfers: ``sends[peer]`` / ``recvs[peer]`` are lists of tensors
    (received in place). Tensors to one peer are packed per dtype into one message, in list order, on
    the backend's device. Returns the bytes sent and, with ``kind``, adds them to this step's stats."""
    import torch.distributed as dist

    device = _comm_device(ctx)
    ops, unpack, sent = [], [], 0
    for peer in sorted(set(sends) | set(recvs)):
        for tag, (_dtype, out) in enumerate(_by_dtype(sends.get(peer, []))):
            buf = torch.cat([t.reshape(-1).to(device) for t in out])
            if buf.numel():
                ops.append(dist.P2POp(dist.isend, buf, peer, tag=tag))
                sent += buf.numel() * buf.element_size()
        for tag, (dtype, into) in enumerate(_by_dtype(recvs.get(peer, []))):
            total = sum(t.numel() for t in into)
            if total:
                buf = torch.empty(total, dtype=dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
                unpack.append((buf, into))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for buf, into in unpack:
        offset = 0
        for t in into:
            t.copy_(buf[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
    if kind is not None:
        ctx.stats.add(kind, sent)
    return sent


def _by_dtype(tensors: list) -> list:
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))


# --------------------------------------------------------------------------------------------------
# Region-shaped state
# --------------------------------------------------------------------------------------------------


def _region_refs(holders, like: torch.Tensor) -> list:
    """References ``(container, key)`` to every tensor in ``holders`` (objects' ``__dict__`` or dicts, and
    lists inside them) shaped like the region tensor ``like``: last dim the region's cells, one before
    it of size 1, same element count (any layout of batch/channels/frames, e.g. CogVideoX's)."""
    refs = []
    K, numel = like.shape[-1], like.numel()

    def matches(v):
        return (
            isinstance(v, torch.Tensor)
            and v.dim() >= 2
            and v.shape[-1] == K
            and v.shape[-2] == 1
            and (v.numel() == numel)
        )

    for holder in holders:
        d = holder if isinstance(holder, dict) else getattr(holder, "__dict__", {})
        for key, value in d.items():
            if matches(value):
                refs.append((d, key))
            elif isinstance(value, list):
                refs.extend((value, j) for j, v in enumerate(value) if matches(v))
    return refs


def migrate(ctx: ParallelContext, old: Layout, new: Layout, tensors: list, derive=None) -> list:
    """Region tensors of ``old`` → region tensors of ``new``: kept cells copied, the rest exchanged.
    ``derive``: the first tensor does not travel; its received cells are ``derive(others)``, computed
    from the other tensors' received cells (:func:`probe_scheduler`)."""
    me, R = ctx.rank, ctx.world_size
    travel = slice(1, None) if derive is not None else slice(None)
    old_local = old.local_index(me)
    new_local = new.local_index(me)
    was, now = old.owner == me, new.owner == me
    K_new = int(now.sum())
    out = [t.new_empty((*t.shape[:-1], K_new)) for t in tensors]
    kept = (was & now).nonzero().flatten()
    for t, o in zip(tensors, out):
        o[..., new_local[kept]] = t[..., old_local[kept]]
    sends, recvs, placements = {}, {}, []
    for q in range(R):
        if q == me:
            continue
        give = (was & (new.owner == q)).nonzero().flatten()
        take = (now & (old.owner == q)).nonzero().flatten()
        if give.numel():
            sends[q] = [t[..., old_local[give]].contiguous() for t in tensors[travel]]
        if take.numel():
            bufs = [o.new_empty((*o.shape[:-1], take.numel())) for o in out[travel]]
            recvs[q] = bufs
            placements.append((new_local[take], bufs))
    _transfer(ctx, sends, recvs, "migration")
    for idx, bufs in placements:
        for o, b in zip(out[travel], bufs):
            o[..., idx] = b
        if derive is not None:
            out[0][..., idx] = derive(bufs)
    return out


# --------------------------------------------------------------------------------------------------
# The distributed refine loop
# --------------------------------------------------------------------------------------------------


def _prediction_dtype(adapter, latents: torch.Tensor) -> torch.dtype:
    """Predictions travel and blend in the dtype ``adapter.predict`` returns (``prediction_dtype``: a
    bf16 Wan's, bf16; CogVideoX and LTX-Video guide in fp32), as the one process blends them."""
    choose = getattr(adapter, "prediction_dtype", None)
    return latents.dtype if choose is None else choose(latents.dtype)


def _branch_dtype(adapter, pred_dtype: torch.dtype) -> torch.dtype:
    """A split tile's second guidance branch travels as the model returns it: the transformer's dtype (a
    bf16 CogVideoX's or LTX-Video's, where their guided predictions are fp32); ``pred_dtype`` without one."""
    transformer = getattr(getattr(adapter, "pipe", None), "transformer", None)
    return getattr(transformer, "dtype", pred_dtype)


def _halo_dtype(adapter, latents: torch.Tensor) -> torch.dtype:
    """Input halos travel in the adapter's ``tile_input_dtype`` (a bf16 model's dtype for the Wan
    adapter, whose ``predict`` casts first: the same model input for half the bytes)."""
    choose = getattr(adapter, "tile_input_dtype", None)
    return latents.dtype if choose is None else choose(latents.dtype)


def idle_ranks_message(config: ParallelConfig, world: int, num_tiles: int, split: bool, adapter, cond) -> str | None:
    """What rank 0 warns when some of ``world`` ranks have no forward to run in a step of ``num_tiles``
    tiles (``split``: guidance split, two forwards a tile), naming ``separate_guidance`` where the
    adapter batches its guidance and a split would be allowed; ``None`` when every rank has work."""
    useful = num_tiles * (2 if split else 1)  # ranks with a forward to run
    if world <= useful:
        return None
    what = "tiles per step" + (" (two guidance branches each)" if split else "")
    message = (f"{world} ranks share {num_tiles} {what}, so {world - useful} of them have no tile to compute; "
               f"at most {useful} processes (--nproc-per-node) refine this canvas as fast.")  # fmt: skip
    batched = getattr(adapter, "batches_guidance", None)
    if batched is not None and batched(cond) and not split and config.split_guidance and config.rebalance:
        message += (f" {type(adapter).__name__} batches guidance into one forward per tile; with the adapter "
                    f"option separate_guidance=True (CLI --separate-guidance) two ranks share each tile.")  # fmt: skip
    return message


@contextlib.contextmanager
def canvas_noise(scheduler, cells: torch.Tensor, canvas_hw):
    """While ``scheduler`` steps one rank's region (``(..., 1, K)``, its ``K`` flat canvas ``cells``),
    the noise it draws with diffusers' ``randn_tensor`` (CogVideoX's DPM, DDPM, ancestral samplers) in
    the region's shape is drawn in the canvas's shape ``(..., H, W)``, from the same generator, and cut
    to the region's cells: exactly the values one process stepping the canvas gets there, and every
    rank consumes the generator as one process does. Draws of any other shape pass through. The
    function is swapped in the modules defining the scheduler's classes, for the duration of the step
    (the process's other threads would see it too)."""
    H, W = canvas_hw
    modules = {sys.modules.get(c.__module__) for c in type(scheduler).__mro__}
    modules = [m for m in modules if m is not None and callable(getattr(m, "randn_tensor", None))]
    originals = {m: m.randn_tensor for m in modules}
    if not originals:
        yield
        return
    draw = next(iter(originals.values()))

    def region_randn(shape, *args, **kwargs):
        shape = tuple(shape)
        if len(shape) < 2 or shape[-2] != 1 or shape[-1] != cells.numel():
            return draw(shape, *args, **kwargs)
        canvas = draw((*shape[:-2], H, W), *args, **kwargs)
        return canvas.flatten(-2)[..., cells.to(canvas.device)].unsqueeze(-2)

    for m in modules:
        m.randn_tensor = region_randn
    try:
        yield
    finally:
        for m, original in originals.items():
            m.randn_tensor = original


def exact_guidance_halves(ctx: ParallelContext, adapter, latents, cond, grid, t) -> bool:
    """Whether an adapter that batches both guidance branches in one forward (CogVideoX, LTX-Video:
    ``adapter.batches_guidance``) gives, from the two halves run apart (``predict_branch``) and combined
    as a computing rank combines them (``guide``, cells flattened), the batched prediction bit for bit,
    so that guidance split may put them on two ranks. That depends on the kernels (a sample's output
    in a batch of one against a batch of two) and on the guidance arithmetic (LTX-Video's
    ``guidance_rescale`` sums in another order), so every rank runs the first tile of the canvas
    ``latents`` both ways at ``t`` (one batched forward, two half-batch ones; tiles share one shape,
    hence the kernels) and all must agree (one all-reduce)."""
    import torch.distributed as dist

    from .ops import halo_gather

    canvas_hw = tuple(latents.shape[-2:])
    origins = grid.at_step(0)[:1]
    tile = halo_gather(latents, origins, grid.tile, 0, "torus" if grid.wrap else "zero")
    whole = adapter.predict(tile, t, cond, origins, canvas_hw)
    halves = {b: adapter.predict_branch(tile, t, cond, origins, canvas_hw, b).flatten(-2) for b in ("cond", "uncond")}
    guided = adapter.guide(halves, cond, t)
    exact = guided.dtype == whole.dtype and torch.equal(guided, whole.flatten(-2))
    flag = torch.tensor([int(exact)], device=_comm_device(ctx))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(int(flag))


def refine_regions(ctx: ParallelContext, adapter, scheduler, latents, cond, grid, plan, *, generator=None,
                   progress_bar=None, cache=None) -> torch.Tensor | None:  # fmt: skip
    """Stage 2 shared by ``ctx.world_size`` ranks (same contract as :func:`supergen.stages.refine`).

    ``latents`` is the whole re-noised canvas, identical on every rank. Returns the refined canvas on
    rank 0 and ``None`` on the other ranks. ``cache``: a :class:`supergen.cache.StepRehash` (whole steps
    computed or reused) or a :class:`supergen.cache.TileCache` (gate/budget), which here keeps its state
    for this rank's region only (see :func:`_cache_windows`).
    """
    from .cache import StepRehash, TileCache, cell_abs_sum

    if cache is not None and not isinstance(cache, StepRehash | TileCache):
        raise TypeError(f"`cache` must be a StepRehash or TileCache but is {type(cache).__name__}.")
    step_cache = cache if isinstance(cache, StepRehash) else None
    tile_cache = cache if isinstance(cache, TileCache) else None
    me, R = ctx.rank, ctx.world_size
    B, C, T, H, W = latents.shape
    begin = plan.begin_index
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    state: dict = {}
    sigmas = getattr(scheduler, "sigmas", None)
    h, w = grid.tile
    weight = (blend_ramp(h, grid.overlap[0], grid.config.ramp)[:, None]
              * blend_ramp(w, grid.overlap[1], grid.config.ramp)[None, :]).flatten().to(latents.device)  # fmt: skip
    pred_dtype, halo_dtype = _prediction_dtype(adapter, latents), _halo_dtype(adapter, latents)
    gather_mode = "torus" if grid.wrap else "zero"
    flat = latents.reshape(B, C, T, H * W)

    # The region policy: as configured, or (auto) the one that sends fewer bytes with this run's dtypes
    # and state (the scheduler's history measured on a one-cell copy, the caches' per-cell state).
    regions, owner = ctx.config.regions, None
    # Guidance split: a tile's two guidance branches may run on two ranks where that shortens a step
    branches = _guidance_branches(adapter, cond)
    split = ctx.config.split_guidance and ctx.config.rebalance and R > 1
    # CogVideoX/LTX-Video batch both branches in one forward: its halves may run on two ranks where they
    # give the batched prediction bit for bit (checked once on this run's first tile, by every rank), and
    # only where a split can shorten a step (tiles that do not divide evenly, or the cache's skips)
    ctx.guidance_halves = None
    batched = getattr(adapter, "batches_guidance", None)
    splittable = split and not branches and batched is not None and batched(cond)
    if (
        splittable
        and (tile_cache is not None or grid.num_tiles % R)
        and not _has_foreign_hooks(adapter.pipe.transformer)
    ):
        sigma = float(sigmas[begin]) if sigmas is not None else None
        adapter.begin_step(begin, timesteps[0], sigma, plan.num_inference_steps)
        ctx.guidance_halves = exact_guidance_halves(ctx, adapter, latents, cond, grid, timesteps[0])
        branches = ("cond", "uncond") if ctx.guidance_halves else ()
    split = split and len(branches) == 2
    # Fixed regions move no state; otherwise probe it (UniPC's latents are its predictor applied to its
    # history, so following regions rebuild them instead of sending them)
    probe = None if regions == "fixed" else probe_scheduler(adapter, scheduler, flat[..., :1].unsqueeze(-2), begin)
    rebuild = _rebuild_latents(scheduler) if probe is not None and probe.rebuilds_latents else None
    if regions == "auto":
        cell = B * C * T
        state_bytes = probe.state_bytes
        if tile_cache is not None:
            state_bytes += tile_cache_cell_bytes(tile_cache, flat[..., :1], pred_dtype)
        if step_cache is not None:
            state_bytes += cell * 4  # its fp32 residual
        sizes = (cell * latents.element_size(), state_bytes, cell * halo_dtype.itemsize, cell * pred_dtype.itemsize)
        branch_bytes = cell * _branch_dtype(adapter, pred_dtype).itemsize
        regions, owner = choose_regions(ctx.config, grid, R, len(timesteps), *sizes,
                                        latents_migrate=rebuild is None, cache=tile_cache, split=split,
                                        branch_cell_bytes=branch_bytes)  # fmt: skip
    ctx.regions = regions
    ctx.latents_rebuilt = rebuild is not None and regions == "follow"
    idle = idle_ranks_message(ctx.config, R, grid.num_tiles, split, adapter, cond)
    if me == 0 and idle is not None:
        warnings.warn(idle, stacklevel=2)
    layout = Layout.first(grid, R, len(timesteps), regions, ctx.config.rebalance, owner)
    x = flat[..., layout.cells(me).to(flat.device)].unsqueeze(-2).clone()  # (B, C, T, 1, K)
    if tile_cache is not None:
        tile_cache.start_cells(x[..., 0, :], pred_dtype)

    for i, t in enumerate(timesteps):
        ctx.stats.per_step.append({})
        sigma = float(sigmas[begin + i]) if sigmas is not None else None
        adapter.begin_step(begin + i, t, sigma, plan.num_inference_steps)
        if step_cache is not None and not step_cache.computes(i):
            ctx.computed_tiles.append([0] * R)
            ctx.forwards.append([0] * R)
            eps = step_cache.reuse(x)
        else:
            windows = compute = None
            if tile_cache is not None:
                windows = _cache_windows(ctx, layout, x.device)
                compute, priority = tile_cache.plan_cells(i, len(timesteps), windows, with_priority=True)
                if ctx.config.fill_idle:
                    compute = fill_idle_slots(compute, priority, layout.home_rank, R, ctx.config.rebalance,
                                              branches=2 if split else 1)  # fmt: skip
            computer = computers(layout, compute, ctx.config.rebalance)
            helper = branch_helpers(layout, computer) if split else None
            ctx.computed_tiles.append(torch.bincount(computer[computer >= 0], minlength=R).tolist())
            ctx.forwards.append(forwards_per_rank(computer, helper, R, len(branches) or 1))
            values = _tile_predictions(ctx, adapter, layout, computer, x, t, cond, pred_dtype, halo_dtype, gather_mode,
                                       helper, branches)  # fmt: skip
            if tile_cache is not None:
                # a skipped tile costs no bytes: each owner rebuilds its cells' reused prediction, x + R
                for n in (~compute).nonzero().flatten().tolist():
                    if windows.cells[n].numel():
                        values[n] = tile_cache.reuse_cells(x[..., 0, :], windows.cells[n]).to(pred_dtype)
                computed = {n: v for n, v in values.items() if bool(compute[n])}
                tile_cache.record_cells(i, x[..., 0, :], windows, compute, computed)
            eps = _blend(layout, me, values, weight, x, pred_dtype)
        if step_cache is not None:
            step_cache.record(i, x, eps, grid.num_tiles)

        x_in = x
        with canvas_noise(scheduler, layout.cells(me), (H, W)):
            x = adapter.scheduler_step(scheduler, eps, t, x, step_index=begin + i, state=state, generator=generator)
        if tile_cache is not None:
            tile_cache.set_input_change(cell_abs_sum(x[..., 0, :] - x_in[..., 0, :]))
        del x_in

        if i + 1 < len(timesteps):
            new = Layout.at_step(grid, i + 1, R, previous=layout, regions=regions)
            if new.owner is not layout.owner:  # regions that follow the grid carry their state along
                history = _region_refs([scheduler], x)
                refs = history + _region_refs([state] + ([step_cache] if step_cache is not None else []), x)
                if tile_cache is not None:  # named explicitly: its maps are (K,), not latent-shaped
                    refs += [(tile_cache.__dict__, k) for k in tile_cache.cell_state()]
                # the latents of received cells from their received history (refs' first tensors)
                derive = partial(rebuild, history) if rebuild is not None else None
                moved = migrate(ctx, layout, new, [x] + [c[k] for c, k in refs], derive)
                x = moved[0]
                for (c, k), v in zip(refs, moved[1:]):
                    c[k] = v
            layout = new
        if progress_bar is not None:
            progress_bar.update()
    return _gather(ctx, layout, x, latents)


def _cache_windows(ctx: ParallelContext, layout: Layout, device):
    """The tile cache's view of this step: per tile, this rank's cells of the window (positions in its
    region tensors, window row-major, as :meth:`Layout.output_positions`), and the reduction that adds
    the ranks' partial window sums. The gate needs, per tile, a handful of window means (input change,
    mean |output|, accumulated change, gain, region motion; :meth:`supergen.cache.TileCache._window_sums`):
    each rank sums its own cells in float64 and one all-reduce of the ``(N + 1) x 11`` sums gives every
    rank the same numbers, so every rank takes the same skip decision (the one process divides the same
    float64 sums, so the decisions are the single-process ones unless a predicted change lies within
    ~1e-15 of its threshold). Two such reductions per step: the decision before the forwards, the gain
    after them (it needs the new predictions)."""
    from .cache import CellWindows

    me = ctx.rank
    local = layout.local_index(me)
    cells = [local[layout.windows[n][layout.output_positions(n, me)]].to(device) for n in range(layout.num_tiles)]
    return CellWindows(cells, layout.windows, reduce=lambda sums: _all_reduce_sum(ctx, sums))


def _all_reduce_sum(ctx: ParallelContext, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks (every rank gets the same result); the ring's bytes go to ``cache_stats``."""
    import torch.distributed as dist

    buf = t.to(_comm_device(ctx)).contiguous()
    dist.all_reduce(buf)
    ctx.stats.add("cache_stats", _ring_share(buf.numel() * buf.element_size(), ctx.world_size))
    return buf.to(t.device)


def _guidance_branches(adapter, cond) -> tuple[str, ...]:
    """The adapter's separately computed guidance branches (``()``: one forward per tile)."""
    choose = getattr(adapter, "guidance_branches", None)
    return () if choose is None else tuple(choose(cond))


def _tile_predictions(ctx, adapter, layout: Layout, computer, x, t, cond, pred_dtype, halo_dtype,
                      gather_mode, helper=None, branches=()) -> dict:  # fmt: skip
    """``{tile: prediction at this rank's cells of its window (B, C, T, cells)}`` for every computed tile
    covering this rank's cells (window row-major order of :meth:`Layout.output_positions`). Input
    halos travel in ``halo_dtype`` and land in the latents' dtype (:func:`_halo_dtype`). ``helper``
    (:func:`assign_branches`): a split tile's computer runs ``branches[0]``, its helper ``branches[1]``
    and sends it back (in the model's output dtype, ``pred_dtype`` for the adapters here), and the
    computer combines them (``adapter.guide``)."""
    me, R = ctx.rank, ctx.world_size
    B, C, T = x.shape[:3]
    H, W = layout.canvas_hw
    h, w = layout.tile_hw
    device = x.device
    local = layout.local_index(me)
    mine = (computer == me).nonzero().flatten()
    split = helper is not None and bool((helper >= 0).any())
    helper = helper if split else None

    # 1. Input halos: owners send the window cells of this step's computed tiles to their computers
    # (and to the ranks running a split tile's second branch).
    need = layout.needs(computer, helper)
    scratch = x.new_zeros((B, C, T, H * W))
    cells = layout.cells(me).to(device)
    scratch[..., cells] = x[..., 0, :]
    sends, recvs, places = {}, {}, []
    for q in range(R):
        if q == me:
            continue
        give = layout.input_cells(computer, me, q, need)
        take = layout.input_cells(computer, q, me, need)
        if give.numel():
            sends[q] = [x[..., 0, local[give].to(device)].to(halo_dtype).contiguous()]
        if take.numel():
            buf = x.new_empty((B, C, T, take.numel()), dtype=halo_dtype)
            recvs[q] = [buf]
            places.append((take.to(device), buf))
    _transfer(ctx, sends, recvs, "inputs")
    for idx, buf in places:
        scratch[..., idx] = buf.to(scratch.dtype)

    # 2. Forwards of this rank's tiles (cut from the scratch canvas, where every cell they read is set).
    canvas = scratch.view(B, C, T, H, W)
    forward = partial(_forward_tiles, adapter, layout, canvas, t, cond, gather_mode)
    pred = None
    if not split and mine.numel():
        pred = forward(mine).to(pred_dtype)
    elif split:
        whole, halves = mine[helper[mine] < 0], mine[helper[mine] >= 0]
        helping = (helper == me).nonzero().flatten()
        done = {}
        if whole.numel():
            done.update(zip(whole.tolist(), forward(whole).unbind(0)))
        first = forward(halves, branches[0]) if halves.numel() else None
        second = forward(helping, branches[1]) if helping.numel() else None
        # the second branches go back to their tiles' computers, in the model's output dtype (the
        # computer's own branch tells it), which combine them exactly as predict does
        sends, recvs, received = {}, {}, []
        for j, n in enumerate(helping.tolist()):
            sends.setdefault(int(computer[n]), []).append(second[j].contiguous())
        for n in halves.tolist():
            buf = torch.empty((B, C, T, h * w), dtype=first.dtype, device=device)
            recvs.setdefault(int(helper[n]), []).append(buf)
            received.append(buf)
        _transfer(ctx, sends, recvs, "branches")
        for j, n in enumerate(halves.tolist()):
            done[n] = adapter.guide({branches[0]: first[j], branches[1]: received[j]}, cond, t)
        if mine.numel():
            pred = torch.stack([done[n].to(pred_dtype) for n in mine.tolist()])
    del scratch, canvas, forward

    # 3. Predictions for other ranks' cells go to their owners, per tile in tile order.
    sends, recvs, values = {}, {}, {}
    for q in range(R):
        if q == me:
            continue
        if pred is not None:
            parts = []
            for j, n in enumerate(mine.tolist()):
                pos = layout.output_positions(n, q)
                if pos.numel():
                    parts.append(pred[j][..., pos.to(device)].contiguous())
            if parts:
                sends[q] = parts
        bufs = []
        for n in (computer == q).nonzero().flatten().tolist():
            pos = layout.output_positions(n, me)
            if pos.numel():
                buf = torch.empty((B, C, T, pos.numel()), dtype=pred_dtype, device=device)
                bufs.append(buf)
                values[n] = buf
        if bufs:
            recvs[q] = bufs
    _transfer(ctx, sends, recvs, "predictions")
    for j, n in enumerate(mine.tolist()):
        pos = layout.output_positions(n, me)
        if pos.numel():
            values[n] = pred[j][..., pos.to(device)]
    return values


def _forward_tiles(adapter, layout: Layout, canvas, t, cond, gather_mode, tiles, branch=None) -> torch.Tensor:
    """``(n, B, C, T, h * w)``: ``adapter.predict`` (or its guidance ``branch``) of ``tiles`` cut from
    ``canvas`` ``(B, C, T, H, W)``."""
    from .ops import halo_gather

    B, C, T, H, W = canvas.shape
    h, w = layout.tile_hw
    origins = layout.origins[tiles]
    cut = halo_gather(canvas, origins, (h, w), 0, gather_mode)
    if branch is None:
        out = adapter.predict(cut, t, cond, origins, (H, W))
    else:
        out = adapter.predict_branch(cut, t, cond, origins, (H, W), branch)
    return out.reshape(tiles.numel(), B, C, T, h * w)


def _blend(layout: Layout, me: int, values: dict, weight, x, pred_dtype) -> torch.Tensor:
    """This step's fused prediction ``(B, C, T, 1, K)`` for this rank's cells: every tile covering them
    (``values[n]``, as :func:`_tile_predictions` returns), in tile order, as blend_scatter does."""
    B, C, T, _, K = x.shape
    device = x.device
    local = layout.local_index(me)
    acc = torch.zeros((B, C, T, K), dtype=torch.float32, device=device)
    wsum = torch.zeros((K,), dtype=torch.float32, device=device)
    for n in range(layout.num_tiles):
        pos = layout.output_positions(n, me)
        if not pos.numel():
            continue
        pos_d = pos.to(device)
        idx = local[layout.windows[n][pos]].to(device)
        wgt = weight[pos_d]
        acc.index_add_(-1, idx, values[n].float() * wgt)
        wsum.index_add_(0, idx, wgt)
    eps = torch.where(wsum > 0, acc / wsum.clamp(min=torch.finfo(torch.float32).tiny), acc)
    return eps.to(pred_dtype).unsqueeze(-2)


def _gather(ctx: ParallelContext, layout: Layout, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The refined canvas on rank 0 (every rank sends its region once, after the loop); ``None`` elsewhere."""
    me, R = ctx.rank, ctx.world_size
    B, C, T, H, W = like.shape
    if me != 0:
        ctx.stats.final_gather = _transfer(ctx, {0: [x.contiguous()]}, {}, None)
        return None
    out = x.new_empty((B, C, T, H * W))
    out[..., layout.cells(0).to(x.device)] = x[..., 0, :]
    recvs, places = {}, []
    for q in range(1, R):
        cells = layout.cells(q)
        if cells.numel():
            buf = x.new_empty((B, C, T, 1, cells.numel()))
            recvs[q] = [buf]
            places.append((cells.to(x.device), buf))
    _transfer(ctx, {}, recvs, None)
    for cells, buf in places:
        out[..., cells] = buf[..., 0, :]
    return out.view(B, C, T, H, W)


def region_similarity(ctx: ParallelContext, residuals: list) -> torch.Tensor:
    """Step Rehash's ``(S, S)`` similarity map (:func:`supergen.cache.step_similarity`) from the ranks'
    regions of every step's residual: the float64 Gram matrix of the regions, summed over the ranks (an
    all-reduce of ``S * S`` numbers, after the calibration loop), then normalised. The residuals kept by
    the loop have migrated with the regions, so each rank's pieces cover the same cells."""
    import torch.distributed as dist

    if not residuals:
        raise ValueError("`residuals` must hold at least one step.")
    flat = torch.stack([r.detach().reshape(-1).to("cpu", torch.float64) for r in residuals])
    gram = (flat @ flat.T).to(_comm_device(ctx))
    dist.all_reduce(gram)
    gram = gram.cpu()
    norm = gram.diagonal().sqrt().clamp_min(1e-30)
    return (gram / (norm[:, None] * norm[None, :])).clamp(-1.0, 1.0).float()


# --------------------------------------------------------------------------------------------------
# The VAE at canvas size, in blocks of VAE tiles
# --------------------------------------------------------------------------------------------------


class VaeBlocks(NamedTuple):
    """How the ranks share the VAE at canvas size: a ``grid`` of row bands x column bands of whole VAE
    tiles; rank ``r`` keeps the latent cells ``kept[r] = ((a, b), (c, d))`` (rows ``[a, b)``, columns
    ``[c, d)``) and decodes (encodes) them from the cells ``inputs[r]``; ``cost``: the busiest rank's
    decoded tile area over the whole decode's (1.0 = no gain)."""

    grid: tuple
    kept: list
    inputs: list
    cost: float


def _axis_cost(length: int, tile: int, stride: int) -> int:
    """Cells along one axis that a tiled decode of ``length`` cells decodes (tiles every ``stride`` from 0,
    each ``tile`` long or cut at the end)."""
    return sum(min(tile, length - t) for t in range(0, length, stride))


def _axis_bands(size: int, tile: int, stride: int, most: int, strict: bool) -> dict:
    """For ``k`` = 1 .. ``most`` bands of whole tiles along one axis: ``{k: (cells, bands)}``, the least
    busiest band's decoded cells and its bands ``[((a, b), (lo, hi)), ...]`` (kept, decoded), by dynamic
    programming over the tile starts. ``strict``: every band's decode spans more than one tile along
    this axis (so that it is tiled whatever the other axis). More than one band needs ``2 stride >= tile``."""
    starts = list(range(0, size, stride))
    n = len(starts)

    def band(p: int, q: int):
        a, b = starts[p], starts[q] if q < n else size
        lo = a - stride if p > 0 else 0
        hi = min(size, b - stride + tile) if q < n else size
        return (a, b), (lo, hi)

    def cost(p: int, q: int):
        _, (lo, hi) = band(p, q)
        return math.inf if strict and not hi - lo > tile else _axis_cost(hi - lo, tile, stride)

    most = min(most, n) if stride >= 1 and 2 * stride >= tile else 1
    costs = {(p, q): cost(p, q) for q in range(1, n + 1) for p in range(q)}
    best = [[math.inf] * (n + 1) for _ in range(most + 1)]  # best[k][q]: first q tiles in k bands
    cut = [[0] * (n + 1) for _ in range(most + 1)]  # where the last of those k bands begins
    best[0][0] = 0
    for k in range(1, most + 1):
        for q in range(1, n + 1):
            for p in range(q):
                c = max(best[k - 1][p], costs[p, q])
                if c < best[k][q]:
                    best[k][q], cut[k][q] = c, p
    out = {}
    for k in range(1, most + 1):
        if best[k][n] < math.inf:
            groups, q = [], n
            for kk in range(k, 0, -1):
                groups.append(band(cut[kk][q], q))
                q = cut[kk][q]
            out[k] = (best[k][n], groups[::-1])
    return out


def plan_vae_blocks(hw, geometry, world: int, grids=None) -> VaeBlocks | None:
    """Split the VAE's work on a ``hw`` latent into at most ``world`` blocks of whole VAE tiles whose
    decodes (encodes) give, cropped, exactly the whole one (``None`` where no split does, or one block would).

    diffusers' tiled VAEs start a tile every ``stride`` cells from 0, decode each and blend it with the
    (already blended) tile above and the one to its left over ``tile - stride`` cells, then keep its
    first ``stride`` cells. So a band that keeps the tiles starting in ``[a, b)`` (``a``, ``b`` multiples
    of ``stride``) decodes from one tile before ``a`` (the tile its first tile blends with, which itself
    lacks its own neighbour before it: that changes only its first ``tile - stride`` cells, and the blend
    reads its last ones, disjoint where ``2 stride >= tile``) to the end of the tile starting at
    ``b - stride``; the tiles of that local decode sit where the whole decode's do, and the blends act
    along one axis at a time, so row bands and column bands cut together (blocks, the corner tile
    before included) as well. Of the grids of ``kr x kc <= world`` blocks (``grids``: the ones to
    consider), the one whose busiest block decodes the least tile area, then the fewest blocks; each
    block's decode must itself be tiled (more than one tile along one of its axes).
    ``geometry``: :meth:`ModelAdapter.vae_tile_geometry`.
    """
    if geometry is None or world < 2:
        return None
    sizes = tuple(int(v) for v in hw)
    if not any(size > tile for size, (tile, _) in zip(sizes, geometry)):
        return None  # the VAE decodes this canvas in one piece
    axes = [
        {strict: _axis_bands(size, *g, world, strict) for strict in (False, True)} for size, g in zip(sizes, geometry)
    ]
    whole = [_axis_cost(size, *g) for size, g in zip(sizes, geometry)]
    best = None
    for kr in range(1, world + 1):
        for kc in range(1, world // kr + 1):
            if kr * kc < 2 or (grids is not None and (kr, kc) not in grids):
                continue
            for strict_rows in (True, False):  # every block tiled along its rows, or else its columns
                rows, cols = axes[0][strict_rows].get(kr), axes[1][not strict_rows].get(kc)
                if rows is None or cols is None:
                    continue
                share = rows[0] / whole[0] * cols[0] / whole[1]
                if best is None or (share, kr * kc) < (best.cost, len(best.kept)):
                    kept = [(r[0], c[0]) for r in rows[1] for c in cols[1]]
                    inputs = [(r[1], c[1]) for r in rows[1] for c in cols[1]]
                    best = VaeBlocks((kr, kc), kept, inputs, share)
    return best


def _block(t: torch.Tensor, cells, scale: int = 1, origin=(0, 0)) -> torch.Tensor:
    """``t[..., rows, cols]`` for latent cells ``((a, b), (c, d))`` measured from ``origin``, times ``scale``."""
    (a, b), (c, d) = cells
    return t[..., (a - origin[0]) * scale : (b - origin[0]) * scale, (c - origin[1]) * scale : (d - origin[1]) * scale]


def vae_blocks_exact(adapter) -> bool:
    """Whether this VAE's tiled decode and encode cut in blocks (:func:`plan_vae_blocks`) give the whole
    one bit for bit here: checked once per adapter on one-frame probes (row bands, column bands and 2 x 2
    blocks, three tiles along a cut axis), as the scheduler's latent rebuild is. The blocks rest on how diffusers'
    tiled VAEs lay out and blend their tiles (tested for each family on the version supergen pins); a
    VAE that does otherwise, or kernels that are not deterministic, fail the probe and the ranks fall
    back to the whole decode on rank 0 (and the whole encode on every rank)."""
    verdict = getattr(adapter, "_supergen_vae_blocks_exact", None)
    if verdict is not None:
        return verdict
    geometry, verdict = adapter.vae_tile_geometry(), False
    if geometry is not None:
        verdict, g = True, torch.Generator().manual_seed(0)
        device = adapter.pipe._execution_device
        (th, sh), (tw, sw) = geometry
        for grid in ((2, 1), (1, 2), (2, 2)):  # three tiles along a cut axis, two along the other
            hw = (2 * sh + th if grid[0] > 1 else th + sh, 2 * sw + tw if grid[1] > 1 else tw + sw)
            plan = plan_vae_blocks(hw, geometry, grid[0] * grid[1], grids={grid})
            if plan is None:
                verdict = False
                break
            latent = torch.randn(1, adapter.spec.latent_channels, 1, *hw, generator=g).to(device)
            z, args = adapter.vae_inputs(latent)
            whole = adapter.vae_decode(z, *args)
            pixels = whole.clamp(-1.0, 1.0)
            encoded = adapter.encode(pixels, None)
            scale = adapter.spec.vae_scale[1]
            for i, cells in enumerate(plan.kept):
                if not (
                    torch.equal(decode_block(adapter, z, args, plan, i), _block(whole, cells, scale))
                    and torch.equal(encode_block(adapter, pixels, plan, i), _block(encoded, cells))
                ):
                    verdict = False
            if not verdict:
                break
    adapter._supergen_vae_blocks_exact = verdict
    return verdict


def _plan_vae_blocks(ctx: ParallelContext, adapter, hw) -> VaeBlocks | None:
    """The blocks every rank uses for the VAE at canvas size ``hw``, or ``None`` (no split, or the probe
    failed on some rank: :func:`vae_blocks_exact`, its verdicts all-reduced so that the ranks agree)."""
    import torch.distributed as dist

    plan = plan_vae_blocks(hw, adapter.vae_tile_geometry(), ctx.world_size)
    if plan is None:
        return None
    verdict = torch.tensor([int(vae_blocks_exact(adapter))], device=_comm_device(ctx))
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
    return plan if int(verdict) else None


def decode_block(adapter, z: torch.Tensor, args: tuple, plan: VaeBlocks, index: int) -> torch.Tensor:
    """Pixels of block ``index`` of ``plan``: the VAE's tiled decode of its input cells, cropped to the
    cells it keeps (the same pixels as the whole decode's there)."""
    inputs, scale = plan.inputs[index], adapter.spec.vae_scale[1]
    pixels = adapter.vae_decode(_block(z, inputs).contiguous(), *args)
    return _block(pixels, plan.kept[index], scale, origin=(inputs[0][0], inputs[1][0]))


def encode_block(adapter, pixels: torch.Tensor, plan: VaeBlocks, index: int) -> torch.Tensor:
    """The normalised latent of block ``index`` of ``plan`` (in latent cells): the VAE's tiled encode of its
    input pixels (posterior mode), cropped to the cells it keeps. A tiled encode has the decode's layout
    (pixel tiles every ``stride`` cells' worth, blended with the one above and to the left in latent
    space), so the same blocks give the whole encode's latent there."""
    inputs, scale = plan.inputs[index], adapter.spec.vae_scale[1]
    latent = adapter.encode(_block(pixels, inputs, scale).contiguous(), None)
    return _block(latent, plan.kept[index], origin=(inputs[0][0], inputs[1][0]))


def encode_in_blocks(ctx: ParallelContext, adapter, pixels: torch.Tensor) -> torch.Tensor:
    """The upscale's encode shared by the ranks: every rank holds the upscaled ``pixels`` (``(B, 3, F, H,
    W)``, the same on all), encodes a block of whole VAE tiles (:func:`plan_vae_blocks` on the canvas
    latent, :func:`encode_block`) and sends it to every other rank, so every rank returns the whole latent
    of the one-process encode (posterior mode) for its block's share of the time. Where no split applies
    every rank encodes the whole. Bytes: ``ctx.stats.encode_exchange`` (what this rank sent)."""
    scale = adapter.spec.vae_scale[1]
    hw = (pixels.shape[-2] // scale, pixels.shape[-1] // scale)
    plan = _plan_vae_blocks(ctx, adapter, hw)
    ctx.encode_plan = plan
    if plan is None:
        return adapter.encode(pixels, None)
    me = ctx.rank
    mine = encode_block(adapter, pixels, plan, me).contiguous() if me < len(plan.kept) else None
    if len(plan.kept) < ctx.world_size:  # ranks without a block learn its shape and dtype from rank 0's
        shape, dtype = _broadcast_layout(ctx, mine if me == 0 else None, "latent block")
    else:
        shape, dtype = mine.shape, mine.dtype
    latent = torch.empty((*shape[:-2], *hw), dtype=dtype, device=pixels.device)
    places = {r: _block(latent, cells) for r, cells in enumerate(plan.kept)}
    if mine is not None:
        places.pop(me).copy_(mine)
    sends = {q: [mine] for q in range(ctx.world_size) if q != me} if mine is not None else {}
    ctx.stats.encode_exchange = _transfer(ctx, sends, {r: [t] for r, t in places.items()}, None)
    return latent


def decode_in_blocks(ctx: ParallelContext, adapter, latents: torch.Tensor | None) -> torch.Tensor | None:
    """The final decode shared by the ranks: rank 0's refined latent (``None`` on the others) is
    broadcast, every rank runs the pipeline's pre-decode arithmetic on it (:meth:`ModelAdapter.vae_inputs`),
    decodes its block of whole VAE tiles (:func:`plan_vae_blocks`) and sends the pixels to rank 0, which
    returns the video (the others ``None``): the pixels of the one-process decode, at the busiest block's
    share of its time. Where no split applies (an unknown VAE tiling, a canvas of one VAE tile), rank 0
    decodes alone (and nothing is broadcast). Bytes: ``ctx.stats.decode_broadcast`` (rank 0) and
    ``decode_gather`` (each sender)."""
    layout = _broadcast_layout(ctx, latents, "latent")  # the plan needs only the canvas size
    plan = _plan_vae_blocks(ctx, adapter, layout[0][-2:])
    ctx.decode_plan = plan
    if plan is None:
        return adapter.decode(latents) if ctx.rank == 0 else None
    latents = _broadcast_from_rank0(ctx, latents, "latent", layout).to(adapter.pipe._execution_device)
    if ctx.rank == 0:
        ctx.stats.decode_broadcast = latents.numel() * latents.element_size()
    z, args = adapter.vae_inputs(latents)
    mine = decode_block(adapter, z, args, plan, ctx.rank) if ctx.rank < len(plan.kept) else None
    if ctx.rank != 0:
        if mine is not None:
            ctx.stats.decode_gather = _transfer(ctx, {0: [mine.contiguous()]}, {}, None)
        return None
    scale = adapter.spec.vae_scale[1]
    video = mine.new_empty((*mine.shape[:-2], z.shape[-2] * scale, z.shape[-1] * scale))
    recvs = {r: [_block(video, cells, scale)] for r, cells in enumerate(plan.kept)}
    recvs.pop(0)[0].copy_(mine)
    _transfer(ctx, {}, recvs, None)
    return video
