"""Fused halo gather: every tile window of a ``(B, C, T, H, W)`` canvas in one launch.

Contract: :func:`supergen.reference.halo_gather`. Window ``n`` covers canvas rows
``origins[n, 0] - halo ...`` and columns ``origins[n, 1] - halo ...`` (``h + 2*halo`` by
``w + 2*halo`` cells); cells off the canvas wrap around it (``torus``), repeat the nearest edge cell
(``replicate``) or are zero (``zero``). The output is tile-major ``(N * B, C, T, h + 2*halo,
w + 2*halo)``: tile ``n`` of batch element ``b`` is row ``n * B + b``. It is a pure copy, so every
backend must match the reference bit for bit.

Design
------
* **One program = one block of ``BLOCK_P`` planes x ``BLOCK_H`` rows x ``BLOCK_W`` columns of one
  window.** The planes are consecutive ``(c, t)`` planes of one ``(n, b)`` output row, so they share
  the window geometry: the origin load, the wrap/clamp arithmetic of the row and column indices and
  the program-id decomposition are done once per program and reused for ``BLOCK_P`` planes. The grid
  is one flat axis (no 65 535 limit on the number of planes) ordered columns-fastest, so neighbouring
  programs read neighbouring canvas bytes.
* **Coalesced along W.** Columns are the fast axis of the block; a warp reads a contiguous run of a
  canvas row (a wrap splits it at most once) and writes a contiguous run of a window row. Each canvas
  byte that a window needs is read once and each output byte written once.
* **Words, not cells, where the layout allows.** A copy need not know what it moves: when every column
  quantity is a multiple of ``p`` cells (origins -- a host-side promise, ``col_multiple`` -- halo,
  widths, strides, addresses), both tensors are viewed as ``p``-cell int32/int64 words and the same
  kernel runs on the word geometry (:func:`word_cells`). Per-cell 2- and 4-byte requests left the
  memory pipes saturated at under half of DRAM's bandwidth on an H100; 8-byte words reach 0.82-0.87
  of ``copy_``.
* **Index arithmetic on 1-D vectors only.** Rows and columns are wrapped or clamped as ``(BLOCK_H,)``
  and ``(BLOCK_W,)`` vectors and broadcast; no per-element division or modulo. Torus wrapping uses
  one scalar modulo per program plus a compare-and-subtract per index (``MULTI_WRAP`` switches to a
  true modulo only for windows larger than the canvas).
* **Bounds safety without a host sync.** The canvas index is always brought into ``[0, H) x [0, W)``
  (modulo, clamp or mask) whatever the origins hold, so bad origins give wrong values but never an
  out-of-bounds access; ``supergen.ops`` validates them.
* **int64 where it can overflow.** Each plane's base offset is int64 (so tensors beyond 2**31
  elements are addressed correctly); offsets inside a plane are int32 unless the launcher finds a
  plane whose extent reaches 2**31 (``INDEX_64``), which halves the per-element address arithmetic.
* **Block sizes** come from :func:`block_settings` (deterministic, no autotuning: the kernel is
  memory-bound and the best block depends on the window shape, which the function reads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Padding / wrapping modes and their integer codes; equal to ``supergen.reference.GATHER_MODES``.
GATHER_MODES = {"torus": 0, "zero": 1, "replicate": 2}
#: The dtypes the kernels read and write (upcasting is the caller's business).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Widest column block. 64 fp32 / fp16 cells are 256 / 128 contiguous bytes per row segment, whole
#: 32-byte sectors; wider blocks coalesce no better and pad 4K windows (160, 176 wide) more.
MAX_BLOCK_W = 64
#: Narrowest column block (unless the axis is shorter): below 16 cells a warp's row run is shorter
#: than one 32-byte sector in fp16 and the loads stop coalescing.
MIN_BLOCK_W = 16
#: Fewest rows per block (unless the axis is shorter): thinner blocks multiply the programs and their
#: per-program index arithmetic for little saved padding.
MIN_BLOCK_H = 8
#: Cells of one plane a program covers (BLOCK_H x BLOCK_W): large enough to keep the per-program
#: index arithmetic small next to the copy, small enough that the plane axis still fills a block.
MAX_PLANE_CELLS = 1024
#: Cells per program (BLOCK_P x BLOCK_H x BLOCK_W). With 4 warps that is 32 cells per thread, i.e.
#: 8-16 KB of loads in flight per program and several programs per SM -- by Little's law an H100
#: needs roughly 3.35 TB/s x ~0.6 us / 132 SMs = 15 KB in flight per SM to stay bandwidth-bound.
#: Measured on an H100 (bench/sweep_blocks.py): 2048-16384 cells with 4 or 8 warps all moved the
#: 4K canvas within a few per cent of each other; the row segment length matters (WHOLE_ROW_MAX).
MAX_BLOCK_CELLS = 4096
#: Cells each thread copies: with MAX_BLOCK_CELLS that is 4 warps per program; smaller blocks get
#: fewer warps rather than idle threads.
CELLS_PER_THREAD = 32
#: A block may pad an axis by at most this fraction of its length before a smaller block is chosen:
#: padded lanes cost issue slots (not bandwidth), so e.g. a 160-wide window takes 32-wide blocks
#: (no padding) rather than 64-wide ones (20 % idle lanes).
MAX_PAD_FRACTION = 1 / 8
#: Windows whose rows fit in a block this wide (next power of two) are copied a whole row per block,
#: however much of the block is padding. Measured on an H100 (``bench/sweep_blocks.py``, 4K canvas,
#: 3x8 tiles with halo 8: 76-wide windows): one 128-wide block moved 0.56 (fp32) and 0.45 (bf16) of
#: ``copy_``'s bandwidth, five 16-wide blocks with less padding 0.48 and 0.24. Short row segments,
#: not idle lanes, cost bandwidth. (160-wide windows keep 32-wide blocks: 0.60 against 0.57.)
WHOLE_ROW_MAX = 128
#: Largest grid: one flat program axis, decomposed in the kernel.
MAX_PROGRAMS = 2**31 - 1


def _fit_block(length: int, lo: int, hi: int) -> int:
    """Largest power of two in ``[lo, hi]`` (capped at ``next_pow2(length)``) wasting at most
    ``MAX_PAD_FRACTION`` of ``length`` to padding; else the one wasting least (larger on ties)."""
    top = min(hi, triton.next_power_of_2(length))
    lo = min(lo, top)
    candidates = []
    block = top
    while block >= lo:
        candidates.append(block)
        block //= 2
    waste = {b: triton.cdiv(length, b) * b - length for b in candidates}
    for b in candidates:
        if waste[b] <= length * MAX_PAD_FRACTION:
            return b
    return min(candidates, key=lambda b: (waste[b], -b))


def block_settings(
    planes: int,
    rows: int,
    cols: int,
    plane_cells: int = MAX_PLANE_CELLS,
    max_block_w: int = MAX_BLOCK_W,
    whole_row: int = 0,
    cells_per_column: int = 1,
) -> dict[str, int]:
    """Deterministic block sizes and warp count for a ``planes x rows x cols`` copy-like kernel.

    Columns first (coalescing: a whole row if it fits in ``whole_row`` cells rounded up to a power of
    two, else at most ``max_block_w``), then rows up to ``plane_cells`` per plane, then planes up to
    ``MAX_BLOCK_CELLS``. ``cells_per_column``: a column holds that many cells (a kernel moving words)
    for the plane cap and the warp count. Returns ``BLOCK_P``, ``BLOCK_H``, ``BLOCK_W`` and ``num_warps``.
    """
    if min(planes, rows, cols) < 1:
        raise ValueError(f"block_settings needs positive sizes but got {(planes, rows, cols)}.")
    whole = triton.next_power_of_2(cols)
    block_w = whole if whole <= whole_row else _fit_block(cols, MIN_BLOCK_W, max_block_w)
    block_h = _fit_block(rows, MIN_BLOCK_H, max(1, plane_cells // block_w))
    plane_cells_held = block_h * block_w * cells_per_column
    block_p = min(triton.next_power_of_2(planes), max(1, MAX_BLOCK_CELLS // plane_cells_held))
    num_warps = min(8, max(1, block_p * plane_cells_held // (32 * CELLS_PER_THREAD)))
    return {"BLOCK_P": block_p, "BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps}


def interpreting(kernel) -> bool:
    """Whether ``kernel`` was defined under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel, op: str, **tensors: torch.Tensor) -> torch.device:
    """One device for all ``tensors``: CUDA, or CPU when ``kernel`` runs in the interpreter."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: all tensors must be on one device but got {devices}.")
    if first.type != "cuda" and not (first.type == "cpu" and interpreting(kernel)):
        raise ValueError(
            f"{op}: tensors must be on a CUDA device (or on the CPU with TRITON_INTERPRET=1 set before "
            f"supergen.kernels is imported) but are on {first}."
        )
    return first


def check_source_and_out(op: str, name: str, layout: str, src, out, same_dtype: str) -> None:
    """``src`` is a 5-D float tensor (``layout`` names its axes) and ``out`` a tensor of its dtype
    (``same_dtype`` says whose dtype, e.g. "the canvas dtype"): the checks both launchers share."""
    for label, t in ((name, src), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: `{label}` must be a torch.Tensor but is {type(t).__name__}.")
    if src.dim() != 5:
        raise ValueError(f"{op}: `{name}` must be {layout} but has shape {tuple(src.shape)}.")
    if src.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be float32, float16 or bfloat16 but is {src.dtype}.")
    if out.dtype != src.dtype:
        raise TypeError(f"{op}: `out` must have {same_dtype} {src.dtype} but is {out.dtype}.")


def check_origins(op: str, origins) -> int:
    """``origins`` is an integer ``(N, 2)`` tensor with ``N >= 1``; returns ``N``."""
    if not isinstance(origins, torch.Tensor):
        raise TypeError(f"{op}: `origins` must be a torch.Tensor but is {type(origins).__name__}.")
    if origins.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: `origins` must be int32 or int64 but is {origins.dtype}.")
    if origins.dim() != 2 or origins.shape[1] != 2 or origins.shape[0] < 1:
        raise ValueError(f"{op}: `origins` must have shape (N, 2) with N >= 1 but has {tuple(origins.shape)}.")
    return origins.shape[0]


def check_block(op: str, block) -> dict[str, int] | None:
    """An explicit ``(BLOCK_P, BLOCK_H, BLOCK_W[, num_warps])`` override (tests, tuning) as launch
    settings; ``num_warps`` defaults to 4."""
    if block is None:
        return None
    if len(block) not in (3, 4) or not all(isinstance(b, int) and b >= 1 and b & (b - 1) == 0 for b in block):
        raise ValueError(
            f"{op}: `block` must be three or four powers of two (BLOCK_P, BLOCK_H, BLOCK_W[, num_warps]) "
            f"but is {block!r}."
        )
    block_p, block_h, block_w, num_warps = (*block, 4)[:4]
    return {"BLOCK_P": block_p, "BLOCK_H": block_h, "BLOCK_W": block_w, "num_warps": num_warps}


def check_programs(op: str, programs: int) -> None:
    """The one-dimensional launch grid must fit CUDA's x-axis limit."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{op}: {programs} programs exceed the grid limit {MAX_PROGRAMS}; use larger blocks.")


