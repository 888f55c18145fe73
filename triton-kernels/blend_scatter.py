"""Blended scatter: fuse tile-major tile predictions into one canvas in a single deterministic pass.

Contract: :func:`supergen.reference.blend_scatter`. For tiles ``(N * B, C, T, h, w)`` (tile ``n`` of
batch element ``b`` is row ``n * B + b``) placed at ``origins`` ``(N, 2)``::

    out[b, c, t, y, x] = sum_n wgt_n(y, x) * tile_n[b, c, t, y - oy_n, x - ox_n] / sum_n wgt_n(y, x)

with ``wgt_n`` the product of the row and column ramps of :func:`supergen.reference.blend_ramp` at the
tile's local position (linear, or cosine ``sin^2``, over ``overlap`` cells at each tile end; 1 in the
middle; all ones when ``overlap == 0``). Tile cells past the canvas wrap around it (``wrap``) or are
dropped; cells no tile covers are zero. The result has the tiles' dtype.

Design
------
* **Canvas-centric, no atomics.** A program owns a block of ``BLOCK_P`` planes x ``BLOCK_H`` rows x
  ``BLOCK_W`` columns of the output and visits the tiles in order ``n = 0 .. N-1``, accumulating in
  fp32 registers; it writes each output cell exactly once, already normalised. The result is
  therefore deterministic run to run (the reduction order is fixed) and each tile byte is read once
  and each canvas byte written once -- no zero-fill pass, no weight-sum buffer, no second pass.
* **Cheap misses.** Whether tile ``n`` touches the block at all is a handful of scalar integer ops
  on the block's corner (torus or clamped geometry); tiles that miss it cost no loads and no vector
  work. Only blocks straddling a tile edge pay for more than one tile.
* **Weights in registers, never in memory.** The ramps are evaluated on ``(BLOCK_H,)`` and
  ``(BLOCK_W,)`` vectors of local positions and multiplied into a ``(BLOCK_H, BLOCK_W)`` weight that is
  broadcast over the ``BLOCK_P`` planes, as are the weight sum and its reciprocal: channels and
  frames share the geometry, so blocks are plane-major (see ``PLANE_CELLS``).
* **Exact copy without overlap.** With ``overlap == 0`` the ramp code is compiled out (constexpr) and
  every weight is exactly 1, so a cell covered once is ``v * 1 / 1 == v`` bit for bit.
* **Numerics.** Ramps multiply by ``1 / overlap`` (within 1 ulp of the reference's quotient); the
  cosine ramp's ``sin`` is a short polynomial accurate to fp32 rounding on ``[0, pi/2]``; the sum is
  normalised by multiplying with an IEEE reciprocal of the weight
  sum (one extra rounding, <= 1 ulp of fp32, in exchange for one division per cell instead of one per
  plane-cell). Storing rounds to nearest even like ``Tensor.to``.
* **Words where the layout allows.** As in the gather, when every column quantity is a multiple of
  ``p`` cells (column origins -- a host-side promise, ``col_multiple`` -- widths, strides, addresses)
  tiles and canvas are read and written as ``p``-cell int32/int64 words, split into cells in
  registers (shift, truncate, reinterpret), blended per cell exactly as on the cell path and put back
  together, so the result is bit-identical. On an H100 the cell path left the memory pipes 87 % busy
  at 34 % of DRAM bandwidth (narrow requests), as the gather's cells did before words took it from
  0.6 to 0.85 of ``copy_``. (The blend's word path has not yet run on a GPU, so ``supergen.ops`` keeps
  it off: ``ops.SCATTER_WORDS``.)
* **Bounds safety without a host sync.** A tile cell is loaded only if its local index lies in
  ``[0, h) x [0, w)`` (the load is masked) and canvas indices come from the program id, so bad
  origins give wrong values but never an out-of-bounds access; ``supergen.ops`` validates them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .halo_gather import (
    WORD_DTYPES,
    block_settings,
    check_block,
    check_device,
    check_origins,
    check_programs,
    check_source_and_out,
    in_plane_offsets,
    needs_index_64,
    word_cells,
)

#: Blend ramps and their integer codes; equal to ``supergen.reference.RAMPS``.
RAMPS = {"linear": 0, "cosine": 1}
#: Cell dtypes as the word path's ``CELL_KIND`` codes.
CELL_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Blocks are 8 x 32 cells of up to 16 planes (the gather's are up to 1024 cells per plane): a block that
#: straddles a tile edge pays the full vector work once per tile it touches, so small spatial blocks
#: waste less (for 90x160 tiles 1.31 instead of 1.65 tile visits per block on average), and more planes
#: per block spread the per-row/column geometry and weights over more cells. Compiled for sm_90 (4K,
#: bf16, 3x3 tiles), the tile loop costs 10.7 instead of 13.8 SASS instructions per cell and visit.
#: On an H100 (bench/sweep_blocks.py, sweep_blocks_*.json) this is the best measured block for 3x3
#: tiles; for 3x8 tiles with overlap 8, 16 rows of 8 planes moved up to 30 % more.
PLANE_CELLS = 256
MAX_BLOCK_W = 32


@triton.jit
def _local_index(first, k, origin, tile, size, WRAP: tl.constexpr):
    """Local tile index of canvas cells ``first + k`` (block start ``first``, ``k`` a ``tl.arange``) and
    whether the tile covers them (only covered cells may be dereferenced)."""
    if WRAP:
        # first, origin in [0, size): one compare-and-add puts the block start in [0, size) and one
        # compare-and-subtract per cell wraps the rest, exact for every cell on the canvas.
        d = first - origin
        d = tl.where(d < 0, d + size, d)
        local = d + k
        local = tl.where(local >= size, local - size, local)
    else:
        local = first + k - origin
    covered = (local >= 0) & (local < tile) & (first + k < size)
    return local, covered


@triton.jit
def _block_touches(first, span, origin, tile, size, WRAP: tl.constexpr):
    """Scalar: does the tile (``tile`` cells from ``origin``) cover any of canvas cells
    ``first .. first + span``?"""
    if WRAP:
        d = first - origin
        d = tl.where(d < 0, d + size, d)  # local index of the block's first cell, in [0, size)
        return (d < tile) | (d + span >= size)
    return (origin <= first + span) & (origin + tile > first)


@triton.jit
def _sin_quarter(x):
    """``sin(x)`` for ``x`` in ``[0, pi/2]``: the Taylor series to ``x**11`` (Horner), whose truncation
    error there is below ``(pi/2)**13 / 13! < 6e-8``, i.e. fp32 rounding. Cheaper than ``tl.sin``'s
    general range reduction (which costs registers and a stack frame inside the tile loop) and the
    same arithmetic on GPU and in the interpreter."""
    x2 = x * x
    # sin x = x - x^3 * (1/3! - x^2/5! + x^4/7! - x^6/9! + x^8/11!)
    p = 1.0 / 39916800.0
    p = p * x2 - 1.0 / 362880.0
    p = p * x2 + 1.0 / 5040.0
    p = p * x2 - 1.0 / 120.0
    p = p * x2 + 1.0 / 6.0
    return x - x * x2 * p


@triton.jit
def _axis_weight(local, covered, length, inv_overlap, RAMP: tl.constexpr, HAS_RAMP: tl.constexpr):
    """fp32 ``blend_ramp(length, overlap)[local]`` where covered, 0 elsewhere (``inv_overlap`` =
    ``1 / overlap``). ``RAMP``: 0 linear, 1 cosine (``RAMPS``)."""
    if HAS_RAMP:
        j = local.to(tl.float32)
        edge = tl.minimum(j + 0.5, length - j - 0.5)  # distance to the nearer tile end
        # Multiplying by the reciprocal (<= 1 ulp from the reference's quotient) instead of dividing:
        # an IEEE division is a ~40-instruction sequence in the per-tile loop.
        t = tl.minimum(edge * inv_overlap, 1.0)
        if RAMP == 1:
            s = _sin_quarter(t * 1.5707963267948966)  # pi / 2
            # The flat middle must be exactly 1 whatever the last bit of the polynomial says.
            t = tl.where(t >= 1.0, 1.0, s * s)
        return tl.where(covered, t, 0.0)
    return tl.where(covered, 1.0, 0.0)


@triton.jit
def _inverse_weights(wsum):
    """``1 / wsum`` where some tile covers the cell, else 0: uncovered cells (wsum == 0, acc == 0) get
    0, as in the reference; the clamp to the smallest normal fp32 only keeps the discarded branch
    finite. An IEEE reciprocal: one extra rounding, one division per cell rather than per plane-cell."""
    one = tl.full(wsum.shape, 1.0, tl.float32)
    return tl.where(wsum > 0, tl.div_rn(one, tl.maximum(wsum, 1.1754943508222875e-38)), 0.0)


@triton.jit
def _out_block(out_ptr, b, c, t, plane_ok, y, x, H, W, stride_b, stride_c, stride_t, stride_h, stride_w,
               INDEX_64: tl.constexpr):  # fmt: skip
    """Pointers and store mask of the output block: planes ``(b, c, t)``, canvas rows ``y``, columns ``x``."""
    plane = b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c + t.to(tl.int64) * stride_t
    dst = (out_ptr + plane)[:, None, None] + in_plane_offsets(y, x, stride_h, stride_w, INDEX_64)[None, :, :]
    mask = plane_ok[:, None, None] & (y < H)[None, :, None] & (x < W)[None, None, :]
    return dst, mask


@triton.jit
def _unpack_words(words, PACK: tl.constexpr, CELL_BITS: tl.constexpr, CELL_KIND: tl.constexpr):
    """Integer words ``(P, H, W)`` -> their ``PACK`` cells as fp32 ``(P, H, W, PACK)``, lowest bits
    first (little-endian memory order): shift, truncate to the cell's width, reinterpret."""
    lane = tl.arange(0, PACK)
    bits = words[:, :, :, None] >> (lane * CELL_BITS).to(words.dtype)[None, None, None, :]
    if CELL_BITS == 16:
        if CELL_KIND == 1:
            cells = bits.to(tl.int16).to(tl.float16, bitcast=True)
        else:
            cells = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        cells = bits.to(tl.int32).to(tl.float32, bitcast=True)
    return cells.to(tl.float32)


