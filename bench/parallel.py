"""Tile-parallel traffic benchmark: bytes each rank sends per refinement step with supergen's exchange
(halos, predictions and, with regions that follow the grid, region migration: :mod:`supergen.parallel`)
against an all-gather of every tile prediction (the published design: each rank keeps the whole canvas
and receives every tile prediction), and the load imbalance of computed tiles with the cache on.
Counted, not timed: the numbers come from the same geometry code the runtime moves its tensors with
(``Layout``, ``computers``, ``exchange_bytes``; tests/test_parallel.py checks that the ranks send
exactly what ``exchange_bytes`` predicts), so no GPU or process group is needed.

Geometries (``--geometry``; canvases 2K = 1440x2560 px = latent 180x320 and 4K = 2160x3840 px = latent
270x480; 16 latent channels, patch 2, batch 1, 50 steps):

* ``720p``: the published runs' geometry: 720p tiles (90x160 latent; Wan 2.1 14B 720P, HunyuanVideo,
  CogVideoX 1.5), so 2K is 2x2 tiles and 4K 3x3, 41 frames = 11 latent frames, the last 45 steps refined;
* ``480p``: Wan 2.1 1.3B's native 60x104 tiles, which do not divide either canvas (overlapping torus
  windows: 12 tiles on 2K, 25 on 4K), 81 frames = 21 latent frames, the last 35 steps refined (Wan's 70 %).

Tilings (``--tiling``): ``default`` (``TilingConfig()``: torus windows shifted every step, each axis
sweeping its tile in at most 16 steps, 3-5 patches per step on these tiles) and ``sweep``
(``TilingConfig(shift_period=refine_steps)``: the same windows drifting one sweep of each tile over the
refinement, the slowest drift that still crosses every band of an axis: 1-2 patches per step). Following
regions carry a strip as wide as the drift across every boundary each step, so the drift sets their bytes.
Scheduler: UniPC (Wan's), whose multistep history is 3 region-shaped tensors (2 model outputs + the
last sample); its latents are its predictor applied to them, so they do not migrate (the receiver
rebuilds them: ``parallel.probe_scheduler``) and 3 tensors move per cell; the ``*_euler`` columns
count a history-free scheduler (FlowMatchEuler, HunyuanVideo's and LTX-Video's; CogVideoX's DDIM likewise
carries none), whose latents migrate.

Both region policies (``ParallelConfig.regions``), each row holding one dict per policy: ``fixed``
(regions stay, shifted tiles straddle boundaries and exchange halos and predictions) and ``follow``
(regions move with the grid, carrying every state tensor across each boundary every step); ``auto`` (the
default) is the one ``parallel.choose_regions`` picks, counted before the loop with every tile computed
or, with the cache, on seeded random skip patterns at its budget (``parallel.random_skips``: the run
cannot know the real ones; the rows' cache columns use the smooth field below, so ``auto`` can miss).

Two dtype settings: ``ratio`` is everything in fp32 (an fp32 model); ``ratio_bf16`` is a bf16 model as
diffusers runs Wan: latents and scheduler/cache state in fp32, predictions in bf16, input halos in bf16
(the Wan adapter's ``predict`` casts its tiles first, so the runtime sends them so), and the baseline's
all-gathered predictions in bf16 (half the fp32 bytes).

Baseline bytes per rank per step (the issue's, primary ``ratio``): ring all-gather of all N tile
predictions, ``(R-1)/R * N * tile`` (what every rank receives and, in a ring, sends). Ours: the busiest
rank's bytes, averaged over the steps.

Secondary, what the published code actually sends (``published_bytes_per_rank_step``, ``ratio_published``;
docs: reference/supergen-method.md sections 1.6 and 6): one all-gather of a flat buffer PADDED to
``ceil(N/R)`` tiles per rank, ``(R-1) * ceil(N/R) * tile`` per rank in a ring, plus an all-gather of the
latent before every shift step (every refinement step shifts), counted as the same padded per-tile
buffer, so twice that per step. Rebalancing (off by default there) would add an all-gather of every
cache buffer; not counted.

Cache on: a simulated skip pattern, ``budget`` policy with budget 0.5 (the cache mode meant for
balancing across ranks): the first 3 steps (warm-up) and the last step compute every tile, the other
steps the half of the tiles with the largest simulated predicted change, a smooth random field over
the canvas (3 low-frequency waves, seed 0) drifting over the steps, averaged over each tile window.
The skip pattern is simulated (no model runs here); its bytes (``ratio_cache``) are the runtime's
accounting of the cache path: the tile cache's region state (measured from ``TileCache.cell_state`` on
a one-cell holder) migrates with each cell changing owner, and the window-sum all-reduces (one per
step, two on steps where the cache decides) are added (tests/test_parallel.py checks this accounting
against real cache-on runs).
Imbalance = max / mean computed tiles per rank, averaged over the steps (and the worst step), with
rebalancing (LPT) and the runtime's default ``fill_idle`` (ranks with fewer tiles than the busiest
compute the skipped tiles the cache ranks next, their own first: :func:`supergen.parallel.fill_idle_slots`).
``*_no_fill``: the single-process decisions as they are; ``imbalance_floor_no_fill``: the best any
assignment of those whole tiles can do, ``ceil(C/R) / (C/R)`` (granularity, not heuristic);
``*_no_fill_no_rebalance``: every tile on its home rank. Filling never adds a forward to the busiest
rank (asserted), so the step takes as long either way and ``computed_share_cache`` vs
``computed_share_cache_no_fill`` is what filling buys: fewer reused tiles.

Guidance split (``ParallelConfig.split_guidance``, on by default for adapters that run classifier-free
guidance as two forwards per tile: Wan, HunyuanVideo with true CFG): a rank above ``ceil(2C/R)`` forwards
hands the unconditional forward of a tile to a rank with a free slot, which receives that tile's input and sends
its output back (:func:`supergen.parallel.assign_branches`). ``*_split`` columns count it for the UniPC
(Wan) settings: ``ratio_split*`` with every tile computed, ``ratio_cache_split`` with the cache (idle
slots then counted in forwards: ``fill_idle_slots(branches=2)``), ``imbalance_cache_split`` = max / mean
forwards per rank, and ``busiest_rank_forwards_per_run`` (whole tiles, two forwards each) vs
``busiest_rank_forwards_per_run_split``: the step time it saves (asserted never longer). It changes
nothing where whole tiles already divide evenly.

The whole run in native-size forwards (a sketch forward is a tile's size), cache on:
``run_forwards_busiest_rank`` = stage 1 (all 50 steps, two forwards each, on rank 0; with the split one
each on ranks 0 and 1, plus a first step on both: 51) + the busiest rank's refinement forwards, for one
process, whole tiles and the split, and ``tiles_split``: the sketch on rank 0, the tiles split (CogVideoX and
LTX-Video with ``separate_guidance`` where their batched sketch call does not split exactly: a half batch
not bit for bit a slice of the whole; where it does, their sketch takes one forward more than ``split``'s);
``run_speedup_*`` = one process / that: the wall-time speed-up the forward count allows (VAE, transfers and
the text encoder not counted). ``context_ideal``: the sketch under ``ParallelConfig(sketch_context=...)``
with Wan's two-call guidance: the ranks split in two halves, each computing one call of every guidance pair
(the first pair both) with its tokens split over its R / 2 ranks, counted as ``51 / (R / 2)`` forwards (an
upper bound: the all-to-all or ring transfers inside every layer take no time in it), with the tiles split;
``sketch_context_bytes_per_rank`` counts those transfers' bytes (:func:`sketch_context_bytes`).

The ``summary`` holds, per geometry and tiling, each setting's worst share over canvases and ranks under
``auto`` and whether all meet the targets (<= 10 % of the all-gather; imbalance <= 1.15).

Usage: ``python bench/parallel.py [--geometry 720p 480p] [--tiling default sweep] [--out PATH]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, environment, print_table, write_json  # noqa: E402

from supergen import parallel as par  # noqa: E402
from supergen.cache import CacheConfig, TileCache  # noqa: E402
from supergen.config import ParallelConfig, TilingConfig  # noqa: E402
from supergen.tiling import TileGrid  # noqa: E402

CANVASES = {"2K": (180, 320), "4K": (270, 480)}  # latent cells (pixels / 8)
PATCH = (2, 2)
CHANNELS, BATCH, ELEMENT = 16, 1, 4
STEPS = 50


@dataclass(frozen=True)
class Geometry:
    """One model geometry: native latent tile, latent frames and refined steps (of ``STEPS``)."""

    name: str
    model: str
    tile: tuple[int, int]
    frames: int
    refine_steps: int
    hidden: int  # the transformer's width and depth: what a context-parallel sketch moves inside its layers
    layers: int


GEOMETRIES = (
    # The published runs: 720p tiles on 2K (2x2) and 4K (3x3), 41 frames, the last 45 of 50 steps refined.
    Geometry("720p", "720p tiles as in the published runs (Wan 2.1 14B 720P, HunyuanVideo, CogVideoX 1.5): "
             "90x160 latent, 41 frames = 11 latent frames, the last 45 of 50 steps refined; Wan 2.1 14B's 40 layers "
             "of width 5120", (90, 160), 11, 45, 5120, 40),
    # Wan 2.1 1.3B's native size: overlapping torus windows on both canvases (320/104, 270/60 do not divide).
    Geometry("480p", "Wan 2.1 480p (1.3B): 60x104 latent, 81 frames = 21 latent frames, the last 35 of 50 "
             "steps refined (Wan's 70 %); 30 layers of width 1536", (60, 104), 21, 35, 1536, 30),
)  # fmt: skip
# The tile grid: the default, and one sweep of each tile over the refinement (the grid's slowest drift that
# still crosses every band of an axis: shift_period = the refined steps, so the state crossing a boundary
# per step is a patch or two wide instead of three to five).
TILINGS = {"default": lambda g: TilingConfig(), "sweep": lambda g: TilingConfig(shift_period=g.refine_steps)}
RANKS = (2, 4, 8)
UNIPC_STATE = 3  # 2 model outputs + last sample; the latents are rebuilt from them on receipt
BUDGET, WARMUP, SEED = 0.5, 3, 0
TARGET_RATIO, TARGET_IMBALANCE = 0.10, 1.15
REGIONS = ("fixed", "follow")  # ParallelConfig.regions, counted both; "auto" (the default) picks per setting
COLUMNS = ("ratio", "ratio_bf16", "ratio_euler", "ratio_euler_bf16", "ratio_cache", "ratio_cache_bf16",
           "ratio_published", "imbalance_cache", "imbalance_cache_worst_step", "imbalance_cache_no_fill",
           "imbalance_floor_no_fill", "computed_share_cache", "computed_share_cache_no_fill", "ratio_split",
           "ratio_split_bf16", "ratio_cache_split", "imbalance_cache_split")  # fmt: skip


def change_field(canvas_hw, step: int) -> torch.Tensor:
    """A smooth positive (H, W) field of simulated per-cell predicted change, drifting with ``step``."""
    H, W = canvas_hw
    g = torch.Generator().manual_seed(SEED)
    ys = torch.arange(H, dtype=torch.float64)[:, None] / H
    xs = torch.arange(W, dtype=torch.float64)[None, :] / W
    field = torch.zeros(H, W, dtype=torch.float64)
    for _ in range(3):
        fy, fx = (torch.randint(1, 3, (2,), generator=g)).tolist()
        phase, drift = (torch.rand(2, generator=g) * 2 * math.pi).tolist()
        field += torch.sin(2 * math.pi * (fy * ys + fx * xs) + phase + 0.15 * step * math.cos(drift))
    return field - field.min() + 0.1


def simulated_compute(layout, step: int, refine_steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) bool: the budget policy's computed tiles on the simulated change field, and the change
    (the priority idle ranks fill by; ``None`` on steps that compute every tile)."""
    N = layout.num_tiles
    if step < WARMUP or step == refine_steps - 1:
        return torch.ones(N, dtype=torch.bool), None
    field = change_field(layout.canvas_hw, step).flatten()
    change = torch.stack([field[layout.windows[n]].mean() for n in range(N)])
    compute = torch.zeros(N, dtype=torch.bool)
    compute[torch.argsort(change, descending=True, stable=True)[: math.ceil(BUDGET * N)]] = True
    return compute, change


