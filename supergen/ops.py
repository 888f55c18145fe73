"""supergen's ops: one validated public function and one ``torch.library`` op each.

Callers use :func:`halo_gather`, :func:`blend_scatter` and :func:`masked_attention` and never branch
on backend. Each public function validates its arguments (``ValueError``/``TypeError`` naming the
value and what is valid) before any work, then calls ``torch.ops.supergen.<op>``, whose fake
implementation makes it traceable by ``torch.compile`` and usable on meta tensors.

Backends, chosen per call from the tensor's device:

* CUDA tensors: the Triton kernels of ``supergen.kernels``;
* CPU tensors: the C++ extension ``supergen._C`` when it builds, else ``supergen.reference``;
* ``reference`` (plain torch) anywhere, always available: it defines what the ops mean.

``SUPERGEN_BACKEND=reference|cpp|triton`` or ``with ops.backend("..."):`` force one backend
(tests, benchmarks); forcing one that is unavailable raises with the reason it is unavailable.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence

import torch

from . import reference
from .reference import ATTN_MASK_BLOCK, GATHER_MODES, RAMPS

BACKENDS = ("reference", "cpp", "triton")
#: Whether blend_scatter's Triton kernel may move multi-cell words. Off until that path has run on a GPU:
#: it is bit-identical to the cell path in the interpreter and compiles for sm_90, but unlike the
#: gather's word path (measured on an H100) it has not been timed or checked on hardware.
#: ``bench/kernels.py`` times both paths; turn it on when its ``triton`` rows beat ``triton-cells``.
SCATTER_WORDS = False
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_forced = threading.local()


# --------------------------------------------------------------------------------------------------
# Backend availability
# --------------------------------------------------------------------------------------------------


def _probe_cpp():
    from . import _ext

    return _ext.load()


def _probe_triton():
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ImportError("triton is not installed")
    from . import kernels

    return kernels


_PROBES = {"cpp": _probe_cpp, "triton": _probe_triton}
_loaded: dict[str, object] = {}
_unavailable: dict[str, str] = {}


def _backend_module(name: str):
    """The module implementing backend ``name``, or ``None`` with the reason recorded."""
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        return None
    try:
        _loaded[name] = _PROBES[name]()
    except Exception as e:  # a failed build or import is reported by `supergen info`, never fatal
        _unavailable[name] = f"{type(e).__name__}: {e}"
        return None
    return _loaded[name]


def availability(load: bool = True) -> dict[str, str]:
    """Backend name → ``"available"`` or the reason it is not (``load`` builds/imports them now)."""
    table = {"reference": "available"}
    for name in ("cpp", "triton"):
        if load:
            _backend_module(name)
        if name in _loaded:
            table[name] = "available"
        else:
            table[name] = _unavailable.get(name, "not loaded yet")
    if "triton" in _loaded and not torch.cuda.is_available() and not _interpreting():
        table["triton"] = "importable, but no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU)"
    return table


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force every op called inside the block onto backend ``name`` (one of :data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS} but is {name!r}.")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def _forced_backend() -> str | None:
    name = getattr(_forced, "name", None) or os.environ.get("SUPERGEN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"SUPERGEN_BACKEND must be one of {BACKENDS} but is {name!r}.")
    return name


def _select(device: torch.device) -> tuple[str, object]:
    """(backend name, module) for a call on ``device``."""
    forced = _forced_backend()
    if forced is not None:
        if forced == "reference":
            return "reference", reference
        mod = _backend_module(forced)
        if mod is None:
            raise RuntimeError(f"backend {forced!r} was forced but is unavailable: {_unavailable[forced]}")
        return forced, mod
    if device.type == "cuda":
        mod = _backend_module("triton")
        return ("triton", mod) if mod is not None else ("reference", reference)
    if device.type == "cpu":
        mod = _backend_module("cpp")
        return ("cpp", mod) if mod is not None else ("reference", reference)
    return "reference", reference


def selected_backend(op: str, device: str | torch.device = "cpu") -> str:
    """Which backend ``op`` uses on ``device`` right now (for `supergen info` and reports)."""
    name, _ = _select(torch.device(device))
    if op == "masked_attention" and name == "cpp":
        return "reference"  # the C++ extension implements only the memory-bound ops
    return name


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor {layout} but is {type(t).__name__}.")
    if t.dim() != ndim:
        raise ValueError(f"`{name}` must have {ndim} dims {layout} but has shape {tuple(t.shape)}.")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32, float16 or bfloat16 but is {t.dtype}.")


def _check_pair(name: str, value, minimum: int) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"`{name}` must be an int or a pair of ints but is {value!r}.")
    if min(value) < minimum:
        raise ValueError(f"`{name}` must be >= {minimum} on both axes but is {tuple(value)}.")
    return int(value[0]), int(value[1])


def _as_origins(origins) -> torch.Tensor:
    if not isinstance(origins, torch.Tensor):
        try:
            origins = torch.tensor(origins)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`origins` must be an (N, 2) integer tensor or list of pairs: {e}") from None
    if origins.dtype.is_floating_point or origins.dtype == torch.bool or origins.is_complex():
        raise TypeError(f"`origins` must hold integers but has dtype {origins.dtype}.")
    if origins.dim() != 2 or origins.shape[1] != 2 or origins.shape[0] == 0:
        raise ValueError(f"`origins` must have shape (N, 2) with N >= 1 but has shape {tuple(origins.shape)}.")
    return origins.to(dtype=torch.int64)


def _check_origins(origins: torch.Tensor, canvas_hw, tile_hw, wrap: bool) -> None:
    """Torus origins lie on the canvas; padded/dropped-edge origins keep the core tile on the canvas.

    Callers pass CPU origins (TileGrid makes them there) and the check runs before they move to the
    device, so it costs no device-to-host sync. It reads the values, so it is skipped on meta tensors
    and while torch.compile traces (a data-dependent branch would break the graph); every backend is
    memory-safe for any origin (it wraps, clamps or drops cells): a skipped check can cost
    correctness, never safety.
    """
    if origins.device.type == "meta" or torch.compiler.is_compiling():
        return
    H, W = canvas_hw
    h, w = tile_hw
    hi_y, hi_x = (H - 1, W - 1) if wrap else (H - h, W - w)
    ys, xs = origins[:, 0], origins[:, 1]
    bad = (ys < 0) | (ys > hi_y) | (xs < 0) | (xs > hi_x)
    if bool(bad.any()):
        n = int(bad.nonzero()[0, 0])
        rule = "a canvas cell" if wrap else "such that the tile lies inside the canvas"
        raise ValueError(
            f"`origins[{n}]` = {tuple(origins[n].tolist())} is out of range: each origin must be "
            f"{rule}, i.e. row in [0, {hi_y}] and col in [0, {hi_x}] for canvas {H}x{W} and tile {h}x{w}."
        )


# --------------------------------------------------------------------------------------------------
# halo_gather
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("supergen::halo_gather", mutates_args=())
def _halo_gather_op(
    canvas: torch.Tensor, origins: torch.Tensor, tile_h: int, tile_w: int, halo: int, mode: str, col_multiple: int = 1
) -> torch.Tensor:
    """``col_multiple``: every column origin is a multiple of it (0: all zero), a hint computed where
    the origins are on the host; the Triton kernel then moves several cells per memory access."""
    name, mod = _select(canvas.device)
    if name == "reference":
        return reference.halo_gather(canvas, origins, (tile_h, tile_w), halo, mode)
    out = canvas.new_empty(_gather_shape(canvas, origins, tile_h, tile_w, halo))
    mod.halo_gather(canvas, origins, (tile_h, tile_w), halo, mode, out, col_multiple=col_multiple)
    return out


def _gather_shape(canvas, origins, tile_h, tile_w, halo):
    B, C, T = canvas.shape[:3]
    return (origins.shape[0] * B, C, T, tile_h + 2 * halo, tile_w + 2 * halo)


@_halo_gather_op.register_fake
def _(canvas, origins, tile_h, tile_w, halo, mode, col_multiple=1):
    return canvas.new_empty(_gather_shape(canvas, origins, tile_h, tile_w, halo))


def halo_gather(
    canvas: torch.Tensor,
    origins,
    tile_hw: int | tuple[int, int],
    halo: int = 0,
    mode: str = "torus",
) -> torch.Tensor:
    """Gather all tile windows of a canvas in one call.

    Args:
        canvas: ``(B, C, T, H, W)`` float tensor (any strides).
        origins: ``(N, 2)`` integer ``(row, col)`` of each tile's top-left core cell.
        tile_hw: core tile size ``(h, w)``; each window adds ``halo`` cells on every side.
        halo: cells of context around each core tile, ``>= 0``.
        mode: ``torus`` (windows wrap around the canvas; origins anywhere on it), ``zero`` or
            ``replicate`` (cells off the canvas are zero / the nearest edge cell; the core tile must
            lie inside the canvas).

    Returns:
        ``(N * B, C, T, h + 2*halo, w + 2*halo)``, tile-major (row ``n * B + b``), canvas dtype.
    """
    _check_tensor("canvas", canvas, 5, "(B, C, T, H, W)")
    h, w = _check_pair("tile_hw", tile_hw, 1)
    H, W = canvas.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"`tile_hw` {(h, w)} must not exceed the canvas {H}x{W} on either axis.")
    if not isinstance(halo, int) or isinstance(halo, bool) or halo < 0:
        raise ValueError(f"`halo` must be an int >= 0 but is {halo!r}.")
    if mode not in GATHER_MODES:
        raise ValueError(f"`mode` must be one of {tuple(GATHER_MODES)} but is {mode!r}.")
    origins = _as_origins(origins)
    _check_origins(origins, (H, W), (h, w), wrap=mode == "torus")  # before the move: no device sync
    col_multiple = _column_multiple(origins)
    origins = origins.to(canvas.device).contiguous()
    return torch.ops.supergen.halo_gather(canvas, origins, h, w, halo, mode, col_multiple)


def _column_multiple(origins: torch.Tensor) -> int:
    """The gcd of the column origins (0 if all are zero), read on the host; 1 (no promise) where the
    values cannot be read without a device sync or a graph break."""
    if origins.device.type != "cpu" or torch.compiler.is_compiling():
        return 1
    return math.gcd(*origins[:, 1].tolist())


# --------------------------------------------------------------------------------------------------
# blend_scatter
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("supergen::blend_scatter", mutates_args=())
def _blend_scatter_op(
    tiles: torch.Tensor,
    origins: torch.Tensor,
    canvas_h: int,
    canvas_w: int,
    overlap_h: int,
    overlap_w: int,
    ramp: str,
    wrap: bool,
    col_multiple: int = 1,
) -> torch.Tensor:
    """``col_multiple``: as for halo_gather, a host-computed promise on the column origins."""
    name, mod = _select(tiles.device)
    if name == "reference":
        return reference.blend_scatter(tiles, origins, (canvas_h, canvas_w), (overlap_h, overlap_w), ramp, wrap)
    out = tiles.new_empty(_scatter_shape(tiles, origins, canvas_h, canvas_w))
    canvas_hw, overlap_hw = (canvas_h, canvas_w), (overlap_h, overlap_w)
    mod.blend_scatter(tiles, origins, canvas_hw, overlap_hw, ramp, wrap, out, col_multiple=col_multiple)
    return out


def _scatter_shape(tiles, origins, canvas_h, canvas_w):
    NB, C, T = tiles.shape[:3]
    return (NB // origins.shape[0], C, T, canvas_h, canvas_w)


@_blend_scatter_op.register_fake
def _(tiles, origins, canvas_h, canvas_w, overlap_h, overlap_w, ramp, wrap, col_multiple=1):
    return tiles.new_empty(_scatter_shape(tiles, origins, canvas_h, canvas_w))


def blend_scatter(
    tiles: torch.Tensor,
    origins,
    canvas_hw: tuple[int, int],
    overlap: int | tuple[int, int] = 0,
    ramp: str = "linear",
    wrap: bool = True,
) -> torch.Tensor:
    """Fuse tile predictions into one canvas: ``sum(weight * tile) / sum(weight)`` per cell.

    Args:
        tiles: ``(N * B, C, T, h, w)`` tile-major float tensor (as :func:`halo_gather` returns).
        origins: ``(N, 2)`` integer ``(row, col)`` of each tile's top-left cell on the canvas.
        canvas_hw: ``(H, W)`` of the output canvas.
        overlap: cells over which each tile edge ramps (per axis); ``0`` means weight one everywhere,
            so non-overlapping tiles are copied exactly. At most half the tile size.
        ramp: ``linear`` or ``cosine``; weights come from the geometry (see
            :func:`supergen.reference.blend_ramp`) and are never stored per tile.
        wrap: tiles wrap around the canvas (torus) if ``True``; otherwise they must lie inside it.

    Returns:
        ``(B, C, T, H, W)`` canvas in the tiles' dtype; cells no tile covers are zero.
    """
    _check_tensor("tiles", tiles, 5, "(N * B, C, T, h, w)")
    H, W = _check_pair("canvas_hw", canvas_hw, 1)
    oh, ow = _check_pair("overlap", overlap, 0)
    h, w = tiles.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"tile size {(h, w)} must not exceed `canvas_hw` {(H, W)} on either axis.")
    if 2 * oh > h or 2 * ow > w:
        raise ValueError(f"`overlap` {(oh, ow)} must be at most half the tile size {(h, w)} on each axis.")
    if ramp not in RAMPS:
        raise ValueError(f"`ramp` must be one of {tuple(RAMPS)} but is {ramp!r}.")
    if not isinstance(wrap, bool):
        raise TypeError(f"`wrap` must be a bool but is {wrap!r}.")
    origins = _as_origins(origins)
    if tiles.shape[0] % origins.shape[0] != 0:
        raise ValueError(
            f"`tiles` has {tiles.shape[0]} rows, which is not a multiple of the {origins.shape[0]} origins."
        )
    _check_origins(origins, (H, W), (h, w), wrap=wrap)  # before the move: no device sync
    col_multiple = _column_multiple(origins) if SCATTER_WORDS else 1
    origins = origins.to(tiles.device).contiguous()
    return torch.ops.supergen.blend_scatter(tiles, origins, H, W, oh, ow, ramp, wrap, col_multiple)


# --------------------------------------------------------------------------------------------------
# masked_attention
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("supergen::masked_attention", mutates_args=("out", "lse"))
def _masked_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_block_mask: torch.Tensor,
    kv_block_mask: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    scale: float,
) -> None:
    name, mod = _select(q.device)
    if name in ("reference", "cpp"):
        reference.masked_attention(q, k, v, q_block_mask, kv_block_mask, out, scale, lse)
    else:
        mod.masked_attention(q, k, v, q_block_mask, kv_block_mask, out, scale, lse)


@_masked_attention_op.register_fake
def _(q, k, v, q_block_mask, kv_block_mask, out, lse, scale):
    return None


def _normalise_block_mask(name: str, mask, B: int, Hn: int, length: int, device) -> torch.Tensor:
    blocks = -(-length // ATTN_MASK_BLOCK)
    if mask is None:
        return torch.ones((B, Hn, blocks), dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"`{name}` must be a bool tensor but is {got}.")
    if mask.device != device:
        raise ValueError(f"`{name}` must be on {device} like `q` but is on {mask.device}.")
    if mask.dim() not in (1, 2, 3) or mask.shape[-1] != blocks:
        raise ValueError(
            f"`{name}` must have shape (B, H, {blocks}), (B, {blocks}) or ({blocks},) — one entry per "
            f"{ATTN_MASK_BLOCK}-token block of {length} tokens — but has shape {tuple(mask.shape)}."
        )
    full = mask[:, None, :] if mask.dim() == 2 else mask.reshape((1,) * (3 - mask.dim()) + tuple(mask.shape))
    try:
        return full.expand(B, Hn, blocks)
    except RuntimeError:
        raise ValueError(
            f"`{name}` of shape {tuple(mask.shape)} does not broadcast to (B={B}, H={Hn}, {blocks})."
        ) from None


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_block_mask: torch.Tensor | None = None,
    kv_block_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flash-style attention over active query blocks and valid key/value blocks only.

    Args:
        q: ``(B, H, Lq, D)``; ``k``, ``v``: ``(B, H, Lk, D)``; any strides, one float dtype.
        q_block_mask: bool, one entry per block of :data:`ATTN_MASK_BLOCK` (64) query tokens, shape
            ``(B, H, nq)``, ``(B, nq)`` or ``(nq,)``; ``None`` = all active. Rows of inactive blocks
            are not computed and keep the values already in ``out`` (the cache).
        kv_block_mask: bool per 64-token key/value block, same shapes with ``nk``; ``None`` = all
            valid. Invalid blocks are never read. A row with no valid key gets zeros.
        out: ``(B, H, Lq, D)`` output to update in place; ``None`` allocates zeros.
        scale: softmax scale, default ``D ** -0.5``.
        lse: optional fp32 ``(B, H, Lq)`` receiving each computed row's log-sum-exp (natural log).

    Returns:
        ``out``. With all blocks active this equals ``F.scaled_dot_product_attention(q, k, v)``.
    """
    _check_tensor("q", q, 4, "(B, H, Lq, D)")
    _check_tensor("k", k, 4, "(B, H, Lk, D)")
    _check_tensor("v", v, 4, "(B, H, Lk, D)")
    B, Hn, Lq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, Hn) or k.shape[3] != D:
        raise ValueError(
            f"`k` and `v` must both have shape (B={B}, H={Hn}, Lk, D={D}) but have "
            f"{tuple(k.shape)} and {tuple(v.shape)}."
        )
    if Lq == 0 or k.shape[2] == 0 or D == 0:
        raise ValueError(f"sequence lengths and head dim must be >= 1 but q is {tuple(q.shape)}, k {tuple(k.shape)}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"`q`, `k`, `v` must share one dtype but are {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"`q`, `k`, `v` must be on one device but are on {q.device}, {k.device}, {v.device}.")
    qm = _normalise_block_mask("q_block_mask", q_block_mask, B, Hn, Lq, q.device)
    km = _normalise_block_mask("kv_block_mask", kv_block_mask, B, Hn, k.shape[2], q.device)
    if out is None:
        out = torch.zeros_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"`out` must match `q` ({tuple(q.shape)}, {q.dtype}, {q.device}) but is "
            f"({tuple(out.shape)}, {out.dtype}, {out.device})."
        )
    if lse is not None and (lse.shape != (B, Hn, Lq) or lse.dtype != torch.float32 or lse.device != q.device):
        raise ValueError(
            f"`lse` must be float32 of shape {(B, Hn, Lq)} on {q.device} but is "
            f"{tuple(lse.shape)}, {lse.dtype}, {lse.device}."
        )
    for name, t in (("k", k), ("v", v)):
        # out may alias q (each program reads its q rows before writing them) but not k/v, which
        # every program reads while others write.
        if out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            raise ValueError(f"`out` must not share memory with `{name}`: other query blocks still read it.")
    if scale is None:
        scale = D**-0.5
    if not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"`scale` must be a finite number but is {scale!r}.")
    torch.ops.supergen.masked_attention(q, k, v, qm, km, out, lse, float(scale))
    return out
