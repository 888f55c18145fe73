"""End-to-end benchmark: direct full-canvas denoising vs supergen's tiled refinement.

Same model, same steps, same seed, same starting latent, at 4x and 9x the model's native area; each
configuration runs in its own subprocess, so the peak memory of one never hides in another. Reports:

* ``speedup`` = direct seconds / supergen seconds (the denoising loop only: same k steps, CFG on);
* on CUDA also ``speedup_supergen_attention``: the tiled run with the model's attention routed through
  supergen's ``masked_attention`` kernel (all blocks active), against the same stock direct run;
* ``memory_ratio`` = supergen peak / direct peak, each the peak RSS above the idle process (model
  built, inputs allocated, one warm-up forward done);
* the share of a native-tile forward spent in attention (torch.profiler, median of several runs).

Two profiles, picked by ``--device``:

* ``cpu``: a small Wan-architecture transformer (random weights) sized so that a native-tile forward
  spends about 70-75 % of its time in attention, as Wan 2.1 1.3B does at 480p; it runs single-threaded
  so that timings stay stable on a shared machine (measured: tiny ops under thread contention are up to
  15x slower with 2 threads, which would swamp the ratios). Prompts go through the hashed-word encoder.
* ``cuda``: the full-size Wan 2.1 T2V 1.3B transformer (30 layers, 12 heads of 128, FFN 8960; random
  weights: the same FLOPs and bytes as the real ones) in bf16 with native 480p tiles (81 frames,
  480x832: 21x60x104 latent cells), so 9x area is 1440x2496. Text is random ``prompt_embeds`` of T5's
  shape (512 x 4096), as an offline pipeline hands them over. Memory is the CUDA allocator's peak above
  the idle process (model, inputs, warm-up done). The direct 9x forward attends over 294 840 tokens.

Usage: ``python bench/e2e.py [--device cpu|cuda] [--areas 4 9] [--out PATH]`` (default out:
``bench/results/e2e_<device>.json``, e.g. ``e2e_cpu.json``, ``e2e_nvidia-h100-80gb-hbm3.json``; rewritten
after each area, so a run stopped early keeps the areas it finished: ``"complete": false``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import device_name, device_slug, git_sha, write_json  # noqa: E402

AREAS = (4, 9)
GUIDANCE = 5.0
SEED = 0
THREADS = 1
PROMPT = {"prompt": "a lighthouse on a cliff in a storm", "negative_prompt": "blurry"}
TARGETS_9X = {"speedup_min": 5.5, "memory_ratio_max": 0.2}
#: Wan 2.1 T2V 1.3B's transformer config (its model card's config.json), less what ``build_pipeline``
#: sets for both profiles.
WAN_1_3B = {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30,
            "text_dim": 4096, "eps": 1e-6}  # fmt: skip
#: Per device: the transformer, the native latent (T, h, w), dtype, denoising steps, timed repeats per
#: configuration (best of), and the text embedding shape (None: hashed-word prompts).
PROFILES = {
    "cpu": {"model": {"num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "num_layers": 2},
            "native_latent": (2, 76, 76), "dtype": torch.float32, "steps": 2, "repeats": {"direct": 3, "supergen": 3},
            "text": None},
    # One direct 9x step is about a minute on an H100; the tiled runs are short enough to repeat.
    "cuda": {"model": WAN_1_3B, "native_latent": (21, 60, 104), "dtype": torch.bfloat16, "steps": 2,
             "repeats": {"direct": 1, "supergen": 2, "supergen-attention": 2}, "text": (512, 4096)},
}  # fmt: skip
#: What each worker runs: the stock pipeline on the whole canvas, supergen's tiled refinement with the
#: model's stock attention, and (GPU only: on the CPU the op falls back to its reference) the same with
#: the model's attention routed through supergen's masked_attention kernel, all blocks active.
MODES = {"cpu": ("direct", "supergen"), "cuda": ("direct", "supergen", "supergen-attention")}


def build_pipeline(device: str = "cpu"):
    from diffusers import WanPipeline, WanTransformer3DModel

    from supergen.tiny import TEXT_DIM, HashedPromptMixin, tiny_wan_components

    profile = PROFILES[device]
    parts = tiny_wan_components()  # the VAE (8x, 4x in time, as Wan's) and Wan's UniPC scheduler
    torch.manual_seed(SEED)
    config = {"text_dim": TEXT_DIM, **profile["model"]}
    with torch.device(device):  # weights initialised where they run: 1.3B on the CPU takes minutes
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=16, out_channels=16, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", **config,
        ).eval()  # fmt: skip
    if profile["dtype"] != torch.float32:
        # As from_pretrained(torch_dtype=...) loads it: the modules Wan keeps in fp32 stay fp32.
        keep = set(transformer._keep_in_fp32_modules or ())
        for name, tensor in (*transformer.named_parameters(), *transformer.named_buffers()):
            if tensor.is_floating_point() and not keep.intersection(name.split(".")):
                tensor.data = tensor.data.to(profile["dtype"])
    parts["transformer"] = transformer
    cls = type("BenchWanPipeline", (HashedPromptMixin, WanPipeline), {})
    pipe = cls(tokenizer=None, text_encoder=None, **parts).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_inputs(device: str) -> dict:
    """The pipeline's text arguments: prompts (hashed) on the CPU, T5-shaped random embeddings on CUDA."""
    shape = PROFILES[device]["text"]
    if shape is None:
        return dict(PROMPT)
    g = torch.Generator(device).manual_seed(SEED + 1)
    dtype = PROFILES[device]["dtype"]
    return {
        "prompt_embeds": torch.randn((1, *shape), generator=g, device=device).to(dtype),
        "negative_prompt_embeds": torch.randn((1, *shape), generator=g, device=device).to(dtype),
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def attention_share(pipe, device: str = "cpu", runs: int = 5) -> dict:
    """Fraction of a native-tile forward's time inside scaled_dot_product_attention: CPU time on the
    CPU; on CUDA the attention op's kernel time over the forward's synchronised wall time."""
    from torch.profiler import ProfilerActivity, profile, record_function

    T, h, w = PROFILES[device]["native_latent"]
    x = torch.randn(1, 16, T, h, w, generator=torch.Generator().manual_seed(SEED)).to(device)
    text = pipe.encode_prompt(**{"prompt": None, **_positive(text_inputs(device))}, do_classifier_free_guidance=False,
                              device=device)[0]  # fmt: skip
    args = {"hidden_states": x.to(pipe.transformer.dtype), "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": text}  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    shares, seconds = [], []
    with torch.no_grad():
        pipe.transformer(**args)  # warm-up
        for _ in range(runs):
            _sync(device)
            with profile(activities=activities) as prof:
                with record_function("forward"):
                    start = time.perf_counter()
                    pipe.transformer(**args)
                    _sync(device)
                    seconds.append(time.perf_counter() - start)
            events = prof.key_averages()
            if device == "cuda":
                # The attention op's kernels over the forward's synchronised wall time (the GPU is
                # never idle inside it; summing all events would count the profiler's own GPU ranges).
                attention = max(e.device_time_total for e in events if "scaled_dot_product" in e.key)
                total = seconds[-1] * 1e6
            else:
                attention = max(e.cpu_time_total for e in events if "scaled_dot_product" in e.key)
                total = next(e.cpu_time_total for e in events if e.key == "forward")
            shares.append(attention / total)
    # Where the time went in the last run (ops by their own time), so a share can be checked.
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:10]
    return {
        "median": statistics.median(shares),
        "runs": shares,
        "forward_seconds_median": statistics.median(seconds),
        "top_self_time_us": {e.key: getattr(e, key) for e in top},
    }


