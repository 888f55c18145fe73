"""Kernel benchmarks of all three ops in one run → ``bench/results/kernels_<device>.json``.

    python3 bench/kernels.py [--device cuda|cpu] [--out PATH]

On a GPU: Triton vs the torch reference, with ``tensor.copy_`` of the same bytes as the bandwidth
ceiling for the memory-bound ops and SDPA (flash) as the attention baseline. On the CPU: reference vs
the C++ extension (and a reduced attention shape), so that the numbers exist everywhere. Every ratio
is measured within this one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention  # noqa: E402
import bench_gather_scatter  # noqa: E402
from common import RESULTS, device_slug, environment, print_table, write_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = bench_gather_scatter.run(args.device) + bench_attention.run(args.device)
    out = args.out or RESULTS / f"kernels_{device_slug(args.device)}.json"
    write_json(out, {**environment(args.device), "rows": rows})
    columns = sorted({k for r in rows for k in r}, key=lambda c: (c not in ("op", "shape", "backend"), c))
    print_table(rows, columns)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