#: Integer dtypes by byte width: the word types a copy may move several cells as.
WORD_DTYPES = {4: torch.int32, 8: torch.int64}
#: Widest word. Measured on an H100 (``bench/sweep_blocks.py --packed``, 4K canvas, 3x3 tiles halo 0
#: and 3x8 tiles halo 8): moving 8-byte words instead of cells took the gather from 0.59 / 0.57 to
#: 0.82 / 0.85 of ``copy_``'s bandwidth in fp32 and from 0.41 / 0.45 to 0.87 / 0.83 in bf16 (NCU on
#: the cell kernel: memory pipes 93 % busy, DRAM 38 %: too many narrow requests, not too many bytes).
MAX_WORD_BYTES = 8


def word_cells(canvas: torch.Tensor, out: torch.Tensor, mode: str, halo: int, col_multiple: int) -> int:
    """How many cells the gather may move as one word (1, or a power of two up to ``MAX_WORD_BYTES``).

    A pure copy may reinterpret ``p`` adjacent cells as one integer word when no word straddles a
    window or canvas edge and every address stays aligned: unit column strides, ``p`` dividing every
    other stride, the widths, the halo, the column origins (``col_multiple``) and both tensors'
    storage offsets. ``torus`` and ``zero`` only: a ``replicate`` word would repeat a word, not a cell.
    """
    if mode == "replicate" or canvas.stride(4) != 1 or out.stride(4) != 1:
        return 1
    item = canvas.element_size()
    pack = MAX_WORD_BYTES // item
    while pack > 1:
        sizes = (col_multiple, halo, canvas.shape[4], out.shape[4], canvas.storage_offset(), out.storage_offset())
        strides = (*canvas.stride()[:4], *out.stride()[:4])
        addresses = (canvas.data_ptr() // item, out.data_ptr() // item)
        if all(v % pack == 0 for v in (*sizes, *strides, *addresses)):
            return pack
        pack //= 2
    return 1


@triton.jit
def in_plane_offsets(rows, cols, stride_h, stride_w, INDEX_64: tl.constexpr):
    """``(rows, cols)`` element offsets inside one plane. int32 unless ``INDEX_64``: the launcher sets it
    only when a plane's extent reaches 2**31 elements, so the common case gets one-instruction 32-bit
    address arithmetic (the 64-bit part is the per-plane base, computed once per plane)."""
    # One return statement: the compiler requires all returns of a jit function to have one type, even
    # in branches a constexpr discards (the interpreter does not check this).
    if INDEX_64:
        offsets = (rows.to(tl.int64) * stride_h)[:, None] + (cols.to(tl.int64) * stride_w)[None, :]
    else:
        offsets = (rows * stride_h)[:, None] + (cols * stride_w)[None, :]
    return offsets


def needs_index_64(*planes: tuple[int, int, int, int]) -> bool:
    """Whether any ``(rows, cols, stride_h, stride_w)`` plane has offsets beyond int32."""
    return any((r - 1) * abs(sh) + (c - 1) * abs(sw) >= 2**31 for r, c, sh, sw in planes)


@triton.jit
def _source_index(start, k, size, MODE: tl.constexpr, MULTI_WRAP: tl.constexpr):
    """Canvas index (int32, always in ``[0, size)``) of window cells ``start + k`` and whether they lie
    on the canvas. ``MODE``: 0 torus, 1 zero, 2 replicate (``GATHER_MODES``)."""
    idx = start + k
    if MODE == 0:
        # One scalar modulo (C remainder, so fold the sign) puts the start on the canvas; then a
        # window no larger than the canvas needs at most one subtraction per index.
        first = ((start % size) + size) % size
        idx = first + k
        if MULTI_WRAP:
            idx = idx % size
        else:
            idx = tl.where(idx >= size, idx - size, idx)
        on_canvas = idx >= 0
    elif MODE == 1:
        on_canvas = (idx >= 0) & (idx < size)
        idx = tl.where(on_canvas, idx, 0)
    else:
        idx = tl.minimum(tl.maximum(idx, 0), size - 1)
        on_canvas = idx >= 0
    return idx, on_canvas


@triton.jit
def _halo_gather_kernel(
    canvas_ptr,
    origins_ptr,
    out_ptr,
    stride_canvas_b,
    stride_canvas_c,
    stride_canvas_t,
    stride_canvas_h,
    stride_canvas_w,
    stride_origins_n,
    stride_origins_yx,
    stride_out_nb,
    stride_out_c,
    stride_out_t,
    stride_out_h,
    stride_out_w,
    B,
    T,
    H,
    W,
    planes,
    win_h,
    win_w,
    halo,
    plane_blocks,
    row_blocks,
    col_blocks,
    MODE: tl.constexpr,
    MULTI_WRAP: tl.constexpr,
    INDEX_64: tl.constexpr,
    PACK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """canvas ``(B, C, T, H, W)`` any strides; origins ``(N, 2)`` int; out ``(N*B, C, T, win_h, win_w)``
    any strides. ``planes = C * T``. Program ``pid`` = ((nb * plane_blocks + pb) * row_blocks + rb) *
    col_blocks + cb copies planes ``pb*BLOCK_P ...`` rows ``rb*BLOCK_H ...`` cols ``cb*BLOCK_W ...``
    of window row ``nb = n * B + b``. With ``PACK > 1`` the pointers, ``W``, ``win_w`` and the column
    strides count words of ``PACK`` cells, while origins and ``halo`` stay in cells (the launcher
    guarantees that every column quantity is a multiple of ``PACK``)."""
    pid = tl.program_id(0)
    col_block = pid % col_blocks
    pid = pid // col_blocks
    row_block = pid % row_blocks
    pid = pid // row_blocks
    plane_block = pid % plane_blocks
    nb = pid // plane_blocks
    n = nb // B
    b = nb - n * B

    origin = origins_ptr + n.to(tl.int64) * stride_origins_n
    oy = tl.load(origin).to(tl.int32)
    ox = tl.load(origin + stride_origins_yx).to(tl.int32)

    q = plane_block * BLOCK_P + tl.arange(0, BLOCK_P)  # (c, t) plane within output row nb
    c = q // T
    t = q - c * T
    i = row_block * BLOCK_H + tl.arange(0, BLOCK_H)  # window row
    j = col_block * BLOCK_W + tl.arange(0, BLOCK_W)  # window column
    rows, row_on = _source_index(oy - halo, i, H, MODE, MULTI_WRAP)
    cols, col_on = _source_index((ox - halo) // PACK, j, W, MODE, MULTI_WRAP)  # exact: a multiple of PACK

    plane_ok = q < planes
    store_mask = plane_ok[:, None, None] & (i < win_h)[None, :, None] & (j < win_w)[None, None, :]
    load_mask = store_mask & row_on[None, :, None] & col_on[None, None, :]

    # int64 per-plane bases (B, C, T may make the tensor huge) plus in-plane offsets.
    src_plane = b.to(tl.int64) * stride_canvas_b + c.to(tl.int64) * stride_canvas_c + t.to(tl.int64) * stride_canvas_t
    src_cell = in_plane_offsets(rows, cols, stride_canvas_h, stride_canvas_w, INDEX_64)
    src = (canvas_ptr + src_plane)[:, None, None] + src_cell[None, :, :]
    # ``other=0`` is the zero padding; torus/replicate cells are all on the canvas.
    values = tl.load(src, mask=load_mask, other=0.0)

    dst_plane = nb.to(tl.int64) * stride_out_nb + c.to(tl.int64) * stride_out_c + t.to(tl.int64) * stride_out_t
    dst_cell = in_plane_offsets(i, j, stride_out_h, stride_out_w, INDEX_64)
    dst = (out_ptr + dst_plane)[:, None, None] + dst_cell[None, :, :]
    tl.store(dst, values, mask=store_mask)


def halo_gather(
    canvas: torch.Tensor,
    origins: torch.Tensor,
    tile_hw: tuple[int, int],
    halo: int,
    mode: str,
    out: torch.Tensor,
    *,
    col_multiple: int = 1,
    block: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Write every window of ``canvas`` into ``out`` in one launch and return ``out``.

    Args:
        canvas: ``(B, C, T, H, W)`` float32/float16/bfloat16, any strides (never copied).
        origins: ``(N, 2)`` int32/int64 ``(row, col)`` of each tile's top-left core cell.
        tile_hw: core tile size ``(h, w)``.
        halo: context cells on every side, ``>= 0``.
        mode: ``torus``, ``zero`` or ``replicate`` (:data:`GATHER_MODES`).
        out: ``(N * B, C, T, h + 2*halo, w + 2*halo)`` in the canvas dtype, any strides.
        col_multiple: a promise that every column origin is a multiple of this (``0``: all are zero);
            ``supergen.ops`` computes it on the host. Where it and the layout allow, the copy moves
            8-byte words of several cells (:func:`word_cells`); ``1`` always copies cells.
        block: optional ``(BLOCK_P, BLOCK_H, BLOCK_W[, num_warps])`` powers of two instead of
            :func:`block_settings` (tests and tuning), in words when words are moved.

    Checks only what would make the kernel touch memory out of bounds (devices, dtypes, ranks,
    ``out`` shape); argument policy (origin ranges, tile <= canvas) is ``supergen.ops``'s.
    """
    op = "halo_gather"
    check_source_and_out(op, "canvas", "(B, C, T, H, W)", canvas, out, "the canvas dtype")
    N = check_origins(op, origins)
    if mode not in GATHER_MODES:
        raise ValueError(f"{op}: `mode` must be one of {tuple(GATHER_MODES)} but is {mode!r}.")
    if not isinstance(halo, int) or halo < 0:
        raise ValueError(f"{op}: `halo` must be an int >= 0 but is {halo!r}.")
    h, w = tile_hw
    if not (isinstance(h, int) and isinstance(w, int) and h >= 1 and w >= 1):
        raise ValueError(f"{op}: `tile_hw` must be two ints >= 1 but is {tile_hw!r}.")
    B, C, T, H, W = canvas.shape
    win_h, win_w = h + 2 * halo, w + 2 * halo
    expected = (N * B, C, T, win_h, win_w)
    if tuple(out.shape) != expected:
        raise ValueError(f"{op}: `out` must have shape {expected} but has {tuple(out.shape)}.")
    check_device(_halo_gather_kernel, op, canvas=canvas, origins=origins, out=out)
    if out.numel() == 0:
        return out

    result = out
    pack = word_cells(canvas, out, mode, halo, col_multiple)
    if pack > 1:  # the same memory as words: shapes and strides in words, W and win_w too
        word = WORD_DTYPES[pack * canvas.element_size()]
        canvas, out = canvas.view(word), out.view(word)
        W, win_w = W // pack, win_w // pack
    planes = C * T
    cfg = check_block(op, block) or block_settings(planes, win_h, win_w, whole_row=WHOLE_ROW_MAX)
    plane_blocks = triton.cdiv(planes, cfg["BLOCK_P"])
    row_blocks = triton.cdiv(win_h, cfg["BLOCK_H"])
    col_blocks = triton.cdiv(win_w, cfg["BLOCK_W"])
    programs = N * B * plane_blocks * row_blocks * col_blocks
    check_programs(op, programs)
    _halo_gather_kernel[(programs,)](
        canvas_ptr=canvas,
        origins_ptr=origins,
        out_ptr=out,
        stride_canvas_b=canvas.stride(0),
        stride_canvas_c=canvas.stride(1),
        stride_canvas_t=canvas.stride(2),
        stride_canvas_h=canvas.stride(3),
        stride_canvas_w=canvas.stride(4),
        stride_origins_n=origins.stride(0),
        stride_origins_yx=origins.stride(1),
        stride_out_nb=out.stride(0),
        stride_out_c=out.stride(1),
        stride_out_t=out.stride(2),
        stride_out_h=out.stride(3),
        stride_out_w=out.stride(4),
        B=B,
        T=T,
        H=H,
        W=W,
        planes=planes,
        win_h=win_h,
        win_w=win_w,
        halo=halo,
        plane_blocks=plane_blocks,
        row_blocks=row_blocks,
        col_blocks=col_blocks,
        MODE=GATHER_MODES[mode],
        MULTI_WRAP=mode == "torus" and (win_h > H or win_w > W),
        INDEX_64=needs_index_64(
            (H, W, canvas.stride(3), canvas.stride(4)), (win_h, win_w, out.stride(3), out.stride(4))
        ),
        PACK=pack,
        **cfg,
    )
    return result
