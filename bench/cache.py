"""Cache benchmark: refinement time and fidelity of every cache policy against the cache turned off.

One model, one set of sizes, one seed for every row. Rows: cache off; the tile gate at thresholds
{default / 2, default, default x 2} (default = ``CacheConfig().threshold``: the threshold's meaning is
fixed by the gate, never tuned to the benchmark model); budget {0.75, 0.5}; Step Rehash. Per row:

* ``refine_s``: median of ``REPEATS`` runs of the refinement stage (``report["seconds"]["refine"]``),
  the repetitions interleaved across rows so that load on a shared machine hits every row alike. On the
  CPU the stage timer reads this process's CPU time, not wall time: the benchmark runs single-threaded
  on a 2-core machine shared with other jobs, where the wall time of one configuration swung 2.3x
  between repetitions (2.35 s to 5.73 s, measured), more than the differences being measured;
* ``speedup``: cache-off median / row median, both from this run;
* computed / skipped tile-steps (one tile-step = one guided forward of one tile at one step);
* ``bookkeeping_s``: CPU seconds inside the cache's own methods (decisions, state updates, reuse), the
  overhead a cache must earn back (median over the repeats);
* ``psnr_db`` / ``ssim`` of the decoded video against the cache-off video (pixels in [0, 1]), and the
  seam score of the row's own video (1.0 = no seam).

Step Rehash's similarity map is measured once, before the timed rows, by a calibration pass with its own
seed (``CALIBRATION_SEED``, not the evaluation seed, as an offline map would be); its time is recorded
apart and is in no row's ``refine_s``.

Model: ``supergen/models/tiny-wan`` (the project's small trained Wan) when it exists and loads; otherwise
a random-weight Wan built like ``supergen.tiny`` with a wider transformer, so that model forwards, not
Python overhead, dominate a step. Random weights do not make the slowly-varying predictions that caches
exploit, so the quality and skip counts of a random model say little about a trained one.

On the trained model the prompt is in its vocabulary (``supergen.cli.TINY_PROMPT``), its native size is
its sidecar's (64x64, so a 192x192 canvas), and its forwards are so small (16 tokens a tile) that the
cache's bookkeeping weighs far more against them than against a real model's: read its speedups as a
lower bound and its skip counts and fidelity as the measure.

Usage: ``python bench/cache.py [--model auto|trained|random] [--out PATH]`` (default out:
``bench/results/cache_trained_cpu.json`` for the trained model, ``cache_cpu.json`` for the random one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, print_table, write_json  # noqa: E402

TRAINED = Path(__file__).resolve().parent.parent / "supergen" / "models" / "tiny-wan"
# A random Wan built like supergen.tiny, wider (4 heads x 32, FFN 256) and with a 16x16-cell native tile:
# a tile forward then costs ~10x the tiny model's, as a real model's forward dwarfs the cache's bookkeeping.
RANDOM_MODEL = {"num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 256, "num_layers": 2}
RANDOM_NATIVE = (128, 128)  # pixels: 16x16 latent cells
TILES = (3, 3)  # canvas = 3x3 native tiles
FRAMES = 9
STEPS, REFINE_STEPS = 20, 14
GUIDANCE = 5.0
SEED = 0
CALIBRATION_SEED = 1
REHASH_GAMMA = 0.95
REPEATS = 3
THREADS = 1  # tiny ops under thread contention on a shared machine are far slower and noisier
PROMPT = {"prompt": "a red fox running through fresh snow, golden hour", "negative_prompt": "blurry, low quality"}


def build_pipeline(which: str = "auto") -> tuple[object, dict]:
    """The trained tiny Wan (``which`` = trained, or auto when it exists and loads) or the random-weight
    bench Wan; and its description, with the prompt to run it on."""
    if which != "random" and TRAINED.is_dir():
        try:
            from supergen.cli import TINY_PROMPT
            from supergen.tiny import load_pretrained

            pipe = load_pretrained(TRAINED)  # its native size (64x64) from the folder's sidecar
            pipe.set_progress_bar_config(disable=True)
            return pipe, {
                "weights": "trained",
                "source": str(TRAINED.relative_to(TRAINED.parents[2])),
                "native_size": list(pipe.native_size),
                "prompt": {"prompt": TINY_PROMPT},  # inside its vocabulary; it has no negative words
            }
        except Exception as e:  # noqa: BLE001 - any load failure falls back to the random model, recorded
            if which == "trained":
                raise
            load_error = f"{type(e).__name__}: {e}"
    elif which == "trained":
        raise SystemExit(f"bench/cache.py: --model trained needs {TRAINED}, which is not there")
    else:
        load_error = "not present" if which == "auto" else "not asked for (--model random)"
    from diffusers import WanPipeline, WanTransformer3DModel

    from supergen.tiny import TEXT_DIM, HashedPromptMixin, tiny_wan_components

    parts = tiny_wan_components()
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        parts["transformer"] = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=TEXT_DIM, freq_dim=256,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024, **RANDOM_MODEL,
        ).eval()  # fmt: skip
    finally:
        torch.random.set_rng_state(state)
    cls = type("BenchWanPipeline", (HashedPromptMixin, WanPipeline), {"native_size": RANDOM_NATIVE})
    pipe = cls(tokenizer=None, text_encoder=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {
        "weights": "RANDOM (not trained): quality and skip counts say little about a trained model",
        "source": "supergen.tiny components with a wider random transformer " + str(RANDOM_MODEL),
        "trained_model": f"supergen/models/tiny-wan: {load_error}",
        "native_size": list(RANDOM_NATIVE),
        "prompt": PROMPT,
    }


def count_bookkeeping() -> dict:
    """Wrap the cache classes' methods to sum the CPU seconds spent inside them (reset by the caller)."""
    from supergen.cache import StepRehash, TileCache

    spent = {"s": 0.0}
    for cls, names in ((TileCache, ("plan", "reuse", "record")), (StepRehash, ("computes", "reuse", "record"))):
        for name in names:
            original = getattr(cls, name)

            def timed(self, *args, _original=original, **kwargs):
                start = time.process_time()
                try:
                    return _original(self, *args, **kwargs)
                finally:
                    spent["s"] += time.process_time() - start

            setattr(cls, name, timed)
    return spent


