"""Does supergen keep the sketch's content? Measured on the trained tiny Wan with the synthetic domain's detector.

For each case (a held-out caption of ``supergen.synthetic`` and a seed) the stock pipeline makes the
native-size sketch once; then, at each target scale (2x each side = 4x area by default):

* ``supergen``: the sketch refined on shifted tiles (``supergen generate``'s defaults);
* ``supergen-noshift``: the same run on a fixed, non-overlapping grid (the seam ablation);
* ``naive``: every step tiled from the seed's noise on a fixed grid, with no sketch
  (``supergen.compare.Comparison.naive``).

Measures (targets from issue 8):

* **seam score** (``metrics.seam_score`` on the last step's tile edges, 1.0 = no seam): supergen's mean
  over the cases <= 1.05; the fixed grid and naive tiling beside it. Controls on the same lines: the
  untiled refinement (no tiles, same decoder), the bicubic sketch; and the score against the edges'
  adjacent grid lines only (``reference="adjacent"``), which controls for where the content lies;
* **duplication**: the detector's object count (``synthetic.detect_objects(frames).count``) of the
  output against the sketch's; supergen must match on >= 90 % of the cases; naive tiling beside it;
* **consistency**: PSNR (dB, frames in [0, 1]) of the output area-averaged to the sketch size against
  the decoded sketch (``metrics.downsampled_psnr``);
* **native quality**: the fraction of sketches (9 x 64 x 64) in which every prompted object is visible
  with its colour and class (``DetectionResult.visible(colour, shape)``); target: most (> 50 %).

Usage: ``python bench/quality.py [--model PATH] [--cases 20] [--scale 2 3] [--out FILE]``; writes
``bench/results/quality_<device>.json`` (per-case rows, summary, targets, pass/fail, the command).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from supergen.config import REFINE_FRACTION, TilingConfig, check_guidance, default_refine_steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_slug, environment, print_table, write_json  # noqa: E402

#: Held-out clip seeds for the captions: training draws clips from 1e7, 2e7 and 3e7 on, and
#: training/eval_tiny_wan.py uses 9e7 .. 9e7 + 1999.
PROMPT_SEEDS = 90_002_000
#: Issue 8 asks for the count on 20 cases; the seam score's mean over 20 has a standard error of
#: 0.05-0.06 (it depends on where each case's objects lie against the edge lines), as large as the
#: target's margin, so the bench runs 60 (about 0.03) and also summarises the first 20 on their own.
CASES = 60
FIRST = 20
TARGETS = {
    "seam_score_mean_max": 1.05,
    "count_match_fraction_min": 0.9,
    "native_visible_fraction_above": 0.5,
}
METHODS = ("supergen", "supergen-noshift", "untiled", "naive")


def cases(n: int) -> list[dict]:
    """``n`` (caption, seed) cases: alternately one- and two-object captions, seed = case index."""
    from supergen import synthetic

    out = []
    for i in range(n):
        clip = synthetic.sample_clip(PROMPT_SEEDS + i, max_objects=1 if i % 2 == 0 else 2)
        out.append({"case": i, "prompt": clip.caption, "seed": i, "clip_seed": PROMPT_SEEDS + i})
    return out


def channels_first(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) → (F, 3, H, W) float64."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(frames, -1, 1))).double()


def last_step_edges(comparison, method: str, height: int, width: int) -> tuple[list[int], list[int]]:
    """Pixel rows/columns of the tile edges of ``method``'s last step: where its seam score looks."""
    from supergen.stages import check_inputs

    if method == "untiled":
        return [], []
    sg = comparison.shifted if method == "supergen" else comparison.fixed
    refine_steps = comparison.steps if method == "naive" else comparison.refine_steps
    native_h, native_w = comparison.native_size
    plan, grid = check_inputs(
        sg.adapter.spec, height=height, width=width, sketch_height=native_h, sketch_width=native_w,
        num_frames=comparison.num_frames, num_inference_steps=comparison.steps, refine_steps=refine_steps,
        tiling=sg.tiling,
    )  # fmt: skip
    rows, cols = grid.edges(plan.refine_steps - 1)
    s = sg.adapter.spec.vae_scale[1]
    return [r * s for r in rows], [c * s for c in cols]


