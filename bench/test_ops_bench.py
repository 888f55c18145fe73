"""halo_gather and blend_scatter on the CPU: the C++ extension (``cpp``) against ``reference``.

    python3 -m pytest bench/test_ops_bench.py                          # pytest-benchmark table
    python3 bench/test_ops_bench.py --out bench/results/ops_cpu.json   # one-run JSON with ratios

The case is a 2K stage-2 step: a (B=1, C=16, T=13, H=270, W=480) fp32 canvas cut into 3x3 torus tiles
of 90x160 (TileGrid origins at step 1, so tiles wrap on both axes), gathered with halo 0 and 8 and
blended back with overlap 0 (a copy) and 8 (weighted ramps). ``reference`` and ``cpp`` run through the
public ops, so validation, dispatch and the allocation of a fresh ~100 MB output (whose pages fault in
on first write, every call) are included for both. ``cpp_out_reused`` calls the kernel directly into
one preallocated output: the kernel alone, to show how much of ``cpp``'s time is that allocation.

GB/s = (bytes read + bytes written) / median seconds, counting each element once: gather reads and
writes every window cell (2 * N*B*C*T*(h+2*halo)*(w+2*halo) * itemsize); blend reads every tile cell
and writes every canvas cell ((N*B*C*T*h*w + B*C*T*H*W) * itemsize). The script times the backends
interleaved, rep by rep, so load from other processes hits both alike, and takes medians;
``speedup_vs_reference`` is the reference's median over the backend's, both from that one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch
from common import environment, print_table, write_json

import supergen.ops as ops
from supergen import TileGrid, TilingConfig, _ext, reference

CANVAS = (1, 16, 13, 270, 480)  # (B, C, T, H, W)
TILE = (90, 160)
CASES = [("halo_gather", 0), ("halo_gather", 8), ("blend_scatter", 0), ("blend_scatter", 8)]
BACKENDS = ("reference", "cpp", "cpp_out_reused")
# The reference takes seconds per call here: a few pedantic rounds keep the pytest run to minutes.
PYTEST_ROUNDS = 3


def make_case(op: str, size: int):
    """(call(backend), bytes moved, input shape) for ``op`` with halo/overlap ``size``."""
    B, C, T, H, W = CANVAS
    canvas = torch.randn(CANVAS, generator=torch.Generator().manual_seed(0))
    origins = TileGrid((T, H, W), TilingConfig(tile=TILE)).at_step(1)
    item = canvas.element_size()
    if op == "halo_gather":
        out = torch.empty((origins.shape[0] * B, C, T, TILE[0] + 2 * size, TILE[1] + 2 * size))

        def call(backend):
            if backend == "cpp_out_reused":
                return _ext.load().halo_gather(canvas, origins, TILE, size, "torus", out)
            with ops.backend(backend):
                return ops.halo_gather(canvas, origins, TILE, size, "torus")

        return call, 2 * out.numel() * item, tuple(canvas.shape)
    tiles = reference.halo_gather(canvas, origins, TILE, 0, "torus")
    out = torch.empty_like(canvas)

    def call(backend):
        if backend == "cpp_out_reused":
            return _ext.load().blend_scatter(tiles, origins, (H, W), (size, size), "linear", True, out)
        with ops.backend(backend):
            return ops.blend_scatter(tiles, origins, (H, W), size, "linear", True)

    return call, (tiles.numel() + canvas.numel()) * item, tuple(tiles.shape)


def _cpp_unavailable() -> str | None:
    """Why the C++ backend cannot run here, or None."""
    try:
        _ext.load()
    except ImportError as e:
        return str(e)
    return None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,size", CASES, ids=[f"{op}-{s}" for op, s in CASES])
def test_ops_cpu(benchmark, op, size, backend):
    if backend != "reference" and (reason := _cpp_unavailable()):
        pytest.skip(reason)
    call, nbytes, shape = make_case(op, size)
    benchmark.extra_info.update(shape=shape, halo_or_overlap=size, bytes=nbytes)
    benchmark.pedantic(call, args=(backend,), rounds=PYTEST_ROUNDS, warmup_rounds=1)


def run(reps: int, warmup: int) -> list[dict]:
    """One row per (case, backend): medians over ``reps`` interleaved repetitions after ``warmup``."""
    rows = []
    for op, size in CASES:
        call, nbytes, shape = make_case(op, size)
        times = {b: [] for b in BACKENDS}
        for rep in range(warmup + reps):
            for backend in BACKENDS:
                start = time.perf_counter()
                call(backend)
                if rep >= warmup:
                    times[backend].append(time.perf_counter() - start)
        median = {b: statistics.median(t) for b, t in times.items()}
        for backend in BACKENDS:
            rows.append(
                {
                    "op": op,
                    "shape": list(shape),
                    "halo" if op == "halo_gather" else "overlap": size,
                    "dtype": "float32",
                    "backend": backend,
                    "median_s": median[backend],
                    "gb_per_s": nbytes / median[backend] / 1e9,
                    "speedup_vs_reference": median["reference"] / median[backend],
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if reason := _cpp_unavailable():
        raise SystemExit(reason)
    rows = run(args.reps, args.warmup)
    meta = {
        **environment("cpu"),
        "threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],  # the machine may be shared: context for the medians
        "reps": args.reps,
        "warmup": args.warmup,
    }
    write_json(args.out, {**meta, "rows": rows})
    print_table(rows, ["op", "halo", "overlap", "backend", "median_s", "gb_per_s", "speedup_vs_reference"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
