"""Plain-torch definitions of supergen's three ops: the specification every backend must match.

These functions are the meaning of the ops. The C++ (``supergen._C``) and Triton
(``supergen.kernels``) implementations are tested against them, the benchmarks use them as the
baseline, and ``supergen.ops`` falls back to them when no faster backend is available. They favour
clarity over speed and do no input validation (``supergen.ops`` validates before dispatch).

Conventions shared by all backends
----------------------------------
* Canvas layout is ``(B, C, T, H, W)``; tiling is spatial only (T is whole).
* Tiles are **tile-major**: tile ``n`` of batch element ``b`` is row ``n * B + b`` of a
  ``(N * B, C, T, h, w)`` tensor, so ``tiles.view(N, B, ...)`` separates them without a copy.
* ``origins`` is an ``(N, 2)`` int64 tensor of ``(row, col)`` canvas coordinates of each tile's
  top-left core cell (the halo, if any, lies around it).
"""

from __future__ import annotations

import math

import torch

#: Padding / wrapping modes of ``halo_gather`` and their integer codes (shared with the kernels).
GATHER_MODES = {"torus": 0, "zero": 1, "replicate": 2}
#: Blend ramps of ``blend_scatter`` and their integer codes (shared with the kernels).
RAMPS = {"linear": 0, "cosine": 1}
#: Token block size of ``masked_attention``'s query and key/value masks (part of the contract).
ATTN_MASK_BLOCK = 64


