"""The distributed refine loop: each rank computes its assigned tiles, exchanges halos and predictions
point to point, blends its own cells and steps its own region."""

from __future__ import annotations

import warnings
from functools import partial

import torch

from ..config import ParallelConfig
from ..reference import blend_ramp
from .assign import fill_idle_slots, forwards_per_rank
from .geometry import Layout, _ring_share, branch_helpers, choose_regions, computers, tile_cache_cell_bytes
from .group import ParallelContext, _comm_device, _transfer
from .sketch import _has_foreign_hooks
from .state import _rebuild_latents, _region_refs, canvas_noise, migrate, probe_scheduler


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

    from ..ops import halo_gather

    canvas_hw = tuple(latents.shape[-2:])
    origins = grid.at_step(0)[:1]
    tile = halo_gather(latents, origins, grid.tile, 0, "torus" if grid.wrap else "zero")
    whole = adapter.predict(tile, t, cond, origins, canvas_hw)
    halves = {b: adapter.predict_branch(tile, t, cond, origins, canvas_hw, b).flatten(-2) for b in ("cond", "uncond")}
    guided = adapter.guide(halves, cond, t)
    ctx.probe_forwards += 3
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
    from ..cache import StepRehash, TileCache, cell_abs_sum

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
    ctx.guidance_halves, ctx.probe_forwards = None, 0
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
        if tile_cache is not None:
            tile_cache.set_denoiser(i, adapter.denoiser_index(t))
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
    from ..cache import CellWindows

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
    from ..ops import halo_gather

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
