"""Every GPU-only check and measurement in one command, for a machine with an NVIDIA GPU.

    python3 bench/gpu.py [--skip-tests] [--skip-e2e]

1. the CUDA runs of the kernel and op tests (the compiled kernels, not the interpreter) →
   ``bench/results/cuda_tests_<device>.json`` (pytest's summary line and any failures);
2. ``bench/kernels.py`` → ``bench/results/kernels_<device>.json``;
3. ``bench/reshift.py --device cuda --cases 0``: stage 1 with and without noise reshifting on the same
   full-size transformer (about a minute) → ``bench/results/reshift_<device>.json``;
4. ``bench/vae_blocks.py --device cuda``: the full-size Wan VAE at 2K, whole vs the busiest of the
   blocks tile parallelism gives each rank, and whether they are bit for bit the whole on CUDA
   (about 4 minutes) → ``bench/results/vae_blocks_<device>.json``;
5. ``bench/guidance_halves.py --device cuda``: whether CogVideoX 1.5's and LTX-Video's batched guidance
   forward (their real layer shapes, 4 blocks, bf16) splits bit for bit into its two halves, which tile
   parallelism needs to share it between ranks, and what running the halves apart costs (a minute)
   → ``bench/results/guidance_halves_<device>.json``;
6. ``bench/e2e.py --device cuda`` (the full-size Wan 2.1 1.3B transformer at 480p tiles) →
   ``bench/results/e2e_<device>.json``.

About 20 minutes on an H100. Each step runs in its own process; a failing step is reported and the
next one still runs; the exit status is non-zero if any step failed. Where one command may run only
10 minutes, run the steps one by one: ``--skip-e2e``, then ``bench/e2e.py --device cuda --areas 4 --out
A.json`` and ``--areas 9 --out B.json`` (e2e rewrites its file after each area).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, device_slug, environment, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/test_kernels_gather_scatter.py",
    "tests/test_kernels_attention.py",
    "tests/test_ops.py",
    "tests/test_attention_integration.py",
]


def run_tests() -> int:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *TESTS]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines[-15:]), flush=True)
    write_json(
        RESULTS / f"cuda_tests_{device_slug('cuda')}.json",
        {
            **environment("cuda"),
            "command": " ".join(["python3", "-m", "pytest", "-q", *TESTS]),
            "returncode": done.returncode,
            "summary": lines[-1] if lines else "",
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
        },
    )
    return done.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device here; this script measures what only a GPU shows (CPU: bench/kernels.py).")
    failed = []
    if not args.skip_tests and run_tests() != 0:
        failed.append("tests")
    steps = [
        ("kernels", [sys.executable, "bench/kernels.py"]),
        ("reshift", [sys.executable, "bench/reshift.py", "--device", "cuda", "--cases", "0"]),
        ("vae_blocks", [sys.executable, "bench/vae_blocks.py", "--device", "cuda"]),
        ("guidance_halves", [sys.executable, "bench/guidance_halves.py", "--device", "cuda"]),
    ]
    if not args.skip_e2e:
        steps.append(("e2e", [sys.executable, "bench/e2e.py", "--device", "cuda"]))
    for name, command in steps:
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "all steps passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