def _axis_index(start: int, length: int, size: int, mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvas indices of ``length`` cells starting at ``start`` and a bool of which lie on the canvas."""
    idx = torch.arange(start, start + length, device=device)
    inside = (idx >= 0) & (idx < size)
    if mode == "torus":
        return idx % size, torch.ones_like(inside)
    return idx.clamp(0, size - 1), inside


def halo_gather(
    canvas: torch.Tensor, origins: torch.Tensor, tile_hw: tuple[int, int], halo: int, mode: str
) -> torch.Tensor:
    """Cut ``N`` windows of ``(h + 2*halo, w + 2*halo)`` cells out of ``canvas``.

    Window ``n`` covers canvas rows ``origins[n, 0] - halo ...`` and columns ``origins[n, 1] - halo ...``.
    Cells off the canvas are taken modulo the canvas size (``torus``), from the nearest edge cell
    (``replicate``) or are zero (``zero``).

    Returns a new ``(N * B, C, T, h + 2*halo, w + 2*halo)`` tensor, tile-major, in the canvas dtype.
    """
    B, C, T, H, W = canvas.shape
    h, w = tile_hw
    N = origins.shape[0]
    out = canvas.new_empty((N * B, C, T, h + 2 * halo, w + 2 * halo))
    for n, (oy, ox) in enumerate(origins.tolist()):
        rows, rows_in = _axis_index(oy - halo, h + 2 * halo, H, mode, canvas.device)
        cols, cols_in = _axis_index(ox - halo, w + 2 * halo, W, mode, canvas.device)
        window = canvas.index_select(3, rows).index_select(4, cols)
        if mode == "zero":  # where, not a 0/1 product: off-canvas cells are 0 even next to inf/nan
            window = torch.where(rows_in[:, None] & cols_in[None, :], window, window.new_zeros(()))
        out[n * B : (n + 1) * B] = window
    return out


def blend_ramp(length: int, overlap: int, ramp: str, device=None) -> torch.Tensor:
    """1-D blend weight (fp32) of a tile of ``length`` cells whose ends overlap neighbours by ``overlap``.

    Cell ``j`` weighs ``r(min(1, (j + 0.5) / overlap, (length - j - 0.5) / overlap))`` with
    ``r(t) = t`` (linear) or ``sin^2(pi t / 2)`` (cosine); ``overlap == 0`` gives all ones. Both ramps
    satisfy ``r(t) + r(1 - t) == 1``, so tiles placed ``length - overlap`` apart sum to one across
    their overlap. No weight is zero, so every covered cell has a positive weight sum.
    """
    j = torch.arange(length, device=device, dtype=torch.float64)
    if overlap == 0:
        return torch.ones(length, device=device, dtype=torch.float32)
    t = torch.minimum((j + 0.5) / overlap, (length - j - 0.5) / overlap).clamp(max=1.0)
    if ramp == "cosine":
        t = torch.sin(t * (math.pi / 2)) ** 2
    return t.to(torch.float32)


def blend_scatter(
    tiles: torch.Tensor,
    origins: torch.Tensor,
    canvas_hw: tuple[int, int],
    overlap_hw: tuple[int, int],
    ramp: str,
    wrap: bool,
) -> torch.Tensor:
    """Fuse tile-major ``(N * B, C, T, h, w)`` tiles into a ``(B, C, T, H, W)`` canvas.

    ``canvas[p] = sum_n wgt_n(p) * tile_n(p) / sum_n wgt_n(p)`` where ``wgt_n`` is the outer product
    of :func:`blend_ramp` along rows (``overlap_hw[0]``) and columns (``overlap_hw[1]``) at the tile's
    local position. Tile cells beyond the canvas wrap around it (``wrap=True``) or are dropped.
    Canvas cells that no tile covers are zero. Accumulation is fp32 in tile order ``n = 0..N-1``;
    the result has the tiles' dtype. With no overlap and no two tiles on one cell this is a copy.
    """
    NB, C, T, h, w = tiles.shape
    N = origins.shape[0]
    B = NB // N
    H, W = canvas_hw
    wy = blend_ramp(h, overlap_hw[0], ramp, tiles.device)
    wx = blend_ramp(w, overlap_hw[1], ramp, tiles.device)
    weight = wy[:, None] * wx[None, :]
    acc = torch.zeros((B, C, T, H, W), device=tiles.device, dtype=torch.float32)
    wsum = torch.zeros((H, W), device=tiles.device, dtype=torch.float32)
    mode = "torus" if wrap else "zero"
    for n, (oy, ox) in enumerate(origins.tolist()):
        rows, rows_in = _axis_index(oy, h, H, mode, tiles.device)
        cols, cols_in = _axis_index(ox, w, W, mode, tiles.device)
        r, c = rows[rows_in], cols[cols_in]
        wgt = weight[rows_in][:, cols_in]
        tile = tiles[n * B : (n + 1) * B][..., rows_in, :][..., cols_in].float()
        sub = acc[..., r[:, None], c[None, :]]
        acc[..., r[:, None], c[None, :]] = sub + tile * wgt
        wsum[r[:, None], c[None, :]] += wgt
    out = torch.where(wsum > 0, acc / wsum.clamp(min=torch.finfo(torch.float32).tiny), acc)
    return out.to(tiles.dtype)


def expand_block_mask(mask: torch.Tensor, length: int, block: int = ATTN_MASK_BLOCK) -> torch.Tensor:
    """Per-token bool ``(B, H, length)`` from a per-block ``(B, H, ceil(length / block))`` mask."""
    return mask.bool().repeat_interleave(block, dim=-1)[..., :length]


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_block_mask: torch.Tensor,
    kv_block_mask: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Attention that computes only active query blocks over only valid key/value blocks, in place.

    ``q`` is ``(B, H, Lq, D)``, ``k``/``v`` are ``(B, H, Lk, D)`` (any strides), masks are bool
    ``(B, H, ceil(L / ATTN_MASK_BLOCK))``. For every query row ``i`` in an active block::

        out[b, h, i] = softmax(scale * q[b, h, i] @ k[b, h, valid].T) @ v[b, h, valid]

    computed in fp32 and cast to ``out.dtype``; a row with no valid key gets zeros (and ``lse``
    ``-inf``). Rows of inactive query blocks keep the values already in ``out`` (and ``lse``).
    ``chunk`` bounds the query rows per score matrix so the reference fits in memory at 4K sizes.
    Returns ``out``.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q_rows = expand_block_mask(q_block_mask, Lq)
    kv_cols = expand_block_mask(kv_block_mask, Lk)
    for b in range(B):
        for hh in range(H):
            active = q_rows[b, hh].nonzero().flatten()
            if active.numel() == 0:
                continue
            valid = kv_cols[b, hh].nonzero().flatten()
            kf = k[b, hh, valid].float()
            vf = v[b, hh, valid].float()
            for s in range(0, active.numel(), chunk):
                rows = active[s : s + chunk]
                if valid.numel() == 0:
                    out[b, hh, rows] = 0
                    if lse is not None:
                        lse[b, hh, rows] = -math.inf
                    continue
                scores = (q[b, hh, rows].float() @ kf.T) * scale
                row_lse = torch.logsumexp(scores, dim=-1)
                out[b, hh, rows] = (torch.exp(scores - row_lse[:, None]) @ vf).to(out.dtype)
                if lse is not None:
                    lse[b, hh, rows] = row_lse
    return out
