"""Region-shaped state: finding the scheduler's and the caches' per-cell tensors, moving them with
following regions, rebuilding the latents from the scheduler's history, and drawing in-step noise
as one process would."""

from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple

import torch

from .geometry import Layout
from .group import ParallelContext, _transfer


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
