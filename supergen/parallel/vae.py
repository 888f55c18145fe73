"""The VAE at canvas size, shared by the ranks in blocks of whole VAE tiles."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .group import ParallelContext, _broadcast_from_rank0, _broadcast_layout, _comm_device, _transfer


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