def measure_case(pipe, case: dict, scales: list[int], settings: dict) -> dict:
    from supergen import synthetic
    from supergen.compare import Comparison
    from supergen.metrics import downsampled_psnr, seam_score

    comparison = Comparison(
        pipe, prompt=case["prompt"], num_frames=settings["frames"], num_inference_steps=settings["steps"],
        refine_steps=settings["refine_steps"], guidance_scale=settings["guidance_scale"],
        refine_guidance_scale=settings["refine_guidance_scale"], shift_period=settings["shift_period"],
    )  # fmt: skip
    sketch = comparison.sketch(case["seed"])
    found = synthetic.detect_objects(sketch.frames)
    wanted = synthetic.parse_caption(case["prompt"])
    row = dict(
        case,
        prompted_objects=len(wanted),
        sketch_count=found.count,
        native_visible=all(found.visible(c, s) for c, s in wanted),
        native_colour_visible=all(found.visible(c) for c, _ in wanted),
        sketch_seconds=round(sketch.seconds, 3),
    )
    reference = channels_first(sketch.frames)
    native = comparison.native_size
    grid_px = comparison.shifted.adapter.spec.pixel_multiple()  # the lines a tile edge can lie on
    for scale in scales:
        height, width = native[0] * scale, native[1] * scale
        per_method = {}
        # The content's own jumps: the bicubic sketch has no tiles, so its score on a method's edge lines
        # is what that method would score without any seam (1.0 only for content without structure).
        bicubic = channels_first(comparison.bicubic(sketch, height, width).frames)
        # The same refinement with one tile over the canvas: what the edge lines look like without tiles.
        untiled = comparison.untiled(sketch, height, width)
        untiled_video = channels_first(untiled.frames)
        for method in METHODS:
            if method == "naive":
                v = comparison.naive(case["seed"], height, width)
            elif method == "untiled":
                v = untiled
            else:
                v = comparison.supergen(sketch, height, width, shift=method == "supergen")
            count = synthetic.detect_objects(v.frames).count
            rows_px, cols_px = last_step_edges(comparison, method, height, width)
            video = channels_first(v.frames)
            per_method[method] = {
                "seam_score": v.seam,
                # seam_score is None where there is no interior edge (the untiled method)
                "seam_score_all_lines": seam_score(video, rows_px, cols_px),
                "seam_score_untiled_same_lines": seam_score(untiled_video, rows_px, cols_px),
                "seam_score_bicubic_same_lines": seam_score(bicubic, rows_px, cols_px),
                # The headline score's own control: the untiled refinement, same lines, same grid reference.
                "seam_score_untiled_grid_same_lines": seam_score(untiled_video, rows_px, cols_px, grid_px),
                # Edge lines against their neighbours on the grid only (content layout controlled), and
                # the untiled refinement scored the same way.
                "seam_score_adjacent": seam_score(video, rows_px, cols_px, grid_px, "adjacent"),
                "seam_score_adjacent_untiled_same_lines": seam_score(
                    untiled_video, rows_px, cols_px, grid_px, "adjacent"
                ),  # fmt: skip
                "count": count,
                "count_matches_sketch": count == found.count,
                "psnr_vs_sketch_db": downsampled_psnr(video, reference, data_range=1.0),
                "tiles_per_step": v.tiles,
                "seconds": round(v.seconds, 3),
            }
        row[f"x{scale}"] = per_method
    return row