def layouts_for(grid, world: int, regions: str, refine_steps: int) -> list:
    """The runtime's layout of every refinement step under ``regions`` (``ParallelConfig.regions``)."""
    layouts = [par.Layout.first(grid, world, refine_steps, regions)]
    for i in range(1, refine_steps):
        layouts.append(par.Layout.at_step(grid, i, world, previous=layouts[-1], regions=regions))
    return layouts


def count(layouts, world: int, cache, cache_cells: dict, cell: int) -> dict:
    """Bytes per step (max over ranks, mean over steps) of one region policy, by dtype setting and
    scheduler, with and without the simulated cache; imbalance and computed share with the cache.
    ``cell``: one fp32 latent-shaped cell, ``B * C * T * 4`` bytes."""
    half = cell // 2  # the same in bf16
    # fp32: everything fp32. bf16: a bf16 model with fp32 latents and scheduler/cache state (as diffusers'
    # Wan pipeline keeps them): predictions travel in bf16, input halos too (the Wan adapter casts first).
    dtypes = {"fp32": {}, "bf16": {"halo_cell_bytes": half, "prediction_cell_bytes": half}}
    sums = {k: [] for k in ("fp32", "bf16", "euler", "euler_bf16", "cache", "cache_bf16", "cache_no_fill",
                            "split", "split_bf16", "cache_split", "cache_split_bf16")}  # fmt: skip
    kinds = {"inputs": [], "predictions": [], "migration": []}
    imbalance, computed_share, busiest = ({"fill": [], "no_fill": [], "split": []} for _ in range(3))
    imbalance_home, floor, one_process = [], [], []
    for i, layout in enumerate(layouts):
        nxt = layouts[i + 1] if i + 1 < len(layouts) else None
        every = par.computers(layout, None, rebalance=True)
        for key, sizes in dtypes.items():
            sent = par.exchange_bytes(layout, every, cell, nxt, state_tensors=UNIPC_STATE, **sizes)
            sums[key].append(int(sum(sent.values()).max()))
            if key == "fp32":
                for k in kinds:
                    kinds[k].append(float(sent[k].float().mean()))
        # Wan's classifier-free guidance as two forwards per tile, split across ranks where that shortens
        # the step (ParallelConfig.split_guidance): the second branches' inputs and outputs travel too
        helper = par.branch_helpers(layout, every)
        for key, sizes in dtypes.items():
            sent = par.exchange_bytes(layout, every, cell, nxt, state_tensors=UNIPC_STATE, helper=helper, **sizes)
            sums["split" + ("_bf16" if key == "bf16" else "")].append(int(sum(sent.values()).max()))
        sums["euler"].append(int(sum(par.exchange_bytes(layout, every, cell, nxt).values()).max()))
        euler_bf16 = par.exchange_bytes(layout, every, cell, nxt, **dtypes["bf16"])
        sums["euler_bf16"].append(int(sum(euler_bf16.values()).max()))

        reductions = 1 + cache.decides(i, len(layouts))  # the gain every step, the decision where it decides
        compute, change = simulated_compute(layout, i, len(layouts))
        filled = par.fill_idle_slots(compute, change, layout.home_rank, world)  # ParallelConfig.fill_idle
        one_process.append(2 * int(compute.sum()))  # the single process computes the cache's own decisions
        for key, decided in (("fill", filled), ("no_fill", compute)):
            computed_share[key].append(float(decided.float().mean()))
            cached = par.computers(layout, decided, rebalance=True)
            for setting, sizes in dtypes.items():
                if key == "no_fill" and setting == "bf16":
                    continue
                sent = par.exchange_bytes(layout, cached, cell, nxt, state_tensors=UNIPC_STATE,
                                          cache_cell_bytes=cache_cells[setting], cache_reductions=reductions,
                                          **sizes)  # fmt: skip
                name = "cache" + ("_no_fill" if key == "no_fill" else "") + ("_bf16" if setting == "bf16" else "")
                sums[name].append(int(sum(sent.values()).max()))
            counts = torch.bincount(cached[cached >= 0], minlength=world).float()
            imbalance[key].append(float(counts.max() / counts.mean()))
            busiest[key].append(2 * int(counts.max()))  # forwards: two per tile with guidance
        # guidance split: idle slots counted in forwards, the busiest rank's branches handed to idle ranks
        split = par.fill_idle_slots(compute, change, layout.home_rank, world, branches=2)
        computed_share["split"].append(float(split.float().mean()))
        cached = par.computers(layout, split, rebalance=True)
        helper = par.branch_helpers(layout, cached)
        for setting, sizes in dtypes.items():
            sent = par.exchange_bytes(layout, cached, cell, nxt, state_tensors=UNIPC_STATE,
                                      cache_cell_bytes=cache_cells[setting], cache_reductions=reductions,
                                      helper=helper, **sizes)  # fmt: skip
            sums["cache_split" + ("_bf16" if setting == "bf16" else "")].append(int(sum(sent.values()).max()))
        forwards = torch.tensor(par.forwards_per_rank(cached, helper, world, branches=2), dtype=torch.float64)
        imbalance["split"].append(float(forwards.max() / forwards.mean()))
        busiest["split"].append(int(forwards.max()))
        computed = int(compute.sum())
        if computed:
            floor.append(math.ceil(computed / world) / (computed / world))
        home_only = par.computers(layout, compute, rebalance=False)
        counts = torch.bincount(home_only[home_only >= 0], minlength=world).float()
        imbalance_home.append(float(counts.max() / counts.mean()))
    assert busiest["fill"] == busiest["no_fill"], "filling idle slots must never lengthen a step"
    assert all(s <= w for s, w in zip(busiest["split"], busiest["no_fill"])), "splitting must never lengthen a step"
    return {
        "bytes": {k: statistics.mean(v) for k, v in sums.items()},
        "by_kind_fp32": {k: round(statistics.mean(v)) for k, v in kinds.items()},
        "imbalance_cache": statistics.mean(imbalance["fill"]),
        "imbalance_cache_worst_step": max(imbalance["fill"]),
        "imbalance_cache_no_fill": statistics.mean(imbalance["no_fill"]),
        "imbalance_cache_no_fill_worst_step": max(imbalance["no_fill"]),
        "imbalance_cache_no_fill_no_rebalance": statistics.mean(imbalance_home),
        "imbalance_floor_no_fill": statistics.mean(floor),
        "computed_share_cache": statistics.mean(computed_share["fill"]),
        "computed_share_cache_no_fill": statistics.mean(computed_share["no_fill"]),
        "imbalance_cache_split": statistics.mean(imbalance["split"]),
        "imbalance_cache_split_worst_step": max(imbalance["split"]),
        "computed_share_cache_split": statistics.mean(computed_share["split"]),
        # forwards (two per guided tile) the busiest rank runs over the run, with the cache: the step time
        "busiest_rank_forwards_per_run": sum(busiest["fill"]),
        "busiest_rank_forwards_per_run_split": sum(busiest["split"]),
        "one_process_forwards_per_run": sum(one_process),
    }