@triton.jit
def _pack_words(values, PACK: tl.constexpr, CELL_BITS: tl.constexpr, CELL_KIND: tl.constexpr):
    """fp32 ``(P, H, W, PACK)`` -> int64 words ``(P, H, W)``: round each cell to its dtype (as the cell
    path's store does), zero-extend its bits and place them; the fields are disjoint, so their sum is
    their bitwise or."""
    lane = tl.arange(0, PACK)
    if CELL_BITS == 16:
        if CELL_KIND == 1:
            bits = values.to(tl.float16).to(tl.int16, bitcast=True).to(tl.uint16).to(tl.int64)
        else:
            bits = values.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.uint16).to(tl.int64)
    else:
        bits = values.to(tl.int32, bitcast=True).to(tl.uint32).to(tl.int64)
    return tl.sum(bits << (lane * CELL_BITS).to(tl.int64)[None, None, None, :], axis=3)


@triton.jit
def _blend_scatter_kernel(
    tiles_ptr,
    origins_ptr,
    out_ptr,
    stride_tiles_nb,
    stride_tiles_c,
    stride_tiles_t,
    stride_tiles_h,
    stride_tiles_w,
    stride_origins_n,
    stride_origins_yx,
    stride_out_b,
    stride_out_c,
    stride_out_t,
    stride_out_h,
    stride_out_w,
    N,
    B,
    C,
    T,
    H,
    W,
    tile_h,
    tile_w,
    inv_overlap_h,
    inv_overlap_w,
    row_blocks,
    col_blocks,
    RAMP: tl.constexpr,
    WRAP: tl.constexpr,
    HAS_RAMP_H: tl.constexpr,
    HAS_RAMP_W: tl.constexpr,
    INDEX_64: tl.constexpr,
    PACK: tl.constexpr,
    CELL_BITS: tl.constexpr,
    CELL_KIND: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """tiles ``(N*B, C, T, tile_h, tile_w)`` any strides; origins ``(N, 2)`` int; out ``(B, C, T, H, W)``
    any strides. Program ``pid`` = (pb * row_blocks + rb) * col_blocks + cb owns flattened ``(b, c, t)``
    planes ``pb*BLOCK_P ...``, canvas rows ``rb*BLOCK_H ...`` and columns ``cb*BLOCK_W ...``.

    With ``PACK > 1`` both pointers are integer words of ``PACK`` cells of ``CELL_BITS`` bits
    (``CELL_KIND``: 0 fp32, 1 fp16, 2 bf16); ``W``, ``tile_w``, the column strides and blocks count
    words, origins stay in cells (the launcher guarantees every column quantity is a multiple of
    ``PACK``). Each word is split into its cells in registers, blended per cell exactly as the cell
    path does, and put back together, so the result is the same bit for bit."""
    pid = tl.program_id(0)
    col_block = pid % col_blocks
    pid = pid // col_blocks
    row_block = pid % row_blocks
    plane_block = pid // row_blocks

    p = plane_block * BLOCK_P + tl.arange(0, BLOCK_P)  # flattened (b, c, t), t fastest
    plane_ok = p < B * C * T
    t = p % T
    bc = p // T
    c = bc % C
    b = bc // C
    tile_planes = tiles_ptr + (
        b.to(tl.int64) * stride_tiles_nb + c.to(tl.int64) * stride_tiles_c + t.to(tl.int64) * stride_tiles_t
    )
    # From tile n to tile n + 1 of the same b. tl.cast, not .to: an argument equal to 1 arrives as a
    # Python int (Triton specialises it into a constant).
    tile_step = tl.cast(B, tl.int64) * stride_tiles_nb

    y0 = row_block * BLOCK_H
    x0 = col_block * BLOCK_W
    ky = tl.arange(0, BLOCK_H)
    kx = tl.arange(0, BLOCK_W)
    y_span = tl.minimum(BLOCK_H, H - y0) - 1  # last canvas row of the block, relative to y0
    x_span = tl.minimum(BLOCK_W, W - x0) - 1

    if PACK == 1:
        acc = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_W), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_H, BLOCK_W), dtype=tl.float32)
        for n in range(N):
            origin = origins_ptr + n * stride_origins_n
            oy = tl.load(origin).to(tl.int32)
            ox = tl.load(origin + stride_origins_yx).to(tl.int32)
            touches = _block_touches(y0, y_span, oy, tile_h, H, WRAP) & _block_touches(x0, x_span, ox, tile_w, W, WRAP)
            if touches:
                ly, y_cov = _local_index(y0, ky, oy, tile_h, H, WRAP)
                lx, x_cov = _local_index(x0, kx, ox, tile_w, W, WRAP)
                wgt = (
                    _axis_weight(ly, y_cov, tile_h, inv_overlap_h, RAMP, HAS_RAMP_H)[:, None]
                    * _axis_weight(lx, x_cov, tile_w, inv_overlap_w, RAMP, HAS_RAMP_W)[None, :]
                )
                covered = plane_ok[:, None, None] & (y_cov[:, None] & x_cov[None, :])[None, :, :]
                src_cell = in_plane_offsets(ly, lx, stride_tiles_h, stride_tiles_w, INDEX_64)
                src = (tile_planes + n * tile_step)[:, None, None] + src_cell[None, :, :]
                values = tl.load(src, mask=covered, other=0.0).to(tl.float32)
                acc += values * wgt[None, :, :]
                wsum += wgt

        result = acc * _inverse_weights(wsum)[None, :, :]
        dst, mask = _out_block(out_ptr, b, c, t, plane_ok, y0 + ky, x0 + kx, H, W, stride_out_b, stride_out_c,
                               stride_out_t, stride_out_h, stride_out_w, INDEX_64)  # fmt: skip
        tl.store(dst, result.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        lane = tl.arange(0, PACK)
        acc = tl.zeros((BLOCK_P, BLOCK_H, BLOCK_W, PACK), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_H, BLOCK_W, PACK), dtype=tl.float32)
        for n in range(N):
            origin = origins_ptr + n * stride_origins_n
            oy = tl.load(origin).to(tl.int32)
            ox = tl.load(origin + stride_origins_yx).to(tl.int32) // PACK  # in words: exact (launcher)
            touches = _block_touches(y0, y_span, oy, tile_h, H, WRAP) & _block_touches(x0, x_span, ox, tile_w, W, WRAP)
            if touches:
                ly, y_cov = _local_index(y0, ky, oy, tile_h, H, WRAP)
                lx, x_cov = _local_index(x0, kx, ox, tile_w, W, WRAP)  # word columns
                cell_x = lx[:, None] * PACK + lane[None, :]  # the words' cells, (BLOCK_W, PACK)
                cell_cov = x_cov[:, None] & (lane[None, :] >= 0)
                wgt = (
                    _axis_weight(ly, y_cov, tile_h, inv_overlap_h, RAMP, HAS_RAMP_H)[:, None, None]
                    * _axis_weight(cell_x, cell_cov, tile_w * PACK, inv_overlap_w, RAMP, HAS_RAMP_W)[None, :, :]
                )
                covered = plane_ok[:, None, None] & (y_cov[:, None] & x_cov[None, :])[None, :, :]
                src_cell = in_plane_offsets(ly, lx, stride_tiles_h, stride_tiles_w, INDEX_64)
                src = (tile_planes + n * tile_step)[:, None, None] + src_cell[None, :, :]
                words = tl.load(src, mask=covered, other=0)
                acc += _unpack_words(words, PACK, CELL_BITS, CELL_KIND) * wgt[None, :, :, :]
                wsum += wgt

        result = acc * _inverse_weights(wsum)[None, :, :, :]
        dst, mask = _out_block(out_ptr, b, c, t, plane_ok, y0 + ky, x0 + kx, H, W, stride_out_b, stride_out_c,
                               stride_out_t, stride_out_h, stride_out_w, INDEX_64)  # fmt: skip
        tl.store(dst, _pack_words(result, PACK, CELL_BITS, CELL_KIND).to(out_ptr.dtype.element_ty), mask=mask)


