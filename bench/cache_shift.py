"""The tile gate against the grid's shift schedule, on the trained tiny Wan.

A shifted grid predicts each cell inside a different tile context at every step, so a cell's
prediction changes from step to step by more than the denoising alone would change it (README, "On
the trained tiny model"), and the gate (rightly) reuses little or nothing. This measures what the gate
skips, and what that costs, when the grid shifts every step (the default), every 3 steps, or never:
per schedule, the cache-off run is the reference, and each gate threshold's run is compared with it
(computed / skipped tile-steps, PSNR of the decoded video, seam score of both). Skips and fidelity
only: the tiny model's forwards are too small for its timings to say anything (bench/cache.py times
the policies).

Usage: ``python bench/cache_shift.py [--out bench/results/cache_shift_cpu.json]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache import build_pipeline, json_db  # noqa: E402
from common import RESULTS, environment, print_table, write_json  # noqa: E402

SCHEDULES = {"shift every step": {}, "shift every 3 steps": {"shift_every": 3}, "fixed grid": {"shift": False}}
THRESHOLDS = (0.1, 0.2)  # the default gate threshold and twice it
TILES, FRAMES, STEPS, REFINE_STEPS, GUIDANCE, SEED = 3, 9, 20, 14, 5.0, 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "cache_shift_cpu.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    torch.set_num_threads(2)

    from supergen import SuperGen, TilingConfig
    from supergen.cache import CacheConfig
    from supergen.metrics import psnr
    from supergen.tiny import TRAINED_DIR

    if not TRAINED_DIR.is_dir():
        print(f"bench/cache_shift.py: the trained model is not installed at {TRAINED_DIR}", file=sys.stderr)
        return 2
    pipe, model = build_pipeline("trained")  # the same model, size and prompt as bench/cache.py's trained rows
    h, w = model["native_size"]

    def run(tiling, cache):
        return SuperGen(pipe, cache=cache, tiling=tiling, native_size=(h, w))(
            **model["prompt"], height=TILES * h, width=TILES * w, num_frames=FRAMES, num_inference_steps=STEPS,
            refine_steps=REFINE_STEPS, guidance_scale=GUIDANCE, sketch_height=h, sketch_width=w,
            generator=torch.Generator().manual_seed(SEED), output_type="pt",
        )  # fmt: skip

    rows = []
    for name, options in SCHEDULES.items():
        tiling = TilingConfig(**options)
        off = run(tiling, None)
        guidance = off.report["guidance_scale"]
        for threshold in THRESHOLDS:
            out = run(tiling, CacheConfig(mode="gate", threshold=threshold))
            cache = out.report["cache"]
            fidelity = psnr(out.frames.float(), off.frames.float(), data_range=1.0)
            rows.append({
                "grid": name, "threshold": threshold, "computed_tile_steps": cache["computed_tile_steps"],
                "skipped_tile_steps": cache["skipped_tile_steps"],
                "psnr_db": json_db(float(fidelity)),
                "seam_score": round(out.report["seam_score"], 4),
                "seam_score_cache_off": round(off.report["seam_score"], 4),
            })  # fmt: skip
            print(rows[-1], flush=True)

    payload = {
        "benchmark": "cache_shift",
        "environment": environment("cpu"),
        "model": model,
        "setup": {
            "canvas_px": [TILES * h, TILES * w],
            "frames": FRAMES,
            "steps": STEPS,
            "refine_steps": REFINE_STEPS,
            "guidance_scale": guidance,  # sketch and stage 2 (the model's sidecar: refinement at 1)
            "seed": SEED,
            "schedules": SCHEDULES,
        },  # fmt: skip
        "rows": rows,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    payload["command"] = payload["environment"].get("command")
    write_json(Path(args.out), payload)
    print_table(rows, list(rows[0]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
