"""Block-size sweep of the Triton halo_gather and blend_scatter kernels on a GPU (a tuning tool).

    python3 bench/sweep_blocks.py [--out PATH]

For the 4K canvas cases of ``bench_gather_scatter.py`` (one halo-0 / overlap-0 case on the 3x3 grid and
one halo-8 / overlap-8 case on the 3x8 grid, fp32 and bf16), every ``(BLOCK_P, BLOCK_H, BLOCK_W,
num_warps)`` of a small grid is timed with ``triton.testing.do_bench`` next to ``Tensor.copy_`` of the
same bytes, and its output is compared with the default settings' output (it must be identical: the
block shape changes no arithmetic). Rows: the settings, GB/s, fraction of copy bandwidth; the default
(:func:`block_settings`) row is marked. Writes JSON when ``--out`` is given.

``--packed``: instead of the sweep, each case's cell path (``col_multiple=1``) against its word path
(the column origins' gcd, as ``supergen.ops`` passes it: several cells per memory access where the
layout allows), with the default blocks and a few word blocks; the outputs must be bit-identical.
(``gather_words_*.json`` came from an earlier form of this experiment that viewed the tensors as words
by hand, before the launchers did it themselves.)
``--once``: run the default gather and scatter once each (for ``ncu``).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gather_scatter import CANVAS, GRIDS, RAMP, SEED, grid_origins, moved_bytes  # noqa: E402
from common import environment, print_table, write_json  # noqa: E402

CASES = [("halo_gather", "3x3", 0), ("halo_gather", "3x8", 8), ("blend_scatter", "3x3", 0), ("blend_scatter", "3x8", 8)]
DTYPES = (torch.float32, torch.bfloat16)
WIDTHS = (64, 128)
CELLS = (4096, 8192, 16384)
HEIGHTS = (2, 8)
WARPS = (4, 8)
#: Narrow blocks, as block_settings picks for 160- and 60-wide windows.
EXTRA = ((4, 32, 32, 4), (8, 16, 32, 4), (16, 8, 32, 4), (16, 16, 32, 8), (32, 8, 32, 8))
#: Blocks (in words) tried for the packed views, beside block_settings' choice.
PACKED_BLOCKS = ((8, 16, 16, 4), (8, 8, 32, 4), (4, 8, 64, 4), (16, 4, 32, 4), (8, 16, 32, 8), (4, 4, 128, 4))


def candidates():
    for w, cells, h, warps in itertools.product(WIDTHS, CELLS, HEIGHTS, WARPS):
        yield (cells // (h * w), h, w, warps)
    yield from EXTRA


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: smoke test (interpreter)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--once", action="store_true")
    args = parser.parse_args(argv)
    bs = importlib.import_module("supergen.kernels.blend_scatter")
    hg = importlib.import_module("supergen.kernels.halo_gather")
    from triton.testing import do_bench

    if args.once:
        return once(args.device, hg, bs)
    if args.packed:
        return packed(args.device, hg, bs, do_bench, args.out)

    device = args.device
    base = torch.randn(CANVAS, generator=torch.Generator().manual_seed(SEED))
    rows = []
    for dtype, (op, grid, size) in itertools.product(DTYPES, CASES):
        call, nbytes, copy_ms, label, _, _ = _case(hg, bs, do_bench, base, device, dtype, op, grid, size)
        expected = call().clone()
        default_ms = do_bench(call, return_mode="median")
        case_rows = [{"case": label, "block": "default", "ms": default_ms}]
        for block in candidates():
            try:
                got = call(block)
            except Exception as exc:  # e.g. out of resources: report and go on
                case_rows.append({"case": label, "block": str(block), "error": type(exc).__name__})
                continue
            same = bool(torch.equal(got, expected))
            ms = do_bench(lambda b=block, f=call: f(b), return_mode="median")
            case_rows.append({"case": label, "block": str(block), "ms": ms, "identical": same})
        for r in case_rows:
            if "ms" in r:
                r["gb_s"] = nbytes / (r["ms"] * 1e-3) / 1e9
                r["of_copy"] = copy_ms / r["ms"]
        best = sorted((r for r in case_rows if "ms" in r), key=lambda r: r["ms"])[:5]
        print_table(best + [case_rows[0]], ["case", "block", "ms", "gb_s", "of_copy", "identical"])
        rows += case_rows
        call = expected = got = None
        torch.cuda.empty_cache()
    if args.out:
        write_json(args.out, {**environment(device), "rows": rows})
    return 0


def _case(hg, bs, do_bench, base, device, dtype, op, grid, size):
    """One benchmark case: ``call(block=None, cols=1)`` runs its kernel into a preallocated output
    (``cols``: the ``col_multiple`` passed); also its bytes, ``copy_``'s time for as many bytes, its
    label, the column origins' gcd and the cells per word the launcher picks with that gcd."""
    B, C, T, H, W = CANVAS
    canvas = base.to(device=device, dtype=dtype)
    origins = grid_origins((H, W), GRIDS[grid]).to(device)
    multiple = math.gcd(*origins[:, 1].tolist())
    n = origins.shape[0]
    stride = (H // GRIDS[grid][0], W // GRIDS[grid][1])
    if op == "halo_gather":
        tile, halo = stride, size
        out = canvas.new_empty((n * B, C, T, tile[0] + 2 * halo, tile[1] + 2 * halo))
        pack = hg.word_cells(canvas, out, "torus", halo, multiple)

        def call(block=None, cols=1):
            return hg.halo_gather(canvas, origins, tile, halo, "torus", out, col_multiple=cols, block=block)
    else:
        tile, halo = (stride[0] + size, stride[1] + size), 0
        tiles = hg.halo_gather(canvas, origins, tile, 0, "torus", canvas.new_empty((n * B, C, T, *tile)))
        out = torch.empty_like(canvas)
        pack = hg.word_cells(tiles, out, "torus", 0, multiple)

        def call(block=None, cols=1):
            return bs.blend_scatter(tiles, origins, (H, W), (size, size), RAMP, True, out, col_multiple=cols,
                                    block=block)  # fmt: skip

    nbytes = moved_bytes(op, n, CANVAS, tile, halo, canvas.element_size())
    src = torch.empty(nbytes // (2 * canvas.element_size()), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    label = f"{op} {grid} {'halo' if op == 'halo_gather' else 'overlap'} {size} {str(dtype)[6:]}"
    return call, nbytes, copy_ms, label, multiple, pack


def once(device, hg, bs) -> int:
    B, C, T, H, W = CANVAS
    canvas = torch.randn(CANVAS, generator=torch.Generator().manual_seed(SEED)).to(device)
    origins = grid_origins((H, W), GRIDS["3x3"]).to(device)
    tile = (H // 3, W // 3)
    out = canvas.new_empty((9 * B, C, T, *tile))
    hg.halo_gather(canvas, origins, tile, 0, "torus", out)
    bs.blend_scatter(out, origins, (H, W), (0, 0), RAMP, True, torch.empty_like(canvas))
    torch.cuda.synchronize()
    return 0


def packed(device, hg, bs, do_bench, out_path) -> int:
    base = torch.randn(CANVAS, generator=torch.Generator().manual_seed(SEED))
    rows = []
    for dtype, (op, grid, size) in itertools.product(DTYPES, CASES):
        call, nbytes, copy_ms, label, multiple, pack = _case(hg, bs, do_bench, base, device, dtype, op, grid, size)
        expected = call().clone()
        for cols, block in [(1, None), (multiple, None), *((multiple, b) for b in PACKED_BLOCKS)]:
            try:
                got = call(block, cols)
            except Exception as exc:  # e.g. out of resources: report and go on
                rows.append({"case": label, "block": str(block or "default"), "error": type(exc).__name__})
                continue
            same = bool(torch.equal(got, expected))
            ms = do_bench(lambda c=cols, b=block, f=call: f(b, c), return_mode="median")
            rows.append({"case": label, "cells_per_access": 1 if cols == 1 else pack, "block": str(block or "default"),
                         "ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9, "of_copy": copy_ms / ms,
                         "identical_to_cells": same})  # fmt: skip
        case_rows = [r for r in rows if r["case"] == label]
        print_table(case_rows, ["case", "cells_per_access", "block", "ms", "gb_s", "of_copy", "identical_to_cells"])
        if out_path:  # after every case: a run stopped early keeps what it measured
            write_json(out_path, {**environment(device), "rows": rows})
        call = expected = got = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