def sketch_context_bytes(geometry: Geometry, world: int, allgather_run: float) -> dict:
    """What one rank sends inside the transformer's layers under ``sketch_context`` (bf16 activations), the
    traffic ``context_ideal`` leaves out: with Wan's two-call guidance each call's tokens split over its half
    of the ranks, ``D = R / 2``. Per self-attention layer, Ulysses all-to-alls the rank's shard of q, k and v
    and the output back (``(D - 1) / D`` of each leaves the rank); diffusers' ring all-gathers k and v (the
    rank's shard to each of the ``D - 1`` others). ``per_run``: the 51 calls a rank takes part in (its half's
    call of every step and the first pair's other one); ``vs_allgather_run``: over the published design's
    all-gather of every tile prediction (bf16) over the whole refinement."""
    D = world // 2
    tokens = geometry.frames * (geometry.tile[0] // PATCH[0]) * (geometry.tile[1] // PATCH[1])
    shard = tokens // D * geometry.hidden * 2  # one (L / D, hidden) bf16 activation
    forward = {"ulysses": geometry.layers * 4 * shard * (D - 1) // D, "ring": geometry.layers * 2 * shard * (D - 1)}
    out = {"degree": D, "sketch_tokens": tokens}
    for kind, nbytes in forward.items():
        out[f"per_forward_{kind}"] = nbytes
        out[f"per_run_{kind}"] = (STEPS + 1) * nbytes
        out[f"vs_allgather_run_{kind}"] = (STEPS + 1) * nbytes / allgather_run
    return out


def run(geometry: Geometry, tiling_name: str, name: str, canvas_hw, world: int) -> dict:
    tiling = TILINGS[tiling_name](geometry)
    frames, steps = geometry.frames, geometry.refine_steps
    grid = TileGrid((frames, *canvas_hw), tiling, multiple=PATCH, native_tile=geometry.tile)
    cell = BATCH * CHANNELS * frames * ELEMENT  # one fp32 latent-shaped cell
    tile_bytes = geometry.tile[0] * geometry.tile[1] * cell
    cache = TileCache(CacheConfig(mode="budget", budget=BUDGET, warmup=WARMUP))
    # the cache's region state per cell: a bf16 model's last predictions are held in bf16
    like = torch.zeros(BATCH, CHANNELS, frames, 1)
    cache_cells = {"fp32": par.tile_cache_cell_bytes(cache, like),
                   "bf16": par.tile_cache_cell_bytes(cache, like, torch.bfloat16)}  # fmt: skip
    per_policy = {regions: layouts_for(grid, world, regions, steps) for regions in REGIONS}
    tiles = [layout.num_tiles for layout in per_policy["follow"]]
    allgather = statistics.mean(N * tile_bytes * (world - 1) / world for N in tiles)
    # the published code: padded prediction all-gather + the latent all-gather before the shift (every step)
    published = statistics.mean(2 * (world - 1) * math.ceil(N / world) * tile_bytes for N in tiles)
    row = {
        "geometry": geometry.name,
        "tiling": tiling_name,
        "shift_period": tiling.shift_period,
        "shift_cells": [grid.rows.step, grid.cols.step],
        "canvas": name,
        "canvas_latent": [frames, *canvas_hw],
        "ranks": world,
        "tiles_per_step": tiles[0],
        "allgather_bytes_per_rank_step": round(allgather),
        "sketch_context_bytes_per_rank": sketch_context_bytes(geometry, world, allgather / 2 * steps),
        "published_bytes_per_rank_step": round(published),
        "cache_state_bytes_per_cell": cache_cells["fp32"],
        "cache_state_bytes_per_cell_bf16": cache_cells["bf16"],
    }
    # Once per run, outside the loop: rank 0 broadcasts the sketch (one native-size latent: a tile in
    # fp32); after the loop every other rank sends its region of the canvas to rank 0.
    sketch = tile_bytes
    row["one_off_bytes"] = {"sketch_broadcast_rank0": sketch}
    for regions, layouts in per_policy.items():
        last = layouts[-1]
        gather = max((int((last.owner == r).sum()) * cell for r in range(1, world)), default=0)
        row["one_off_bytes"][f"final_gather_max_rank_{regions}"] = gather
        c = count(layouts, world, cache, cache_cells, cell)
        b = c.pop("bytes")
        # The whole run in native-size forwards (the sketch's are the same size as a tile's), with the cache:
        # stage 1 runs all STEPS steps, two forwards each, on rank 0 (or one each on ranks 0 and 1 with the
        # guidance split, plus its first step on both: SketchGuidanceSplit), then the refinement.
        refine = {
            "one_process": c.pop("one_process_forwards_per_run"),
            "whole": c["busiest_rank_forwards_per_run"],
            "split": c["busiest_rank_forwards_per_run_split"],
        }
        # CogVideoX and LTX-Video where their batched sketch call does not split exactly (rank 0 alone),
        # the tiles' guidance split with separate_guidance: "tiles_split"
        refine["tiles_split"] = refine["split"]
        # sketch_context: the guidance pairs split over two halves of the ranks, each call's tokens over its half
        # (ideal: no transfer inside the layers)
        refine["context_ideal"] = refine["split"]
        stage1 = {"one_process": 2 * STEPS, "whole": 2 * STEPS, "split": STEPS + 1, "tiles_split": 2 * STEPS,
                  "context_ideal": (STEPS + 1) / (world // 2)}  # fmt: skip
        run_forwards = {k: stage1[k] + refine[k] for k in refine}
        c["run_forwards_busiest_rank"] = run_forwards
        for k in ("whole", "split", "tiles_split", "context_ideal"):
            c[f"run_speedup_{k}"] = run_forwards["one_process"] / run_forwards[k]
        row[regions] = {
            "ours_max_rank_bytes_per_step": round(b["fp32"]),
            "ours_mean_by_kind": c.pop("by_kind_fp32"),
            "ratio": b["fp32"] / allgather,
            # a bf16 all-gather moves half the fp32 bytes
            "ratio_bf16": b["bf16"] / (allgather / 2),
            "ratio_euler": b["euler"] / allgather,
            "ratio_euler_bf16": b["euler_bf16"] / (allgather / 2),
            "ratio_cache": b["cache"] / allgather,
            "ratio_cache_bf16": b["cache_bf16"] / (allgather / 2),
            "ratio_cache_no_fill": b["cache_no_fill"] / allgather,
            "ratio_split": b["split"] / allgather,
            "ratio_split_bf16": b["split_bf16"] / (allgather / 2),
            "ratio_cache_split": b["cache_split"] / allgather,
            "ratio_cache_split_bf16": b["cache_split_bf16"] / (allgather / 2),
            "ratio_published": b["fp32"] / published,
            # the fp32 ratio with the one-off transfers spread over the refined steps (at most: each
            # rank's largest one-off added to the busiest rank's per-step mean)
            "ratio_with_one_off": (b["fp32"] + max(sketch, gather) / steps) / allgather,
            **c,
        }
    # What the runtime's default (regions="auto") picks in each setting: par.choose_regions with that
    # setting's per-cell sizes (state beyond the latents: UniPC's 3 history tensors, from which the latents
    # are rebuilt, so they do not migrate; the cache's state).
    history = UNIPC_STATE * cell
    settings = {
        "ratio": (cell, history, cell, cell),
        "ratio_bf16": (cell, history, cell // 2, cell // 2),
        "ratio_euler": (cell, 0, cell, cell),
        "ratio_euler_bf16": (cell, 0, cell // 2, cell // 2),
        "ratio_cache": (cell, history + cache_cells["fp32"], cell, cell),
        "ratio_cache_bf16": (cell, history + cache_cells["bf16"], cell // 2, cell // 2),
    }
    settings.update({key.replace("ratio", "ratio_split").replace("split_cache", "cache_split"): sizes
                     for key, sizes in settings.items() if "euler" not in key})  # fmt: skip
    config = ParallelConfig()
    row["auto"] = {}
    owner = par.fixed_owner(grid, world, steps, config.rebalance)  # what choose_regions chooses fixed ones from
    for key, sizes in settings.items():
        unipc = "euler" not in key
        with_cache = cache if "cache" in key else None  # auto counts the cache's random skip patterns
        regions, _ = par.choose_regions(config, grid, world, steps, *sizes, latents_migrate=not unipc,
                                        cache=with_cache, split="split" in key, owner=owner)  # fmt: skip
        row["auto"][key] = {"regions": regions, "ratio": row[regions][key]}
    row["meets_bytes_target"] = {k: v["ratio"] <= TARGET_RATIO for k, v in row["auto"].items()}
    row["meets_imbalance_target"] = row["fixed"]["imbalance_cache"] <= TARGET_IMBALANCE
    row["meets_imbalance_target_split"] = row["fixed"]["imbalance_cache_split"] <= TARGET_IMBALANCE
    return row


SETTINGS = (
    "ratio",
    "ratio_bf16",
    "ratio_euler",
    "ratio_euler_bf16",
    "ratio_cache",
    "ratio_cache_bf16",
    "ratio_split",
    "ratio_split_bf16",
    "ratio_cache_split",
    "ratio_cache_split_bf16",
)


def summarise(rows: list) -> list:
    """Per geometry and tiling, each setting's worst (largest) share over canvases and ranks under the
    default region policy, and whether every canvas and rank count meets the targets."""
    out = []
    for key in dict.fromkeys((r["geometry"], r["tiling"]) for r in rows):
        group = [r for r in rows if (r["geometry"], r["tiling"]) == key]
        entry = {"geometry": key[0], "tiling": key[1]}
        for setting in SETTINGS:
            entry[f"worst_{setting}"] = round(max(r["auto"][setting]["ratio"] for r in group), 4)
            entry[f"meets_{setting}"] = all(r["meets_bytes_target"][setting] for r in group)
        with_one_off = [r[r["auto"]["ratio"]["regions"]]["ratio_with_one_off"] for r in group]
        entry["worst_ratio_with_one_off"] = round(max(with_one_off), 4)
        entry["worst_imbalance_cache"] = round(max(r["fixed"]["imbalance_cache"] for r in group), 4)
        entry["meets_imbalance"] = all(r["meets_imbalance_target"] for r in group)
        entry["worst_imbalance_cache_split"] = round(max(r["fixed"]["imbalance_cache_split"] for r in group), 4)
        entry["meets_imbalance_split"] = all(r["meets_imbalance_target_split"] for r in group)
        out.append(entry)
    return out


# The VAEs' own tiling (diffusers 0.42 defaults, as the adapters decode): (tile, stride) latent cells per
# axis, and the canvases in latent cells at each VAE's spatial scale.
VAE_TILES = {
    "wan": (((32, 24), (32, 24)), 8),  # 256-pixel tiles every 192 pixels
    "hunyuan_video": (((32, 24), (32, 24)), 8),
    "cogvideox": (((30, 25), (45, 36)), 8),  # 240x360-pixel tiles, overlap 1/6 and 1/5
    "ltx_video": (((16, 14), (16, 14)), 32),  # 512-pixel tiles every 448 pixels
}
CANVAS_PIXELS = {"2K": (1440, 2560), "4K": (2160, 3840)}


def decode_rows() -> list:
    """The VAE's encode and decode shared in blocks of whole VAE tiles (:func:`supergen.parallel.plan_vae_blocks`):
    the busiest rank's share of the one-process decode's tile area, per VAE, canvas and rank count (and
    with bands along one axis only)."""
    rows = []
    for family, (geometry, scale) in VAE_TILES.items():
        for name, (h, w) in CANVAS_PIXELS.items():
            hw = (-(-h // scale), -(-w // scale))
            for world in RANKS:
                plan = par.plan_vae_blocks(hw, geometry, world)
                share = 1.0 if plan is None else plan.cost
                one_axis = {(k, 1) for k in range(2, world + 1)} | {(1, k) for k in range(2, world + 1)}
                bands = par.plan_vae_blocks(hw, geometry, world, grids=one_axis)
                rows.append({"vae": family, "canvas": name, "ranks": world, "latent_hw": list(hw),
                             "grid": None if plan is None else list(plan.grid),
                             "busiest_share": round(share, 4), "decode_speedup": round(1 / share, 2),
                             "busiest_share_bands_only": round(bands.cost, 4)})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "parallel_cpu.json"))
    parser.add_argument(
        "--geometry",
        nargs="+",
        choices=[g.name for g in GEOMETRIES],
        default=[g.name for g in GEOMETRIES],
        help="model geometries to count (default: all)",
    )
    parser.add_argument("--tiling", nargs="+", choices=list(TILINGS), default=list(TILINGS),
                        help="tile grids to count (default: both)")  # fmt: skip
    args = parser.parse_args()
    rows = [run(g, tiling, name, hw, world) for g in GEOMETRIES if g.name in args.geometry for tiling in args.tiling
            for name, hw in CANVASES.items() for world in RANKS]  # fmt: skip
    flat = [{"geometry": r["geometry"], "tiling": r["tiling"], "canvas": r["canvas"], "ranks": r["ranks"],
             "tiles": r["tiles_per_step"], "regions": regions, **{k: r[regions][k] for k in COLUMNS}}
            for r in rows for regions in REGIONS]  # fmt: skip
    print_table(flat, ["geometry", "tiling", "canvas", "ranks", "tiles", "regions", *COLUMNS])
    summary = summarise(rows)
    print_table(summary, list(summary[0]))
    decode = decode_rows()
    print_table(decode, list(decode[0]))
    payload = {
        "environment": environment("cpu"),
        "what": "bytes sent per rank per refinement step: supergen's halo exchange (+ region migration with "
        "regions that follow the grid) vs a ring all-gather of every tile prediction; load imbalance (max/mean "
        "computed tiles per rank, or forwards per rank with guidance split) with the cache on",
        "regions": "each row has one dict per ParallelConfig.regions policy: fixed (regions stay, shifted tiles "
        "exchange halos and predictions across boundaries, no state moves) and follow (regions move with the grid; "
        "the state of the cells changing owner moves every step); auto (the default) is what the runtime picks",
        "dtypes": "ratio*: everything fp32 (an fp32 model); *_bf16: a bf16 model with fp32 latents and "
        "scheduler/cache state, predictions and input halos in bf16 (the Wan adapter casts tiles first), "
        "against an all-gather of bf16 predictions",
        "sketch_context_bytes": "sketch_context_bytes_per_rank: what one rank sends inside the transformer's "
        "layers under ParallelConfig(sketch_context=...), bf16 activations, each call's tokens over D = R/2 ranks: "
        "Ulysses all-to-alls q, k, v and the output, diffusers' ring all-gathers k and v; per sketch forward and "
        "over the 51 a rank takes part in, and that over the published all-gather of every bf16 tile "
        "prediction over the whole refinement (the traffic run_speedup_context_ideal leaves out)",
        "counted_not_timed": "from supergen.parallel's geometry (Layout, computers, exchange_bytes), which the "
        "runtime uses to move its tensors; no process group or GPU involved",
        "geometries": {
            g.name: {
                "model": g.model,
                "tile_latent": list(g.tile),
                "frames_latent": g.frames,
                "refine_steps": g.refine_steps,
                "transformer_hidden": g.hidden,
                "transformer_layers": g.layers,
            }
            for g in GEOMETRIES
            if g.name in args.geometry
        },
        "common": {
            "patch": list(PATCH),
            "channels": CHANNELS,
            "batch": BATCH,
            "state_element_bytes": ELEMENT,
            "steps": STEPS,
            "canvases_latent_hw": CANVASES,
            "ranks": list(RANKS),
        },
        "tilings": {
            "default": "TilingConfig(): torus windows shifted every step, shift_period 16 (each axis "
            "sweeps its tile in at most 16 steps: 3-5 patches per step on these tiles)",
            "sweep": "TilingConfig(shift_period=refine_steps): the same grid drifting one sweep of "
            "each tile over the refinement (1-2 patches per step); row key shift_cells",
        },
        "summary": summary,
        "decode_blocks": decode,
        "decode_blocks_what": "the VAE's encode (upscale) and final decode shared by the ranks in a grid of blocks of "
        "whole VAE tiles (decode_in_blocks, encode_in_blocks; each block decodes its tiles plus the row and column "
        "before, which its first tiles blend with, and the start of the next): busiest_share = the busiest rank's "
        "decoded tile area / the one-process decode's; decode_speedup = 1 / that; busiest_share_bands_only: bands "
        "along one axis (counted; the latent broadcast and the pixels' gather to rank 0 are one-off transfers)",
        "one_off": "not per step, so not in the ratios: rank 0 broadcasts the sketch latent once (share_sketch) and "
        "every other rank sends its region to rank 0 after the loop (the final gather); ratio_with_one_off adds "
        "the larger of the two, spread over the refined steps, to the fp32 ratio. The published design needs no "
        "final gather (every rank holds the canvas) but all-gathers the latent before every shift step",
        "scheduler_state": f"ratio: UniPC, {UNIPC_STATE} region-shaped history tensors (2 model outputs, last "
        "sample; they migrate only with follow regions, and the receiver rebuilds the latents from them); "
        "ratio_euler: FlowMatchEuler (the latents migrate, nothing else)",
        "baselines": "primary (the issue's target): ratio = ours / ring all-gather of all N tile predictions; "
        "secondary: ratio_published = ours / what the published code sends (padded all-gather of ceil(N/R) tiles "
        "per rank + a latent all-gather of the same buffer before every shift step)",
        "cache_bytes": "ratio_cache: the runtime's accounting of the tile-cache path (with follow regions its "
        "region state migrates with the cells, cache_state_bytes_per_cell (_bf16: its last predictions held in "
        "bf16); window-sum all-reduces) on the "
        "simulated skip pattern",
        "cache_skip_pattern": f"simulated: budget policy, budget {BUDGET}, warm-up {WARMUP} steps and the last step "
        "compute all; other steps the tiles with the largest mean of a smooth random change field (3 drifting "
        f"low-frequency waves, seed {SEED}) over their window",
        "fill_idle": "the runtime default (ParallelConfig.fill_idle): ranks with fewer computed tiles than the "
        "busiest compute the skipped tiles of largest predicted change, their own first (supergen.parallel."
        "fill_idle_slots); *_no_fill: exactly the single-process decisions. The busiest rank's forwards per step "
        "are the same both ways (asserted), so filling costs no time; computed_share_* says how much less it reuses",
        "guidance_split": "*_split: Wan's default, ParallelConfig.split_guidance (classifier-free guidance as two "
        "forwards per tile; where whole tiles leave the busiest rank above ceil(2C/R) forwards it hands a tile's "
        "second forward to a rank with a free slot, which receives the tile's input and sends that output back: "
        "supergen.parallel.assign_branches). ratio_split*/ratio_cache_split* include those bytes; "
        "imbalance_cache_split = max/mean forwards per rank; busiest_rank_forwards_per_run (whole tiles, 2 per "
        "tile) vs busiest_rank_forwards_per_run_split is the time it saves (never longer: asserted). Models with "
        "one forward per tile (embedded or batched guidance) run the whole-tile columns",
        "targets": {"ratio": TARGET_RATIO, "imbalance": TARGET_IMBALANCE},
        "rows": rows,
    }
    path = write_json(Path(args.out), payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