def _positive(text: dict) -> dict:
    return {k: v for k, v in text.items() if not k.startswith("negative")}


def worker(mode: str, area: int, device: str = "cpu") -> dict:
    """One configuration, in this (fresh) process."""
    from supergen.adapters.base import adapter_for
    from supergen.config import TilingConfig
    from supergen.metrics import PeakMemory, current_rss
    from supergen.ops import blend_scatter, halo_gather
    from supergen.stages import check_inputs, refine

    torch.set_num_threads(THREADS)
    profile = PROFILES[device]
    steps = profile["steps"]
    pipe = build_pipeline(device)
    text = text_inputs(device)
    side = math.isqrt(area)
    T, h, w = profile["native_latent"]
    canvas = (T, h * side, w * side)
    x = torch.randn(1, 16, *canvas, generator=torch.Generator().manual_seed(SEED)).to(device)
    frames, height, width = 4 * (T - 1) + 1, canvas[1] * 8, canvas[2] * 8

    if mode == "supergen-attention":
        from supergen.attention import enable_masked_attention

        enable_masked_attention(pipe.transformer)  # before the warm-up: it autotunes the kernel
    adapter = adapter_for(pipe)
    adapter.spec = type(adapter.spec)(**{**adapter.spec.__dict__, "native_latent": (h, w)})
    plan, grid = check_inputs(
        adapter.spec, height=height, width=width, sketch_height=h * 8, sketch_width=w * 8, num_frames=frames,
        num_inference_steps=steps, refine_steps=steps, tiling=TilingConfig(),
    )  # fmt: skip
    with torch.no_grad():
        # Warm-up, identical in both modes: one native forward and one call of each op on the canvas,
        # so lazy initialisation (oneDNN, loading supergen._C, compiling the Triton kernels for these
        # shapes) is not measured.
        tile = x[..., :h, :w]
        cond = adapter.conditioning(tuple(tile.shape), guidance_scale=GUIDANCE, **text)
        adapter.predict(tile, torch.tensor(500.0, device=device), cond, [(0, 0)], (h, w))
        origins = [(r * h, c * w) for r in range(side) for c in range(side)]
        blend_scatter(halo_gather(x, origins, (h, w)), origins, canvas[1:])
        del tile, cond, origins
    gc.collect()
    probe = PeakMemory(device)
    _sync(device)
    idle = torch.cuda.memory_allocated() if device == "cuda" else current_rss()
    probe.reset()
    times = []
    for _ in range(profile["repeats"][mode]):  # best of: other processes share this machine
        _sync(device)
        start = time.perf_counter()
        if mode == "direct":
            out = pipe(height=height, width=width, num_frames=frames, num_inference_steps=steps, latents=x,
                       guidance_scale=GUIDANCE, output_type="latent", **text).frames  # fmt: skip
            tiles, tokens = 1, canvas[0] * canvas[1] * canvas[2] // 4
        else:
            adapter.set_timesteps(pipe.scheduler, steps, device=device)
            cond = adapter.conditioning(tuple(x.shape), guidance_scale=GUIDANCE, **text)
            out = refine(adapter, pipe.scheduler, x, cond, grid, plan)
            tiles, tokens = grid.num_tiles, T * h * w // 4
        _sync(device)
        times.append(time.perf_counter() - start)
        finite = bool(torch.isfinite(out).all())
        del out
        if mode != "direct":
            del cond
        gc.collect()
    seconds = min(times)
    peak = probe.read() - idle
    return {
        "mode": mode,
        "area": area,
        "canvas_latent": list(canvas),
        "pixels": [frames, height, width],
        "forwards_per_step": 2 * tiles,
        "tokens_per_forward": tokens,
        "seconds": seconds,
        "seconds_all_repeats": times,
        "peak_above_idle_bytes": peak,
        "peak_resettable": probe.resettable,
        "output_finite": finite,
        "load_average_1min_after": os.getloadavg()[0],  # other processes on the machine, for context
    }


