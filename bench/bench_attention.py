"""masked_attention against SDPA and against itself with fewer query blocks active.

    python3 bench/bench_attention.py [--device cuda|cpu] [--json PATH]

CUDA (the issue's shapes): B=1, H=24, L=17 550 and 32 760, D=128, bf16, q/k/v as diffusers hands them
over ((B, L, H, D) memory viewed as (B, H, L, D)). Rows per shape:

* ``sdpa-flash``: ``F.scaled_dot_product_attention`` restricted to the flash backend: the baseline;
* ``supergen-triton all-active``: our kernel, every block active (ratio: vs sdpa-flash);
* ``supergen-triton q50%`` / ``q10%``: that fraction of query blocks active, random blocks from a
  fixed seed, one mask shared by all heads as the region cache produces (ratio: vs all-active);
* ``supergen-triton kv50%``: every query block, half the key blocks valid (ratio: vs all-active),
  which measures the gathered key path.

Times are medians of ``triton.testing.do_bench``. TFLOP/s counts only the work asked for:
``4 * B * H * Lq_active * Lk_valid * D`` (two matmuls of 2 FLOPs per multiply-add), so a masked row
at the same TFLOP/s as all-active means skipping is free. Correctness at these shapes: ``max_abs_err``
of all-active against flash SDPA; q-masked rows say whether their active rows equal the all-active
output and their inactive rows were left untouched. ``ratio`` is ``baseline_ms / ms`` within
this run (> 1: faster than the baseline).

CPU (no GPU): a reduced shape, B=1, H=2, L=1024, D=64, fp32, with the reference (what the op runs
on the CPU) against torch's SDPA, timed with a host clock; the shape column says it is reduced.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import supergen.ops as ops
from supergen.reference import ATTN_MASK_BLOCK

CUDA_SHAPES = [(1, 24, 17550, 128), (1, 24, 32760, 128)]
CPU_SHAPE = (1, 2, 1024, 64)
SEED = 0


def attention_flops(B: int, H: int, rows: int, keys: int, D: int) -> int:
    """FLOPs of attention forward over ``rows`` queries and ``keys`` keys: QK^T and PV, 2 per MAC."""
    return 4 * B * H * rows * keys * D


def block_mask(n_blocks: int, fraction: float, seed: int = SEED) -> torch.Tensor:
    """``round(fraction * n_blocks)`` (at least one) random blocks set, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n_blocks, dtype=torch.bool)
    mask[torch.randperm(n_blocks, generator=g)[: max(1, round(fraction * n_blocks))]] = True
    return mask


def tokens(mask: torch.Tensor, length: int) -> int:
    """Number of tokens in the set blocks of a 64-block mask over ``length`` tokens."""
    starts = mask.nonzero().flatten() * ATTN_MASK_BLOCK
    return int((length - starts).clamp(max=ATTN_MASK_BLOCK).sum())


def _inputs(B, H, L, D, dtype, device):
    g = torch.Generator(device=device).manual_seed(SEED)
    return [torch.randn((B, L, H, D), generator=g, device=device, dtype=dtype).transpose(1, 2) for _ in range(3)]


def _row(shape, dtype, backend, variant, ms, flops, baseline=None, baseline_ms=None) -> dict:
    B, H, L, D = shape
    return {
        "op": "masked_attention",
        "shape": f"B{B} H{H} L{L} D{D}",
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "variant": variant,
        "ms": ms,
        "tflops": flops / (ms * 1e-3) / 1e12,
        "baseline": baseline,
        "ratio": None if baseline_ms is None else baseline_ms / ms,
    }


