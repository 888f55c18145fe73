"""Does a batched guidance forward split exactly into its two halves? Per family and device.

CogVideoX and LTX-Video run classifier-free guidance as one transformer forward on a batch of both
branches. Tile parallelism runs the two halves on two ranks only where they give the batched output
bit for bit (``supergen.parallel.exact_guidance_halves`` in stage 2, ``SketchBatchSplit`` in stage 1,
each checking it at run time): that depends on the kernels (a sample's output in a batch of one against
a batch of two: GPU matrix products may pick another algorithm for another size). This measures it
on random weights with the real models' layer shapes (CogVideoX 1.5 5B at 768x1360, 81 frames:
44,880 video tokens; LTX-Video 2B at 512x704, 121 frames: 5,632), ``--layers`` of their blocks (the
kernels and shapes of every block are the same, so exactness and the time ratio per block do not
depend on the depth), in bf16 on CUDA; on the CPU a scaled-down shape in fp32. It also times the
batched forward against the two halves one after the other (what the one process runs with the
adapters' ``separate_guidance``): their ratio is what separating costs on one device.

Rotary tables are left out (RoPE is elementwise: it does not change the matrix products' shapes).

    python bench/guidance_halves.py [--device cuda] [--layers 4] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, device_slug, environment, timed_runs, write_json  # noqa: E402

SEED = 0


def cogvideox(device: str, layers: int, dtype: torch.dtype):
    """CogVideoX 1.5 (5B) blocks and a batched call's arguments: (B=2, T, C, H, W) latents, 226 text tokens."""
    from diffusers import CogVideoXTransformer3DModel

    full = device.startswith("cuda")
    heads, head_dim, text_dim = (48, 64, 4096) if full else (4, 16, 64)
    frames, h, w = (22, 96, 170) if full else (4, 12, 16)  # 81 frames = 21 latent, padded to 22 (patch_t 2)
    with torch.device(device):
        model = CogVideoXTransformer3DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16, out_channels=16,
            time_embed_dim=512 if full else 32, text_embed_dim=text_dim, num_layers=layers, patch_size=2,
            patch_size_t=2, sample_height=300, sample_width=300, sample_frames=81, max_text_seq_length=226,
            use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
        ).eval()  # fmt: skip
    model.to(dtype)
    g = torch.Generator(device).manual_seed(SEED + 1)
    args = {
        "hidden_states": torch.randn(2, frames, 16, h, w, generator=g, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 226, text_dim, generator=g, device=device, dtype=dtype),
        "timestep": torch.tensor([700, 700], device=device),
    }
    tokens = frames // 2 * (h // 2) * (w // 2)
    return model, args, tokens


def ltx_video(device: str, layers: int, dtype: torch.dtype):
    """LTX-Video (2B) blocks and a batched call's arguments: packed (B=2, tokens, 128), 128 text tokens."""
    from diffusers import LTXVideoTransformer3DModel

    full = device.startswith("cuda")
    heads, head_dim, text_dim, channels = (32, 64, 4096, 128) if full else (4, 16, 64, 16)
    frames, h, w = (16, 16, 22) if full else (3, 8, 12)  # 121 frames = 16 latent; 512x704 px = 16x22 cells
    with torch.device(device):
        model = LTXVideoTransformer3DModel(
            in_channels=channels, out_channels=channels, num_attention_heads=heads, attention_head_dim=head_dim,
            cross_attention_dim=heads * head_dim, num_layers=layers, caption_channels=text_dim,
        ).eval()  # fmt: skip
    model.to(dtype)
    g = torch.Generator(device).manual_seed(SEED + 1)
    tokens = frames * h * w
    args = {
        "hidden_states": torch.randn(2, tokens, channels, generator=g, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(2, 128, text_dim, generator=g, device=device, dtype=dtype),
        "encoder_attention_mask": torch.ones(2, 128, device=device, dtype=dtype),
        "timestep": torch.tensor([700, 700], device=device),
        "num_frames": frames,
        "height": h,
        "width": w,
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }
    return model, args, tokens


FAMILIES = {"cogvideox_1.5": cogvideox, "ltx_video": ltx_video}


def _half(args: dict, i: int) -> dict:
    return {k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 else v
            for k, v in args.items()}  # fmt: skip


def _time(fn, device: str, runs: int) -> float:
    return statistics.median(timed_runs(fn, device, runs)[0])


@torch.no_grad()
def measure(name: str, device: str, layers: int, runs: int) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(SEED)
    model, args, tokens = FAMILIES[name](device, layers, dtype)
    whole = model(**args, return_dict=False)[0]
    halves = torch.cat([model(**_half(args, i), return_dict=False)[0] for i in range(2)])
    exact = bool(torch.equal(halves, whole))
    diff = float((halves.float() - whole.float()).abs().max())
    batched = _time(lambda: model(**args, return_dict=False), device, runs)
    apart = _time(lambda: [model(**_half(args, i), return_dict=False) for i in range(2)], device, runs)
    return {
        "family": name,
        "dtype": str(dtype).removeprefix("torch."),
        "layers": layers,
        "video_tokens": tokens,
        "halves_exact": exact,
        "max_abs_diff": diff,
        "batched_s": round(batched, 5),
        "halves_one_after_other_s": round(apart, 5),
        "halves_over_batched": round(apart / batched, 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="blocks per model (default: 4 on CUDA, 1 on CPU)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers must be >= 1 but is {args.layers}.")
    if args.runs < 1:
        parser.error(f"--runs must be >= 1 but is {args.runs}.")
    layers = args.layers or (4 if args.device.startswith("cuda") else 1)
    rows = []
    for name in FAMILIES:
        rows.append(measure(name, args.device, layers, args.runs))
        print(rows[-1], flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the model went with measure's frame
    out = Path(args.out) if args.out else RESULTS / f"guidance_halves_{device_slug(args.device)}.json"
    write_json(out, {**environment(args.device), "what": __doc__.split("\n\n")[1].replace("\n", " "), "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