def json_db(value: float) -> float | str:
    # JSON has no infinity: a row whose video equals the cache-off video bit for bit reads "inf".
    return "inf" if value == float("inf") else round(value, 2)


def rows_to_run(default_threshold: float) -> list[tuple[str, dict]]:
    from supergen.cache import CacheConfig

    return [
        ("off", {"config": None}),
        ("gate small", {"config": CacheConfig(mode="gate", threshold=default_threshold / 2)}),
        ("gate default", {"config": CacheConfig(mode="gate", threshold=default_threshold)}),
        ("gate large", {"config": CacheConfig(mode="gate", threshold=default_threshold * 2)}),
        ("budget 0.75", {"config": CacheConfig(mode="budget", budget=0.75)}),
        ("budget 0.5", {"config": CacheConfig(mode="budget", budget=0.5)}),
        ("rehash", {"config": "rehash"}),  # filled in once the similarity map is calibrated
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="auto",
        choices=("auto", "trained", "random"),
        help="auto: the trained tiny Wan when it is there, else the random bench Wan",
    )
    parser.add_argument(
        "--out", default=None, help="default: bench/results/cache_trained_cpu.json or cache_cpu.json (random)"
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()

    from supergen import SuperGen
    from supergen.cache import CacheConfig
    from supergen.metrics import psnr, ssim

    if not torch.cuda.is_available():
        # StageTimer reads `time.perf_counter` of supergen.metrics; on this single-threaded CPU run it
        # reads the process's CPU time instead (see the module docstring: wall time is other jobs' too).
        import types

        import supergen.metrics

        supergen.metrics.time = types.SimpleNamespace(perf_counter=time.process_time)
    pipe, model = build_pipeline(args.model)
    native = tuple(model["native_size"])
    if args.out is None:
        args.out = str(RESULTS / ("cache_trained_cpu.json" if model["weights"] == "trained" else "cache_cpu.json"))
    call = dict(
        height=TILES[0] * native[0], width=TILES[1] * native[1], num_frames=FRAMES, num_inference_steps=STEPS,
        refine_steps=REFINE_STEPS, guidance_scale=GUIDANCE, sketch_height=native[0], sketch_width=native[1],
        **model["prompt"],
    )  # fmt: skip

    def run(config, output_type):
        out = SuperGen(pipe, cache=config, native_size=native)(
            generator=torch.Generator().manual_seed(SEED), output_type=output_type, **call
        )
        return out

    # Step Rehash's offline map: one calibration pass (cache off, its own seed), timed apart.
    calibrated = SuperGen(pipe, cache=CacheConfig(mode="rehash", rehash_seed=CALIBRATION_SEED), native_size=native)(
        generator=torch.Generator().manual_seed(SEED), output_type="latent", **call
    )
    similarity = torch.tensor(calibrated.report["cache"]["similarity"])
    calibrate_s = calibrated.report["seconds"]["calibrate"]

    default = CacheConfig().threshold
    rows = rows_to_run(default)
    rows[-1][1]["config"] = CacheConfig(
        mode="rehash", rehash_gamma=REHASH_GAMMA, rehash_similarity=similarity, rehash_seed=CALIBRATION_SEED
    )
    run(None, "latent")  # warm-up: first-call allocations and lazy imports stay out of the timings

    bookkeeping = count_bookkeeping()
    seconds = {name: [] for name, _ in rows}
    overhead = {name: [] for name, _ in rows}
    results = {}
    for rep in range(REPEATS):
        for name, row in rows:  # interleaved: each repetition runs every row once
            bookkeeping["s"] = 0.0
            out = run(row["config"], "pt" if rep == 0 else "latent")
            seconds[name].append(out.report["seconds"]["refine"])
            overhead[name].append(bookkeeping["s"])
            if rep == 0:
                results[name] = {"frames": out.frames, "report": out.report, "latents": out.latents}
            elif not torch.equal(out.latents, results[name]["latents"]):
                raise RuntimeError(f"row {name!r} is not deterministic across repetitions")
            print(f"  rep {rep + 1}/{REPEATS} {name:<13} refine {seconds[name][-1]:.2f} s", flush=True)

    reference = results["off"]["frames"].float()
    off_median = statistics.median(seconds["off"])
    table = []
    for name, row in rows:
        report, frames = results[name]["report"], results[name]["frames"].float()
        cache = report["cache"] or {}
        n_tiles = report["tiling"]["tiles_per_step"] * REFINE_STEPS
        median = statistics.median(seconds[name])
        entry = {
            "row": name,
            "mode": "off" if row["config"] is None else row["config"].mode,
            "setting": None,
            "refine_s": round(median, 4),
            "refine_s_samples": [round(s, 4) for s in seconds[name]],
            "speedup": round(off_median / median, 3),
            "computed_tile_steps": cache.get("computed_tile_steps", n_tiles),
            "skipped_tile_steps": cache.get("skipped_tile_steps", 0),
            "bookkeeping_s": round(statistics.median(overhead[name]), 4),
            "psnr_db": None if name == "off" else json_db(psnr(frames, reference, data_range=1.0)),
            "ssim": None if name == "off" else round(ssim(frames, reference, data_range=1.0), 4),
            "seam_score": None if report["seam_score"] is None else round(report["seam_score"], 4),
        }
        cfg = row["config"]
        if cfg is not None:
            entry["setting"] = {
                "gate": f"threshold={cfg.threshold:g}",
                "budget": f"budget={cfg.budget:g}",
                "rehash": f"gamma={cfg.rehash_gamma:g}",
            }[cfg.mode]
        if name == "rehash":
            entry["key_steps"] = cache["key_steps"]
        table.append(entry)

    payload = {
        "benchmark": "cache",
        "environment": environment("cpu"),
        "model": model,
        "setup": {
            "canvas_px": [call["height"], call["width"]],
            "tiles_per_step": results["off"]["report"]["tiling"]["tiles_per_step"],
            "frames": FRAMES,
            "steps": STEPS,
            "refine_steps": REFINE_STEPS,
            # sketch and stage 2 (stage 2's comes from the model's sidecar: the trained tiny model refines at 1)
            "guidance_scale": results["off"]["report"]["guidance_scale"],
            "seed": SEED,
            "threads": THREADS,
            "repeats": REPEATS,
            "gate_threshold_default": default,
            "rehash": {
                "gamma": REHASH_GAMMA,
                "calibration_seed": CALIBRATION_SEED,
                "calibrate_s": round(calibrate_s, 4),
                "similarity": "cosine of the flattened canvas residuals (prediction - input) of two steps",
                "note": "the calibration pass runs once before the rows; its time is in no row's refine_s",
            },
        },
        "timing": "refine_s = median of the repeats (interleaved across rows) of the refinement stage only, in "
        "CPU seconds of this single-threaded process (wall time on the shared 2-core machine swung 2.3x between "
        "repetitions); speedup = off median / row median from this run",
        "noise": "refine_s_samples lists every repetition: on this shared machine one configuration's CPU time "
        "still varies by up to about +-25 % between repetitions, so speedups within about 0.15 of 1.0 are not "
        "significant (a row that computed every tile-step cannot be faster than off: it does the same forwards "
        "plus bookkeeping_s)",
        "fidelity": "psnr_db/ssim of the decoded video (pixels in [0, 1]) vs the cache-off video, same seed",
        "target": ">= 1.8x faster at >= 30 dB PSNR with the default gate, on the project's TRAINED model",
        "rows": table,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(Path(args.out), payload)
    print(f"\nmodel weights: {model['weights']}")
    print(
        f"canvas {call['height']}x{call['width']} px, {payload['setup']['tiles_per_step']} tiles/step, "
        f"{REFINE_STEPS} of {STEPS} steps refined, seed {SEED}; rehash calibration {calibrate_s:.2f} s (apart)"
    )
    columns = ["row", "setting", "refine_s", "speedup", "computed_tile_steps", "skipped_tile_steps",
               "bookkeeping_s", "psnr_db", "ssim", "seam_score"]  # fmt: skip
    print_table(table, columns)
    print(f"wrote {args.out} in {payload['bench_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