def _bench_cuda_shape(shape, dtype, device) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    B, H, L, D = shape
    q, k, v = _inputs(B, H, L, D, dtype, device)
    out = torch.empty((B, L, H, D), dtype=dtype, device=device).transpose(1, 2)
    n = -(-L // ATTN_MASK_BLOCK)
    full = attention_flops(B, H, L, L, D)

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    def ours(q_mask=None, kv_mask=None):
        with ops.backend("triton"):
            return ops.masked_attention(q, k, v, q_mask, kv_mask, out=out)

    ours()  # autotune once per shape (keyed on Lq, Lk, D, dtype) before timing anything
    # Correctness at the real shape on the GPU: all-active against flash SDPA; a masked run leaves
    # its active rows equal to the all-active ones (same blocks, same order) and the others untouched.
    expected, full_out = sdpa().float(), ours().clone()
    err = (full_out.float() - expected).abs().max().item()
    sdpa_ms = do_bench(sdpa, return_mode="median")
    all_ms = do_bench(ours, return_mode="median")
    rows = [
        _row(shape, dtype, "torch", "sdpa-flash", sdpa_ms, full),
        {**_row(shape, dtype, "triton", "all-active", all_ms, full, "sdpa-flash", sdpa_ms), "max_abs_err": err},
    ]
    q50, q10, kv50 = block_mask(n, 0.5), block_mask(n, 0.1), block_mask(n, 0.5, seed=SEED + 1)
    for variant, q_mask, kv_mask, n_rows, keys in (
        ("q50%", q50, None, tokens(q50, L), L),
        ("q10%", q10, None, tokens(q10, L), L),
        ("kv50%", None, kv50, L, tokens(kv50, L)),
    ):
        call = functools.partial(ours, *(None if m is None else m.to(device) for m in (q_mask, kv_mask)))
        checked = {}
        if q_mask is not None:
            out.fill_(float("nan"))
            call()
            rows_on = q_mask.repeat_interleave(ATTN_MASK_BLOCK)[:L].to(device)
            checked = {
                "active_rows_equal_all_active": bool(torch.equal(out[:, :, rows_on], full_out[:, :, rows_on])),
                "inactive_rows_untouched": bool(out[:, :, ~rows_on].isnan().all()),
            }
        ms = do_bench(call, return_mode="median")
        flops = attention_flops(B, H, n_rows, keys, D)
        rows.append({**_row(shape, dtype, "triton", variant, ms, flops, "all-active", all_ms), **checked})
    return rows


def run_cuda(device: str = "cuda") -> list[dict]:
    rows = []
    for shape in CUDA_SHAPES:
        rows += _bench_cuda_shape(shape, torch.bfloat16, device)
        torch.cuda.empty_cache()
    return rows


def _host_median_ms(fn, reps: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_cpu() -> list[dict]:
    shape = CPU_SHAPE
    B, H, L, D = shape
    dtype = torch.float32
    q, k, v = _inputs(B, H, L, D, dtype, "cpu")
    out = torch.empty_like(q)
    n = -(-L // ATTN_MASK_BLOCK)
    full = attention_flops(B, H, L, L, D)
    label = f"B{B} H{H} L{L} D{D} (reduced, CPU)"

    def ref(q_mask=None):
        with ops.backend("reference"):
            ops.masked_attention(q, k, v, q_mask, out=out)

    sdpa_ms = _host_median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    rows = [_row(shape, dtype, "torch", "sdpa", sdpa_ms, full)]
    all_ms = _host_median_ms(ref)
    rows.append(_row(shape, dtype, "reference", "all-active", all_ms, full, "sdpa", sdpa_ms))
    for fraction in (0.5, 0.1):
        mask = block_mask(n, fraction)
        ms = _host_median_ms(lambda m=mask: ref(m))
        flops = attention_flops(B, H, tokens(mask, L), L, D)
        rows.append(_row(shape, dtype, "reference", f"q{fraction:.0%}", ms, flops, "all-active", all_ms))
    for r in rows:
        r["shape"] = label
    return rows


def run(device: str) -> list[dict]:
    """Benchmark rows for ``device`` (``cuda[:i]`` or ``cpu``); see the module docstring."""
    return run_cuda(device) if device.startswith("cuda") else run_cpu()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and environment here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import environment, print_table, write_json

    rows = run(args.device)
    print_table(rows, ["op", "shape", "dtype", "backend", "variant", "ms", "tflops", "baseline", "ratio"])
    if args.json is not None:
        write_json(args.json, {**environment(args.device), "rows": rows})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
