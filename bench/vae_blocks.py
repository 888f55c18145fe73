"""The VAE at canvas size shared in blocks of VAE tiles, timed: the busiest block against the whole.

    python3 bench/vae_blocks.py [--device cuda] [--canvas small|2K|4K] [--frames T] [--out PATH]

Under tile parallelism each rank encodes (upscale) and decodes (final video) one block of whole VAE
tiles (``supergen.parallel.plan_vae_blocks``); ``bench/parallel.py`` counts the busiest block's share
of the tile area. This measures it, on the full-size Wan 2.1 VAE (diffusers' default
``AutoencoderKLWan``, random weights: the real one's FLOPs and bytes) through the Wan adapter's own
``vae_decode``/``encode``, in one process: the whole tiled decode (encode), then, for 2, 4 and 8
ranks, every block the planner makes (what each rank would run), timed one after the other (best of
``--repeats``). Per rank count: the grid, the counted share (``plan.cost``), the measured busiest
block / whole, and whether the blocks put together equal the whole bit for bit on this device (what
``vae_blocks_exact`` probes before a run relies on them). Transfers are not timed (one latent and
one video per run).

``--canvas``: ``small`` (latent 56 x 80, 448 x 640 pixels, 3 x 4 VAE tiles: a CPU run), ``2K`` (180 x 320) or
``4K`` (270 x 480). Results: ``bench/results/vae_blocks_<device>.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, device_slug, environment, print_table, timed_runs, write_json  # noqa: E402

from supergen import parallel as par  # noqa: E402
from supergen.parallel.vae import _block  # noqa: E402

CANVASES = {"small": (56, 80), "2K": (180, 320), "4K": (270, 480)}  # latent cells (pixels / 8)
RANKS = (2, 4, 8)


def build_adapter(device: str):
    """The Wan adapter over a pipeline whose VAE is the full-size Wan 2.1 one (random weights)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from supergen.adapters.base import adapter_for
    from supergen.tiny import tiny_wan_components

    parts = tiny_wan_components()  # the tiny transformer and the scheduler: only the VAE runs here
    torch.manual_seed(0)
    parts["vae"] = AutoencoderKLWan().eval()  # diffusers' defaults are Wan 2.1's VAE
    pipe = WanPipeline(tokenizer=None, text_encoder=None, **parts).to(device)
    return adapter_for(pipe)


def _timed(fn, device: str, repeats: int):
    seconds, out = timed_runs(fn, device, repeats)
    return min(seconds), out


@torch.no_grad()
def measure(adapter, hw, frames: int, device: str, repeats: int) -> list[dict]:
    scale, geometry = adapter.spec.vae_scale[1], adapter.vae_tile_geometry()
    latent = torch.randn(1, adapter.spec.latent_channels, frames, *hw, generator=torch.Generator().manual_seed(0))
    z, args = adapter.vae_inputs(latent.to(device))
    adapter.vae_decode(z[..., : geometry[0][0], : geometry[1][0]], *args)  # warm-up: one tile, not timed
    whole_decode, video = _timed(lambda: adapter.vae_decode(z, *args), device, repeats)
    pixels = video.clamp(-1.0, 1.0)
    whole_encode, encoded = _timed(lambda: adapter.encode(pixels, None), device, repeats)
    rows = []
    for world in RANKS:
        plan = par.plan_vae_blocks(hw, geometry, world)
        decode_times, encode_times, exact = [], [], True
        for i, cells in enumerate(plan.kept):
            seconds, part = _timed(lambda i=i, p=plan: par.decode_block(adapter, z, args, p, i), device, repeats)
            decode_times.append(seconds)
            exact &= torch.equal(part, _block(video, cells, scale))
            seconds, part = _timed(lambda i=i, p=plan: par.encode_block(adapter, pixels, p, i), device, repeats)
            encode_times.append(seconds)
            exact &= torch.equal(part, _block(encoded, cells))
        rows.append({
            "ranks": world,
            "grid": list(plan.grid),
            "counted_share": round(plan.cost, 4),
            "decode_busiest_share": round(max(decode_times) / whole_decode, 4),
            "encode_busiest_share": round(max(encode_times) / whole_encode, 4),
            "decode_speedup": round(whole_decode / max(decode_times), 2),
            "encode_speedup": round(whole_encode / max(encode_times), 2),
            "bitwise_equal": bool(exact),
        })  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--canvas", choices=list(CANVASES), default=None, help="default: 2K on CUDA, small on the CPU")
    parser.add_argument("--frames", type=int, default=None, help="latent frames (default: 2 on CUDA, 1 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each, best of (default 2 / 1)")
    parser.add_argument("--out", default=None, help="default: bench/results/vae_blocks_<device>.json")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    canvas = args.canvas or ("2K" if cuda else "small")
    frames = args.frames or (2 if cuda else 1)
    repeats = args.repeats or (2 if cuda else 1)
    if frames < 1 or repeats < 1:
        raise SystemExit(f"--frames and --repeats must be >= 1 but are {frames} and {repeats}.")
    adapter = build_adapter(args.device)
    rows = measure(adapter, CANVASES[canvas], frames, args.device, repeats)
    print_table(rows, list(rows[0]))
    out = Path(args.out) if args.out else RESULTS / f"vae_blocks_{device_slug(args.device)}.json"
    command = (f"python3 bench/vae_blocks.py --device {args.device} --canvas {canvas} --frames {frames} "
               f"--repeats {repeats}")  # fmt: skip
    write_json(out, {
        **environment(args.device),
        "command": command,
        "what": "the Wan 2.1 VAE (full size, random weights) at canvas size, decode and encode, whole vs the busiest "
        "of the blocks of VAE tiles that tile parallelism gives each rank (timed one after the other in one process, "
        "best of repeats); counted_share: bench/parallel.py's tile-area count; bitwise_equal: the blocks put "
        "together equal the whole on this device",
        "canvas": canvas,
        "latent": [frames, *CANVASES[canvas]],
        "vae_tile_geometry": [list(g) for g in adapter.vae_tile_geometry()],
        "rows": rows,
    })  # fmt: skip
    print(f"wrote {out}")
    return 0 if all(r["bitwise_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
