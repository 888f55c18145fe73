"""Noise reshifting of the sketch (``ReshiftConfig``): what it saves and what it costs.

* **Speed** (``speed``): stage 1 alone, the stock sketch against the reshifted one (the first K of N
  steps at the native size, one more native forward for the clean estimate, the rest at ``scale`` of
  the size per side), same model, prompt and seed, timed alternately in one process (best of
  ``repeats``); the ratio is what counts. Model: bench/e2e.py's profile for the device (CPU: a small
  Wan-architecture transformer whose native forward spends ~75 % of its time in attention, as Wan 2.1
  1.3B at 480p; CUDA: the full-size 1.3B architecture in bf16 at 480p). Also the tokens each variant
  feeds the transformer, and the attention cost in token-pairs.
* **Quality** (``quality``): on the trained tiny model (64x64, 20 steps), the synthetic domain's
  detector on the sketches of bench/quality.py's held-out captions: every prompted colour visible,
  colour and class visible, object count = prompt, for the stock sketch and each reshift setting, and
  the PSNR of the reshifted sketch (resized to 64x64) against the stock one. The tiny model's native
  forward is 16 tokens, so it gains nothing from fewer tokens, and a 32x32 sketch is far below any size
  it saw in training; a real model keeps more at half its native size, where SURF's preview generates.

Usage: ``python bench/reshift.py [--device cpu|cuda] [--cases 20] [--out PATH]``
(default out: ``bench/results/reshift_<device>.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, device_slug, environment, print_table, write_json  # noqa: E402

SPEED = {"steps": 8, "native_steps": 2, "scale": 0.5, "repeats": 3, "frames": 5}
QUALITY = {"steps": 20, "settings": [(5, 0.5), (10, 0.5), (5, 0.75), (10, 0.75)]}


def _sketch(sg, plan, reshift, generator, text):
    from supergen import stages

    if reshift is None:
        return stages.sketch(sg.adapter, plan, None, generator=generator, **text)
    return stages.reshifted_sketch(sg.adapter, plan, reshift, sg.pipe.scheduler, generator=generator, **text)


def _plan(sg, height, width, frames, steps):
    from supergen import TilingConfig, stages

    return stages.check_inputs(
        sg.adapter.spec, height=height, width=width, sketch_height=height, sketch_width=width, num_frames=frames,
        num_inference_steps=steps, refine_steps=1, tiling=TilingConfig(),
    )[0]  # fmt: skip


def speed(device: str) -> dict:
    import e2e

    from supergen import SuperGen
    from supergen.config import ReshiftConfig

    torch.set_num_threads(1)  # as bench/e2e.py: tiny ops under thread contention swamp the ratio
    pipe = e2e.build_pipeline(device)
    T, h, w = e2e.PROFILES[device]["native_latent"]
    s = pipe.vae_scale_factor_spatial
    frames = (T - 1) * pipe.vae_scale_factor_temporal + 1
    text = e2e.text_inputs(device)
    sg = SuperGen(pipe, native_size=(h * s, w * s))
    plan = _plan(sg, h * s, w * s, frames, SPEED["steps"])
    reshift = ReshiftConfig(native_steps=SPEED["native_steps"], scale=SPEED["scale"])
    tokens = {"stock": [], "reshift": []}
    current = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: current.append(int(kw["hidden_states"][0, 0].numel() // 4)), with_kwargs=True
    )  # tokens per forward: (T/pt) x (h/2) x (w/2) of a 2x2 patch
    seconds = {"stock": [], "reshift": []}
    _sketch(sg, plan, None, torch.Generator(device).manual_seed(0), text)  # warm-up
    for _ in range(SPEED["repeats"]):
        for name, config in (("stock", None), ("reshift", reshift)):
            current.clear()
            e2e._sync(device)
            start = time.perf_counter()
            _sketch(sg, plan, config, torch.Generator(device).manual_seed(0), text)
            e2e._sync(device)
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = list(current)
    hook.remove()
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "model": {**e2e.PROFILES[device]["model"], "native_latent": [T, h, w]},
        "settings": dict(SPEED),
        "seconds_best": best,
        "seconds_all": seconds,
        "speedup": best["stock"] / best["reshift"],
        "forwards": {k: len(v) for k, v in tokens.items()},
        "tokens_fed": {k: sum(v) for k, v in tokens.items()},
        "attention_token_pairs": {k: sum(n * n for n in v) for k, v in tokens.items()},
    }


def quality(cases: int) -> dict:
    import quality as q

    from supergen import SuperGen, synthetic
    from supergen.config import ReshiftConfig
    from supergen.metrics import psnr
    from supergen.tiny import load_pretrained, read_sidecar, trained_model_dir
    from supergen.upscale import resize_frames

    torch.set_num_threads(1)
    folder = trained_model_dir()
    guidance = float(read_sidecar(folder).get("guidance_scale", 5.0))
    pipe = load_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    sg = SuperGen(pipe)
    height, width = sg.native_size
    plan = _plan(sg, height, width, 9, QUALITY["steps"])
    settings = [None] + [ReshiftConfig(native_steps=k, scale=s) for k, s in QUALITY["settings"]]
    rows = {("stock" if c is None else f"K={c.native_steps} scale={c.scale}"): [] for c in settings}
    for case in q.cases(cases):
        text = {"prompt": case["prompt"], "negative_prompt": "", "guidance_scale": guidance}
        wanted = synthetic.parse_caption(case["prompt"])
        stock_pixels = None
        for name, config in zip(rows, settings):
            latents = _sketch(sg, plan, config, torch.Generator().manual_seed(case["seed"]), text)
            with torch.no_grad():
                pixels = sg.adapter.decode(latents).float()
            pixels = resize_frames(pixels, (height, width)).clamp(-1, 1) if pixels.shape[-1] != width else pixels
            frames = pipe.video_processor.postprocess_video(pixels, output_type="np")[0]
            found = synthetic.detect_objects(frames)
            if config is None:
                stock_pixels = pixels
            rows[name].append({
                "colour": all(found.visible(c) for c, _ in wanted),
                "class": all(found.visible(c, s) for c, s in wanted),
                "count": found.count == len(wanted),
                "psnr_vs_stock_db": psnr(pixels, stock_pixels) if config is not None else None,
            })  # fmt: skip
    summary = {}
    for name, cells in rows.items():
        psnrs = [c["psnr_vs_stock_db"] for c in cells if c["psnr_vs_stock_db"] is not None]
        summary[name] = {
            "colour_visible": statistics.fmean(c["colour"] for c in cells),
            "colour_and_class_visible": statistics.fmean(c["class"] for c in cells),
            "count_equals_prompt": statistics.fmean(c["count"] for c in cells),
            "psnr_vs_stock_db_median": statistics.median(psnrs) if psnrs else None,
        }
    return {"model": "supergen/models/tiny-wan", "steps": QUALITY["steps"], "cases": cases, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--cases", type=int, default=20, help="held-out captions for the quality part (0: skip)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.cases < 0:
        print(f"reshift: --cases must be >= 0 but is {args.cases}.", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / f"reshift_{device_slug(args.device)}.json"
    payload = {"benchmark": "reshift", "environment": environment(args.device), "speed": speed(args.device)}
    sp = payload["speed"]
    columns = ["variant", "seconds", "forwards", "tokens fed", "attention pairs"]
    print_table([{"variant": k, "seconds": round(sp["seconds_best"][k], 3), "forwards": sp["forwards"][k],
                  "tokens fed": sp["tokens_fed"][k], "attention pairs": sp["attention_token_pairs"][k]}
                 for k in ("stock", "reshift")], columns)  # fmt: skip
    print(f"stage-1 speedup with reshifting: {sp['speedup']:.2f}x")
    if args.cases:
        payload["quality"] = quality(args.cases)
        print_table([{"sketch": k, **{m: round(v, 3) if v is not None else None for m, v in s.items()}}
                     for k, s in payload["quality"]["summary"].items()],
                    ["sketch", "colour_visible", "colour_and_class_visible", "count_equals_prompt",
                     "psnr_vs_stock_db_median"])  # fmt: skip
    payload["command"] = payload["environment"].get("command")
    write_json(out, payload)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