def summarise(rows: list[dict], scales: list[int]) -> dict:
    n = len(rows)
    summary = {
        "cases": n,
        "native": {
            "visible_fraction": sum(r["native_visible"] for r in rows) / n,
            "colour_visible_fraction": sum(r["native_colour_visible"] for r in rows) / n,
            "count_equals_prompt_fraction": sum(r["sketch_count"] == r["prompted_objects"] for r in rows) / n,
        },
    }
    for scale in scales:
        per = {}
        for method in METHODS:
            cells = [r[f"x{scale}"][method] for r in rows]
            measured = [c for c in cells if c["seam_score"] is not None]
            seams = [c["seam_score"] for c in measured]
            psnrs = [c["psnr_vs_sketch_db"] for c in cells]
            # A match on a sketch without objects is vacuous (0 == 0): also report the cases that have some.
            shown = [c for c, r in zip(cells, rows) if r["sketch_count"] > 0]

            def mean(key, cells=measured):
                values = [c[key] for c in cells if c[key] is not None]
                return statistics.fmean(values) if values else None

            def excess(key, cells=measured):
                # The method's all-lines score over a control's on the same lines (1.0 = no stronger there).
                pairs = [(c["seam_score_all_lines"], c[key]) for c in cells if c[key]]
                return statistics.fmean(a / b for a, b in pairs) if pairs else None

            per[method] = {
                # Edge lines against the other lines of the patch grid (metrics.seam_score(grid=...)).
                "seam_score_mean": statistics.fmean(seams) if seams else None,
                "seam_score_max": max(seams) if seams else None,
                # The mean's standard error: the seam score of one case depends on where its objects lie
                # relative to the edge lines, so 20 cases resolve the mean only to about +-0.05..0.1.
                "seam_score_sem": statistics.stdev(seams) / len(seams) ** 0.5 if len(seams) > 1 else None,
                # Edge lines against every line, and two controls on the same lines: the bicubic sketch and
                # the untiled refinement of the same sketch (no tiles, same decoder).
                "seam_score_all_lines_mean": mean("seam_score_all_lines"),
                "seam_score_bicubic_same_lines_mean": mean("seam_score_bicubic_same_lines"),
                "seam_score_untiled_same_lines_mean": mean("seam_score_untiled_same_lines"),
                "seam_excess_mean": excess("seam_score_bicubic_same_lines"),
                "seam_excess_vs_untiled_mean": excess("seam_score_untiled_same_lines"),
                "seam_score_untiled_grid_same_lines_mean": mean("seam_score_untiled_grid_same_lines"),
                "seam_score_adjacent_mean": mean("seam_score_adjacent"),
                "seam_score_adjacent_untiled_same_lines_mean": mean("seam_score_adjacent_untiled_same_lines"),
                "count_match_fraction": sum(c["count_matches_sketch"] for c in cells) / n,
                "count_match_fraction_sketch_has_objects": (
                    sum(c["count_matches_sketch"] for c in shown) / len(shown) if shown else None
                ),
                "count_mean": statistics.fmean(c["count"] for c in cells),
                # The median: a PSNR is inf for a perfect match, which a mean would let dominate.
                "psnr_vs_sketch_db_median": statistics.median(psnrs),
                "seconds_mean": statistics.fmean(c["seconds"] for c in cells),
            }
        summary[f"x{scale}"] = per
    summary["sketch_count_mean"] = statistics.fmean(r["sketch_count"] for r in rows)
    summary["sketches_with_objects"] = sum(r["sketch_count"] > 0 for r in rows)
    return summary


def verdicts(summary: dict, scales: list[int]) -> dict:
    out = {"native_visible": summary["native"]["visible_fraction"] > TARGETS["native_visible_fraction_above"]}
    for scale in scales:
        sg = summary[f"x{scale}"]["supergen"]
        seam = sg["seam_score_mean"]
        out[f"x{scale}_seam"] = seam is not None and seam <= TARGETS["seam_score_mean_max"]
        out[f"x{scale}_duplication"] = sg["count_match_fraction"] >= TARGETS["count_match_fraction_min"]
    out["all"] = all(out.values())
    return out


_WORKER: dict = {}


