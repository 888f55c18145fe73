"""halo_gather and blend_scatter on the 4K canvas of a CogVideoX/Wan-size model, all backends in one run.

    python3 bench/bench_gather_scatter.py [--device cuda|cpu] [--json PATH]

Canvas: latent (B=1, C=16, T=13, H=270, W=480), i.e. 2160x3840 px at the VAE's 8x. Two torus grids
that fit the canvas exactly, so overlap 0 is a partition and the blend is a pure copy:

* ``3x3`` tiles of 90x160 (720p-native Wan/CogVideoX 1.5 windows);
* ``3x8`` tiles of 90x60: 24 tiles. A 4x6 grid cannot fit 270 rows exactly (270 / 4 = 67.5), 3x8 can
  (270 = 3 * 90, 480 = 8 * 60) with even sizes (patch 2).

The grid is shifted by ``SHIFT`` cells, as TileGrid shifts it between steps, so the last row and column
of tiles wrap around the torus. Cases: halo_gather with halo 0 and 8 (windows of the core tile plus
the halo); blend_scatter with overlap 0 (tiles = the grid stride) and 8 (tiles of stride + 8, so
neighbours overlap by exactly 8 cells and blend with the ``cosine`` ramp).

Backends per case:

* CUDA: ``triton`` (the launcher of ``supergen.kernels`` with a preallocated output: kernel time),
  ``reference`` (``supergen.reference``, what the op falls back to), and ``copy_``: ``Tensor.copy_`` of
  a buffer moving the same number of bytes, the bandwidth ceiling. Times are medians of
  ``triton.testing.do_bench`` (which flushes L2 between runs).
* CPU: ``reference`` and ``cpp`` (through ``supergen.ops`` with the backend forced; rows are skipped
  when the extension is unavailable), timed interleaved rep by rep with ``time.perf_counter`` after a
  warm-up, so load from other processes hits both alike; medians. Expect minutes: one reference call
  moves about a gigabyte here and took 5-20 s on the 2 shared cores this was written on.

``bytes`` counts each element once (see :func:`moved_bytes`); ``gb_s = bytes / time``. Within one run,
``ratio = reference_ms / ms`` (speed-up over the reference) and, on CUDA, ``of_copy = gb_s /
copy_gb_s`` (fraction of the copy bandwidth; the issue's targets are ratio >= 2 and of_copy >= 0.8).
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import supergen.ops as ops
from supergen import reference

CANVAS = (1, 16, 13, 270, 480)  # (B, C, T, H, W)
#: name -> (rows, cols) of tiles; the tile stride is (H / rows, W / cols).
GRIDS = {"3x3": (3, 3), "3x8": (3, 8)}
#: Grid shift in cells (multiples of the patch, 2) so that tiles wrap around both axes.
SHIFT = (10, 20)
HALOS = (0, 8)
OVERLAPS = (0, 8)
RAMP = "cosine"  # the dearer of the two ramps
CUDA_DTYPES = (torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float32,)
CPU_REPS, CPU_WARMUP = 3, 1
SEED = 0


def grid_origins(canvas_hw: tuple[int, int], grid: tuple[int, int], shift=SHIFT) -> torch.Tensor:
    """``(N, 2)`` row-major origins of a ``grid`` partition of the canvas, shifted on the torus."""
    (H, W), (rows, cols) = canvas_hw, grid
    sh, sw = H // rows, W // cols
    return torch.tensor([((r * sh + shift[0]) % H, (c * sw + shift[1]) % W) for r in range(rows) for c in range(cols)])


def moved_bytes(op: str, n_tiles: int, canvas, tile_hw: tuple[int, int], halo: int, itemsize: int) -> int:
    """Bytes an ideal kernel reads plus writes, each element once.

    halo_gather reads and writes every window cell: ``2 * N*B*C*T * (h+2*halo) * (w+2*halo)``.
    blend_scatter reads every tile cell and writes every canvas cell: ``N*B*C*T*h*w + B*C*T*H*W``.
    Both times ``itemsize``.
    """
    B, C, T, H, W = canvas
    h, w = tile_hw
    if op == "halo_gather":
        return 2 * n_tiles * B * C * T * (h + 2 * halo) * (w + 2 * halo) * itemsize
    return (n_tiles * B * C * T * h * w + B * C * T * H * W) * itemsize


def _cases(canvas_shape):
    """(op, grid name, variant, tile_hw, halo/overlap) for every benchmarked case."""
    _, _, _, H, W = canvas_shape
    for name, (rows, cols) in GRIDS.items():
        stride = (H // rows, W // cols)
        for halo in HALOS:
            yield "halo_gather", name, f"halo {halo}", stride, halo
        for overlap in OVERLAPS:
            tile = (stride[0] + overlap, stride[1] + overlap)
            yield "blend_scatter", name, f"overlap {overlap} {RAMP}", tile, overlap


def _label(canvas_shape, grid: str, tile_hw) -> str:
    B, C, T, H, W = canvas_shape
    n = GRIDS[grid][0] * GRIDS[grid][1]
    return f"B{B} C{C} T{T} {H}x{W}, {n} tiles {tile_hw[0]}x{tile_hw[1]}"


def _calls(op, canvas, origins, tile_hw, size, out_shape, kernels=None):
    """(reference, via_ops(backend), triton kernel) callables for one case (``kernels``: the
    ``supergen.kernels`` module, on CUDA); outputs are allocated here, outside the timed calls."""
    H, W = canvas.shape[-2:]
    col_multiple = math.gcd(*origins[:, 1].tolist())  # what supergen.ops passes (host origins)
    if op == "halo_gather":
        out = canvas.new_empty(out_shape)

        def ref():
            return reference.halo_gather(canvas, origins, tile_hw, size, "torus")

        def via_ops(backend):
            with ops.backend(backend):
                return ops.halo_gather(canvas, origins, tile_hw, size, "torus")

        def kernel(words=True):
            multiple = col_multiple if words else 1
            return kernels.halo_gather(canvas, origins, tile_hw, size, "torus", out, col_multiple=multiple)

        return ref, via_ops, kernel
    tiles = reference.halo_gather(canvas, origins, tile_hw, 0, "torus")  # overlapping windows of the canvas
    out = canvas.new_empty(canvas.shape)

    def ref():
        return reference.blend_scatter(tiles, origins, (H, W), (size, size), RAMP, True)

    def via_ops(backend):
        with ops.backend(backend):
            return ops.blend_scatter(tiles, origins, (H, W), size, RAMP, True)

    def kernel(words=True):
        multiple = col_multiple if words else 1
        return kernels.blend_scatter(tiles, origins, (H, W), (size, size), RAMP, True, out, col_multiple=multiple)

    return ref, via_ops, kernel


def _row(op, label, variant, dtype, backend, ms, nbytes, ref_ms=None, copy_gbs=None) -> dict:
    gbs = nbytes / (ms * 1e-3) / 1e9
    return {
        "op": op,
        "shape": label,
        "variant": variant,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "ms": ms,
        "bytes": nbytes,
        "gb_s": gbs,
        "baseline": None if ref_ms is None else "reference",
        "ratio": None if ref_ms is None else ref_ms / ms,
        "of_copy": None if copy_gbs is None else gbs / copy_gbs,
    }


def _host_medians(calls: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median ms per backend, timed interleaved rep by rep (a shared machine's load hits all alike)."""
    times = {name: [] for name in calls}
    for rep in range(warmup + reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def run(device: str, canvas_shape=CANVAS, dtypes=None, reps: int = CPU_REPS, warmup: int = CPU_WARMUP) -> list[dict]:
    """Benchmark rows for ``device`` (``cuda[:i]`` or ``cpu``); see the module docstring.

    ``canvas_shape``, ``dtypes``, ``reps`` and ``warmup`` (host timing only) exist for smoke tests.
    """
    cuda = device.startswith("cuda")
    dtypes = dtypes or (CUDA_DTYPES if cuda else CPU_DTYPES)
    cpp_ok = not cuda and ops.availability().get("cpp") == "available"
    kernels = importlib.import_module("supergen.kernels") if cuda else None
    gen = torch.Generator().manual_seed(SEED)
    base = torch.randn(canvas_shape, generator=gen)
    B, C, T, H, W = canvas_shape
    rows = []
    for dtype in dtypes:
        canvas = base.to(device=device, dtype=dtype)
        item = canvas.element_size()
        for op, grid, variant, tile_hw, size in _cases(canvas_shape):
            origins = grid_origins((H, W), GRIDS[grid]).to(device)
            n = origins.shape[0]
            halo = size if op == "halo_gather" else 0
            nbytes = moved_bytes(op, n, canvas_shape, tile_hw, halo, item)
            out_shape = (n * B, C, T, tile_hw[0] + 2 * halo, tile_hw[1] + 2 * halo)
            ref, via_ops, kernel = _calls(op, canvas, origins, tile_hw, size, out_shape, kernels)
            label = _label(canvas_shape, grid, tile_hw)
            if cuda:
                from triton.testing import do_bench

                src = torch.empty(nbytes // (2 * item), dtype=dtype, device=device)
                dst = torch.empty_like(src)
                copy_ms = do_bench(lambda d=dst, s=src: d.copy_(s), return_mode="median")
                ref_ms = do_bench(ref, return_mode="median")
                tri_ms = do_bench(kernel, return_mode="median")
                cells_ms = do_bench(lambda f=kernel: f(words=False), return_mode="median")
                copy_gbs = nbytes / (copy_ms * 1e-3) / 1e9
                # The timed kernels' outputs against the reference's, at this real shape on the GPU.
                err = (kernel().float() - ref().float()).abs().max().item()
                cells_err = (kernel(words=False).float() - ref().float()).abs().max().item()
                rows += [
                    _row(op, label, variant, dtype, "copy_", copy_ms, nbytes, ref_ms, copy_gbs),
                    _row(op, label, variant, dtype, "reference", ref_ms, nbytes, ref_ms, copy_gbs),
                    {**_row(op, label, variant, dtype, "triton", tri_ms, nbytes, ref_ms, copy_gbs), "max_abs_err": err},
                    {**_row(op, label, variant, dtype, "triton-cells", cells_ms, nbytes, ref_ms, copy_gbs),
                     "max_abs_err": cells_err},
                ]  # fmt: skip
                del src, dst
            else:
                calls = {"reference": ref}
                if cpp_ok:
                    calls["cpp"] = lambda f=via_ops: f("cpp")
                medians = _host_medians(calls, reps, warmup)
                rows += [
                    _row(op, label, variant, dtype, name, ms, nbytes, medians["reference"])
                    for name, ms in medians.items()
                ]
        del canvas
        if cuda:
            torch.cuda.empty_cache()
    return rows


COLUMNS = ["op", "shape", "variant", "dtype", "backend", "ms", "gb_s", "ratio", "of_copy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and environment here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import environment, print_table, write_json

    rows = run(args.device)
    print_table(rows, COLUMNS)
    if args.json is not None:
        write_json(args.json, {**environment(args.device), "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
