"""Measure the embedded tiny Wan on its own domain with the rule-based detector (``supergen.synthetic``).

    python training/eval_tiny_wan.py supergen/models/tiny-wan --prompts 24 --out /tmp/eval.json

Two measures, both at the native size (9 x 64 x 64):

* **VAE**: PSNR of reconstructions of held-out clips, and whether the detector finds in the
  reconstruction the same objects (colour, class, count) it finds in the clip;
* **generation**: for held-out captions (the caption of a clip the model never saw) and one seed each,
  generate with the stock ``WanPipeline`` and check with the detector that every prompted colour is
  visible in at least half the frames, with the prompted class, that the object count equals the
  number of prompted objects, and that the prompted objects move.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from supergen import synthetic

EVAL_DATA = 90_000_000  # clip seeds never used in training (training uses 1e7.. and 2e7.. offsets)


def load(path: Path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def moved(track: synthetic.Track, pixels: float = 3.0) -> bool:
    """The object's centroid gets at least ``pixels`` away from where it first appears."""
    rows = np.flatnonzero(np.isfinite(track.centroids[:, 0]))
    if len(rows) < 2:
        return False
    return bool(np.max(np.linalg.norm(track.centroids[rows] - track.centroids[rows[0]], axis=1)) >= pixels)


def judge(frames: np.ndarray, caption: str) -> dict:
    """Detector verdicts for one (T, H, W, 3) clip in [0, 1] against its caption."""
    wanted = synthetic.parse_caption(caption)
    found = synthetic.detect_objects(frames)
    colour_ok = all(found.visible(c) for c, _ in wanted)
    class_ok = all(found.visible(c, s) for c, s in wanted)
    tracks = [t for t in found.tracks if t.present >= len(frames) // 2]
    motion_ok = all(any(moved(t) for t in tracks if t.colour == c) for c, _ in wanted)
    return {
        "caption": caption,
        "colour": colour_ok,
        "class": class_ok,
        "count": found.count == len(wanted),
        "moves": motion_ok,
        "found": sorted({(t.colour, t.shape) for t in tracks}),
        "counts": found.counts,
    }


@torch.no_grad()
def eval_vae(pipe, n: int) -> dict:
    vae = pipe.vae
    psnr, same = [], 0
    for i in range(n):
        clip = synthetic.sample_clip(EVAL_DATA + i)
        x = torch.from_numpy(clip.video)[None]
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample[0].numpy()
        mse = float(np.mean((recon - clip.video) ** 2))
        psnr.append(10 * np.log10(4.0 / max(mse, 1e-12)))  # peak-to-peak 2 in [-1, 1]
        a = synthetic.detect_objects(clip.frames())
        b = synthetic.detect_objects(synthetic.to_unit_frames(recon))
        key = lambda r: (r.count, sorted((t.colour, t.shape) for t in r.tracks if t.present >= 5))  # noqa: E731
        same += key(a) == key(b)
    return {"clips": n, "psnr_db": round(float(np.mean(psnr)), 2), "detector_agrees": same / n}


@torch.no_grad()
def eval_generation(pipe, n: int, steps: int, guidance: float) -> dict:
    rows = []
    for i in range(n):
        # Alternate one- and two-object captions so both kinds are measured.
        clip = synthetic.sample_clip(EVAL_DATA + 1000 + i, max_objects=1 if i % 2 == 0 else 2)
        video = pipe(
            prompt=clip.caption,
            height=synthetic.SIZE,
            width=synthetic.SIZE,
            num_frames=synthetic.FRAMES,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(i),
            output_type="np",
        ).frames[0]
        rows.append(judge(video, clip.caption))
    summary = {k: sum(r[k] for r in rows) / n for k in ("colour", "class", "count", "moves")}
    return {"prompts": n, "steps": steps, "guidance_scale": guidance, "rates": summary, "per_prompt": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--vae-clips", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.perf_counter()
    pipe = load(args.model)
    result = {"model": str(args.model), "vae": eval_vae(pipe, args.vae_clips)}
    print(json.dumps(result["vae"]), flush=True)
    result["generation"] = eval_generation(pipe, args.prompts, args.steps, args.guidance)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps({k: result["generation"][k] for k in ("prompts", "rates")}), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