def blend_scatter(
    tiles: torch.Tensor,
    origins: torch.Tensor,
    canvas_hw: tuple[int, int],
    overlap_hw: tuple[int, int],
    ramp: str,
    wrap: bool,
    out: torch.Tensor,
    *,
    col_multiple: int = 1,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Blend all tiles into ``out`` in one launch and return ``out``.

    Args:
        tiles: ``(N * B, C, T, h, w)`` tile-major float32/float16/bfloat16, any strides.
        origins: ``(N, 2)`` int32/int64 ``(row, col)`` of each tile's top-left cell.
        canvas_hw: ``(H, W)`` of the canvas.
        overlap_hw: ramp length in cells at each tile end, per axis (``0`` = weight one).
        ramp: ``linear`` or ``cosine`` (:data:`RAMPS`).
        wrap: tiles wrap around the canvas (torus) if ``True``, else cells past it are dropped.
        out: ``(B, C, T, H, W)`` in the tiles' dtype, any strides; every cell is written.
        col_multiple: a promise that every column origin is a multiple of this (``0``: all are zero),
            as ``supergen.ops`` computes it on the host; where it and the layout allow, memory is
            read and written in 8-byte words of several cells (``1``: cells).
        block: optional ``(BLOCK_P, BLOCK_H, BLOCK_W[, num_warps])`` powers of two instead of
            :func:`~supergen.kernels.halo_gather.block_settings` (tests and tuning), in words when
            words are moved.

    Checks only what would make the kernel touch memory out of bounds (devices, dtypes, ranks,
    ``out`` shape, tiles divisible among origins); argument policy is ``supergen.ops``'s.
    """
    op = "blend_scatter"
    check_source_and_out(op, "tiles", "(N * B, C, T, h, w)", tiles, out, "the tiles' dtype")
    N = check_origins(op, origins)
    if ramp not in RAMPS:
        raise ValueError(f"{op}: `ramp` must be one of {tuple(RAMPS)} but is {ramp!r}.")
    H, W = canvas_hw
    oh, ow = overlap_hw
    if not all(isinstance(v, int) for v in (H, W, oh, ow)) or min(H, W) < 1 or min(oh, ow) < 0:
        raise ValueError(
            f"{op}: `canvas_hw` must be ints >= 1 and `overlap_hw` ints >= 0 but are {canvas_hw!r}, {overlap_hw!r}."
        )
    NB, C, T, h, w = tiles.shape
    if NB % N != 0:
        raise ValueError(f"{op}: `tiles` has {NB} rows, which is not a multiple of the {N} origins.")
    B = NB // N
    expected = (B, C, T, H, W)
    if tuple(out.shape) != expected:
        raise ValueError(f"{op}: `out` must have shape {expected} but has {tuple(out.shape)}.")
    check_device(_blend_scatter_kernel, op, tiles=tiles, origins=origins, out=out)
    if out.numel() == 0:
        return out
    if tiles.numel() == 0:  # no tile covers anything
        return out.zero_()

    result = out
    cell_bits, cell_kind = 8 * tiles.element_size(), CELL_KINDS[tiles.dtype]
    # Cells may travel as words when no word straddles a tile or canvas edge (a scatter is a gather's
    # mirror: same conditions with no halo); the wrap and the drop then act on whole words too.
    pack = word_cells(tiles, out, "torus", 0, col_multiple)
    if pack > 1:
        word = WORD_DTYPES[pack * tiles.element_size()]
        tiles, out = tiles.view(word), out.view(word)
        W, w = W // pack, w // pack
    planes = B * C * T
    cfg = check_block(op, block) or _block_settings(planes, H, W, pack)
    row_blocks = triton.cdiv(H, cfg["BLOCK_H"])
    col_blocks = triton.cdiv(W, cfg["BLOCK_W"])
    programs = triton.cdiv(planes, cfg["BLOCK_P"]) * row_blocks * col_blocks
    check_programs(op, programs)
    _blend_scatter_kernel[(programs,)](
        tiles_ptr=tiles,
        origins_ptr=origins,
        out_ptr=out,
        stride_tiles_nb=tiles.stride(0),
        stride_tiles_c=tiles.stride(1),
        stride_tiles_t=tiles.stride(2),
        stride_tiles_h=tiles.stride(3),
        stride_tiles_w=tiles.stride(4),
        stride_origins_n=origins.stride(0),
        stride_origins_yx=origins.stride(1),
        stride_out_b=out.stride(0),
        stride_out_c=out.stride(1),
        stride_out_t=out.stride(2),
        stride_out_h=out.stride(3),
        stride_out_w=out.stride(4),
        N=N,
        B=B,
        C=C,
        T=T,
        H=H,
        W=W,
        tile_h=h,
        tile_w=w,
        inv_overlap_h=1.0 / oh if oh else 1.0,  # unused (constexpr branch) without a ramp
        inv_overlap_w=1.0 / ow if ow else 1.0,
        row_blocks=row_blocks,
        col_blocks=col_blocks,
        RAMP=RAMPS[ramp],
        WRAP=bool(wrap),
        HAS_RAMP_H=oh > 0,
        HAS_RAMP_W=ow > 0,
        INDEX_64=needs_index_64((h, w, tiles.stride(3), tiles.stride(4)), (H, W, out.stride(3), out.stride(4))),
        PACK=pack,
        CELL_BITS=cell_bits,
        CELL_KIND=cell_kind,
        **cfg,
    )
    return result


def _block_settings(planes: int, rows: int, words: int, pack: int) -> dict[str, int]:
    """The cell path's blocks (``PLANE_CELLS`` per plane, ``MAX_BLOCK_W`` cells wide) in words of
    ``pack`` cells, with the same cells and warps per program."""
    return block_settings(planes, rows, words, PLANE_CELLS // pack, max(1, MAX_BLOCK_W // pack), cells_per_column=pack)
