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
  activations inside every layer (Ulysses' all-to-all or ring attention's key/value rotation: gigabytes
  per forward at real sizes, ``bench/parallel.py``), the one traffic of a run that is inside a forward,
  and its latent is the one process's only where the kernels give a token the same bits in a shard of
  the sequence as in the whole (Ulysses on the CPU in the tests; not promised on a GPU; ring merges the
  shards' partial outputs, so rounds differently; supergen's attention backend runs either, ring with
  its kernel's log-sum-exp). Where it fits (models with a context-parallel plan: Wan, and LTX-Video with ring
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

Modules, in import order (each imports only those above it):

* ``group``: the process group, :class:`ParallelContext` and its byte counts, broadcasts from rank 0,
  batched point-to-point transfers, the start-up checks;
* ``sketch``: stage 1 shared (broadcast, heartbeat, guidance split, context parallelism);
* ``assign``: rebalancing (which rank computes which tile or guidance branch);
* ``geometry``: regions, windows and counted bytes, with no process group (``bench/parallel.py`` uses it);
* ``state``: region-shaped scheduler and cache state (migration, rebuilt latents, canvas noise);
* ``refine``: the distributed refine loop;
* ``vae``: the VAE at canvas size in blocks of VAE tiles.

Everything a caller needs is importable from ``supergen.parallel`` itself.
"""

from .assign import assign_branches, assign_tiles, fill_idle_slots, forwards_per_rank
from .geometry import (
    GATE_SHARE,
    SKIP_DRAWS,
    Layout,
    branch_helpers,
    choose_regions,
    computers,
    count_regions,
    exchange_bytes,
    fixed_owner,
    home_ranks,
    home_tiles,
    random_skips,
    tile_cache_cell_bytes,
    window_cells,
    window_sums_bytes,
)
from .group import ExchangeStats, ParallelContext, agree_on_canvas, check_same_config, setup
from .refine import exact_guidance_halves, idle_ranks_message, refine_regions, region_similarity
from .sketch import (
    SketchBatchSplit,
    SketchContextParallel,
    SketchGuidanceSplit,
    SketchHeartbeat,
    accelerator_count,
    check_sketch_context,
    share_sketch,
    sketch_context_split,
    sketch_waiters_group,
    wait_for_sketch,
)
from .state import SchedulerProbe, canvas_noise, migrate, probe_scheduler
from .vae import (
    VaeBlocks,
    decode_block,
    decode_in_blocks,
    encode_block,
    encode_in_blocks,
    plan_vae_blocks,
    vae_blocks_exact,
)

__all__ = [
    "ExchangeStats",
    "GATE_SHARE",
    "Layout",
    "ParallelContext",
    "SKIP_DRAWS",
    "SchedulerProbe",
    "SketchBatchSplit",
    "SketchContextParallel",
    "SketchGuidanceSplit",
    "SketchHeartbeat",
    "VaeBlocks",
    "accelerator_count",
    "agree_on_canvas",
    "assign_branches",
    "assign_tiles",
    "branch_helpers",
    "canvas_noise",
    "check_same_config",
    "check_sketch_context",
    "choose_regions",
    "computers",
    "count_regions",
    "decode_block",
    "decode_in_blocks",
    "encode_block",
    "encode_in_blocks",
    "exact_guidance_halves",
    "exchange_bytes",
    "fill_idle_slots",
    "fixed_owner",
    "forwards_per_rank",
    "home_ranks",
    "home_tiles",
    "idle_ranks_message",
    "migrate",
    "plan_vae_blocks",
    "probe_scheduler",
    "random_skips",
    "refine_regions",
    "region_similarity",
    "setup",
    "share_sketch",
    "sketch_context_split",
    "sketch_waiters_group",
    "tile_cache_cell_bytes",
    "vae_blocks_exact",
    "wait_for_sketch",
    "window_cells",
    "window_sums_bytes",
]