def _versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for dist in ("supergen", "torch", "triton", "diffusers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _device_name(device: str) -> str:
    name = device_name(device)
    return name if device == "cuda" else f"{name}, {THREADS} torch thread"


def _area_row(area: int, runs: dict) -> dict:
    direct, tiled = runs[(area, "direct")], runs[(area, "supergen")]
    row = {
        "area": area,
        "speedup": direct["seconds"] / tiled["seconds"],
        "memory_ratio": tiled["peak_above_idle_bytes"] / max(1, direct["peak_above_idle_bytes"]),
        "direct": direct,
        "supergen": tiled,
    }
    if (area, "supergen-attention") in runs:  # against the same stock direct run
        ours = runs[(area, "supergen-attention")]
        row["speedup_supergen_attention"] = direct["seconds"] / ours["seconds"]
        row["memory_ratio_supergen_attention"] = ours["peak_above_idle_bytes"] / max(1, direct["peak_above_idle_bytes"])
        row["supergen-attention"] = ours
    return row


def _report(device: str, share: dict, results: list[dict], areas: list[int]) -> dict:
    profile = PROFILES[device]
    probe = (
        "CUDA allocator peak (max_memory_allocated) above the idle process's allocation"
        if device == "cuda"
        else "peak RSS (VmHWM, reset via /proc/self/clear_refs) above the idle process, MALLOC_MMAP_THRESHOLD_=65536"
    )
    nine = next((r for r in results if r["area"] == 9), None)
    return {
        "benchmark": "e2e: direct full-canvas denoising vs supergen tiled refinement",
        "device": _device_name(device),
        "versions": _versions(),
        "git_sha": git_sha(short=False),
        "command": " ".join(["python", "bench/e2e.py", *sys.argv[1:]]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": len(results) == len(areas),  # written after each area, so a killed run keeps what it did
        "model": {
            "family": "wan",
            **profile["model"],
            "native_latent": list(profile["native_latent"]),
            "dtype": str(profile["dtype"]).removeprefix("torch."),
            "weights": "random, seed 0",
        },
        "steps": profile["steps"],
        "repeats": profile["repeats"],
        "guidance_scale": GUIDANCE,
        "seed": SEED,
        "tiling": "TilingConfig() defaults: native tiles, torus, shifted every step, no overlap",
        "memory_probe": probe,
        "attention_share": share,
        "results": results,
        "targets_9x": TARGETS_9X,
        "met_9x": None
        if nine is None
        else {
            "speedup": nine["speedup"] >= TARGETS_9X["speedup_min"],
            "memory_ratio": nine["memory_ratio"] <= TARGETS_9X["memory_ratio_max"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--areas", type=int, nargs="+", default=list(AREAS), choices=AREAS,
                        help="target areas in native areas (default: 4 9)")  # fmt: skip
    parser.add_argument("--out", default=None, help="default: bench/results/e2e_<device>.json")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "AREA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (valid here: --device cpu).")
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.device)))
        return 0

    device = args.device
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"e2e_{device_slug(device)}.json")
    torch.set_num_threads(THREADS)
    share = attention_share(build_pipeline(device), device)
    print(f"attention share of a native-tile forward: {share['median']:.3f}", flush=True)
    runs, results = {}, []
    for area in args.areas:
        for mode in MODES[device]:
            # Allocations of 64 KiB and up go straight to mmap and back to the OS when freed, so the
            # peak RSS tracks live tensors instead of glibc's arena high-water marks (without this,
            # repeated runs of one configuration differed by up to 60 %).
            env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MALLOC_MMAP_THRESHOLD_="65536")
            proc = subprocess.run([sys.executable, __file__, "--device", device, "--worker", mode, str(area)],
                                  capture_output=True, text=True, env=env)  # fmt: skip
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            runs[(area, mode)] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{area}x {mode:<18} {r['seconds']:8.2f} s  peak +{r['peak_above_idle_bytes'] / 2**20:8.1f} MiB",
                  flush=True)  # fmt: skip
        results.append(row := _area_row(area, runs))
        write_json(out, _report(device, share, results, args.areas))
        print(f"{area}x area: speedup {row['speedup']:.2f}x, memory ratio {row['memory_ratio']:.3f}", flush=True)
        if "speedup_supergen_attention" in row:
            speedup, memory = row["speedup_supergen_attention"], row["memory_ratio_supergen_attention"]
            print(f"{area}x area, supergen's attention kernel in the tiles: speedup {speedup:.2f}x, "
                  f"memory ratio {memory:.3f}", flush=True)  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