def _worker_start(folder: str, device: str, threads: int) -> None:
    from supergen.tiny import load_pretrained

    torch.set_num_threads(threads)
    _WORKER["pipe"] = load_pretrained(Path(folder)).to(device)
    _WORKER["pipe"].set_progress_bar_config(disable=True)


def _worker_case(job):
    case, scales, settings = job
    return measure_case(_WORKER["pipe"], case, scales, settings)


def _measure_all(folder: Path, args, scales: list[int], settings: dict):
    """Rows in case order; ``--jobs`` > 1 spreads the cases over processes (each loads the model once)."""
    jobs = [(case, scales, settings) for case in cases(args.cases)]
    if args.jobs == 1:
        _worker_start(str(folder), args.device, args.threads)
        yield from map(_worker_case, jobs)
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork after torch has started its thread pools
    with ctx.Pool(args.jobs, _worker_start, (str(folder), args.device, args.threads)) as pool:
        yield from pool.imap(_worker_case, jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a tiny-Wan diffusers folder (default: the trained embedded one)")
    parser.add_argument("--cases", type=int, default=CASES, help="prompt x seed cases")
    parser.add_argument("--scale", type=int, nargs="+", default=[2], help="target scale(s) per side, e.g. 2 3")
    parser.add_argument("--steps", type=int, default=None, help="N (default: the model's sidecar)")
    parser.add_argument("--refine-steps", type=int, default=None, help="k (default: model's share of N)")
    parser.add_argument(
        "--refine-guidance-scale",
        type=float,
        default=None,
        help="stage 2's guidance (default: the model's sidecar value, else its guidance_scale)",
    )
    parser.add_argument(
        "--shift-period",
        type=int,
        default=TilingConfig.shift_period,
        help="supergen's TilingConfig.shift_period: the longest sweep of a tile in shift steps (smaller: faster drift)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny ops: 1 is fastest)")
    parser.add_argument("--jobs", type=int, default=1, help="cases measured in parallel processes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--out", default=None, help="JSON (default: bench/results/quality_<device>.json)")
    args = parser.parse_args(argv)

    from supergen.tiny import read_sidecar, trained_model_dir

    folder = Path(args.model) if args.model else trained_model_dir()
    if folder is None:
        print("quality: the trained tiny model is not installed (supergen/models/tiny-wan/model_index.json is "
              "missing); train it (training/README.md) or pass --model PATH.", file=sys.stderr)  # fmt: skip
        return 2
    if not (folder / "model_index.json").is_file():
        print(f"quality: --model {str(folder)!r} is not a diffusers pipeline folder (no model_index.json).",
              file=sys.stderr)  # fmt: skip
        return 2
    for flag, value in (("--cases", args.cases), ("--threads", args.threads), ("--jobs", args.jobs),
                        ("--steps", args.steps or 1),
                        ("--refine-steps", args.refine_steps or 1), ("--shift-period", args.shift_period),
                        *(("--scale", s) for s in args.scale)):  # fmt: skip
        if value < 1:
            print(f"quality: {flag} must be >= 1 but is {value}.", file=sys.stderr)
            return 2
    sidecar = read_sidecar(folder)
    steps = args.steps or sidecar.get("num_inference_steps", 20)
    settings = {
        "frames": sidecar.get("num_frames", 9),
        "steps": steps,
        "refine_steps": args.refine_steps
        or default_refine_steps(steps, sidecar.get("refine_fraction", REFINE_FRACTION)),
        "guidance_scale": sidecar.get("guidance_scale", 5.0),
        "shift_period": args.shift_period,
    }
    refine_guidance = args.refine_guidance_scale
    if refine_guidance is None:
        refine_guidance = sidecar.get("refine_guidance_scale", settings["guidance_scale"])
    try:
        settings["refine_guidance_scale"] = check_guidance("--refine-guidance-scale", refine_guidance)
    except ValueError as e:
        print(f"quality: {e}", file=sys.stderr)
        return 2
    if settings["refine_steps"] > steps:
        print(f"quality: --refine-steps must be in [1, {steps}] but is {settings['refine_steps']}.", file=sys.stderr)
        return 2
    scales = sorted(set(args.scale))
    out = Path(args.out) if args.out else RESULTS / f"quality_{device_slug(args.device)}.json"

    torch.set_num_threads(args.threads)
    env = environment(args.device)
    # The command as given (environment() reads sys.argv, which is the caller's when main() is called).
    given = sys.argv[1:] if argv is None else argv
    env["command"] = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "bench/quality.py", *given])
    started = time.perf_counter()
    rows = []
    for row in _measure_all(folder, args, scales, settings):
        rows.append(row)
        cells = "  ".join(
            f"x{s} {m} count {row[f'x{s}'][m]['count']} seam {row[f'x{s}'][m]['seam_score']:.3f}"
            for s in scales
            for m in ("supergen", "naive")
        )
        print(f"[{time.perf_counter() - started:6.0f} s] case {row['case']:2d} sketch count {row['sketch_count']} "
              f"native {'ok' if row['native_visible'] else 'MISS'}  {cells}", flush=True)  # fmt: skip
    summary = summarise(rows, scales)
    if len(rows) > FIRST:  # the 20 cases on their own
        summary[f"first_{FIRST}"] = summarise(rows[:FIRST], scales)
        summary[f"first_{FIRST}_pass"] = verdicts(summary[f"first_{FIRST}"], scales)
    passed = verdicts(summary, scales)
    payload = {
        "benchmark": "quality",
        "model": str(folder),
        "model_sidecar": {k: v for k, v in sidecar.items() if k != "vocabulary"},
        "settings": dict(settings, scales=scales, native_size=list(sidecar.get("native_size", ())),
                         threads=args.threads, jobs=args.jobs, device=args.device,
                         prompts=f"supergen.synthetic.sample_clip({PROMPT_SEEDS} + i).caption, generation seed i"),
        "targets": TARGETS,
        "summary": summary,
        "pass": passed,
        "seconds_total": round(time.perf_counter() - started, 1),
        "environment": env,
        "command": env["command"],
        "cases": rows,
    }  # fmt: skip
    write_json(out, payload)

    def line(measure, value, target="", ok=""):
        return {"measure": measure, "value": value, "target": target, "pass": ok}

    table = [line("native: prompted colour+class visible", summary["native"]["visible_fraction"], "> 0.5",
                  passed["native_visible"])]  # fmt: skip
    for s in scales:
        for m in METHODS:
            x, sg = summary[f"x{s}"][m], m == "supergen"
            table += [
                line(f"x{s} {m}: seam score (mean)", x["seam_score_mean"], "<= 1.05" if sg else "",
                     passed[f"x{s}_seam"] if sg else ""),
                line(f"x{s} {m}: its standard error", x["seam_score_sem"]),
                line(f"x{s} {m}: the untiled refinement, same lines and score",
                     x["seam_score_untiled_grid_same_lines_mean"]),
                line(f"x{s} {m}: seam score against adjacent grid lines", x["seam_score_adjacent_mean"]),
                line(f"x{s} {m}: the untiled refinement, same lines, adjacent",
                     x["seam_score_adjacent_untiled_same_lines_mean"]),
                line(f"x{s} {m}: seam score against all lines", x["seam_score_all_lines_mean"]),
                line(f"x{s} {m}: excess over the untiled refinement there", x["seam_excess_vs_untiled_mean"]),
                line(f"x{s} {m}: excess over the bicubic sketch there", x["seam_excess_mean"]),
                line(f"x{s} {m}: count = sketch count", x["count_match_fraction"], ">= 0.9" if sg else "",
                     passed[f"x{s}_duplication"] if sg else ""),
                line(f"x{s} {m}: PSNR vs sketch, dB (median)", x["psnr_vs_sketch_db_median"]),
            ]  # fmt: skip
    print_table(table, ["measure", "value", "target", "pass"])
    print(f"wrote {out} ({'PASS' if passed['all'] else 'FAIL'}, {payload['seconds_total']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
