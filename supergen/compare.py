"""``supergen compare``: one PNG that puts four ways to reach the target size side by side.

For one prompt and seed, each row shows the first, middle and last frame of:

* **(a) bicubic**: the native-size sketch (stage 1), decoded and resized bicubically to the target;
* **(b) direct**: the stock pipeline run at the target size (same steps, guidance and seed);
* **(c) naive tiles**: every step tiled from pure noise, with non-overlapping tiles that never shift,
  and no sketch. This is SuperGen with ``refine_steps = num_inference_steps``, a fixed grid and an all-zero
  sketch latent upscaled in latent space (so the clean canvas is exactly zero): stage 2 re-noises it to
  the schedule's first sigma, giving ``sigma_0 * noise`` (sigma_0 = 1 - 1e-6 for Wan's flow schedule),
  i.e. the seed's noise, the same noise the direct run (b) starts from, denoised tile by tile;
* **(d) supergen**: the sketch upscaled, re-noised and refined over the last k steps with shifted tiles
  (the defaults of ``supergen generate``, including the model's stage 2 guidance,
  ``refine_guidance_scale``, which only this row's refinement and its untiled control use).

(a) and (d) share one sketch: it is computed once with the stock pipeline and the generator continues
from where the sketch left it, so (d) is bit for bit what ``SuperGen(...)(..., generator=seed)`` gives.
:class:`Comparison` is also what ``bench/quality.py`` measures with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import TilingConfig

#: Rows of the PNG, in order.
METHODS = ("bicubic", "direct", "naive", "supergen")
# Layout of the PNG in pixels: outer margin, gap between cells and rows, height of one text line.
PAD, GAP, LINE = 8, 4, 16


# --------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------


@dataclass
class Sketch:
    """Stage 1 of one seed: the latent, its decoded frames, and the generator state after it."""

    latents: object  # torch.Tensor (1, C, T, h, w)
    pixels: object  # torch.Tensor (1, 3, F, h*s, w*s) in [-1, 1]
    frames: np.ndarray  # (F, h*s, w*s, 3) in [0, 1]
    generator_state: object  # torch.Tensor: the seed's generator after the sketch drew its noise
    seconds: float


@dataclass
class Variant:
    """One way to the target size: ``frames`` (F, H, W, 3) in [0, 1]; ``seam`` the seam score of a
    tiled run (``None`` for untiled ones); ``tiles`` per step (0 untiled)."""

    method: str
    frames: np.ndarray
    seam: float | None
    seconds: float
    tiles: int = 0
    refine_steps: int = 0


class Comparison:
    """Generate the variants of one prompt with one pipeline and fixed sampling settings.

    ``shift_period`` is (d)'s ``TilingConfig.shift_period`` (how fast its grid drifts).
    ``check(height, width)`` validates a target for every tiled variant (raises ``ValueError``) without
    running the model; the variant methods call it themselves.
    """

    def __init__(self, pipe, *, prompt: str, negative_prompt: str = "", num_frames: int, num_inference_steps: int,
                 refine_steps: int, guidance_scale: float, refine_guidance_scale: float | None = None,
                 shift_period: int = TilingConfig.shift_period):  # fmt: skip
        from .pipeline import SuperGen, resolve_refine_guidance

        self.pipe = pipe
        self.text = {"prompt": prompt, "negative_prompt": negative_prompt, "guidance_scale": guidance_scale}
        # Stage 2 of (d) and of the untiled control; (b) and (c) generate from noise with `guidance_scale`.
        self.refine_guidance_scale = resolve_refine_guidance(pipe, guidance_scale, refine_guidance_scale)
        self.num_frames = num_frames
        self.steps = num_inference_steps
        self.refine_steps = refine_steps
        # The shifted grid is SuperGen's default; the fixed grid serves the naive and no-shift variants.
        self.shifted = SuperGen(pipe, tiling=TilingConfig(shift=True, shift_period=shift_period))
        self.fixed = SuperGen(pipe, tiling=TilingConfig(shift=False))
        self.native_size = self.shifted.native_size

    def check(self, height: int, width: int) -> None:
        from .stages import check_inputs

        native_h, native_w = self.native_size
        for sg, refine_steps in ((self.shifted, self.refine_steps), (self.fixed, self.steps)):
            check_inputs(
                sg.adapter.spec, height=height, width=width, sketch_height=native_h, sketch_width=native_w,
                num_frames=self.num_frames, num_inference_steps=self.steps, refine_steps=refine_steps,
                tiling=sg.tiling,
            )  # fmt: skip

    def _frames(self, video) -> np.ndarray:
        """Pixels (1, 3, F, H, W) in [-1, 1] → (F, H, W, 3) in [0, 1], as the pipeline post-processes."""
        return self.pipe.video_processor.postprocess_video(video, output_type="np")[0]

    def sketch(self, seed: int) -> Sketch:
        """Stage 1 at the native size with the stock pipeline (what SuperGen's sketch stage runs)."""
        import torch

        started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        h, w = self.native_size
        latents = self.pipe(
            **self.text, height=h, width=w, num_frames=self.num_frames, num_inference_steps=self.steps,
            generator=generator, output_type="latent",
        ).frames  # fmt: skip
        with torch.no_grad():
            pixels = self.shifted.adapter.decode(latents).float()
        return Sketch(latents, pixels, self._frames(pixels), generator.get_state(), time.perf_counter() - started)

    def bicubic(self, sketch: Sketch, height: int, width: int) -> Variant:
        """(a) The decoded sketch resized bicubically to the target (clamped to the pixel range)."""
        from .upscale import resize_frames

        started = time.perf_counter()
        video = resize_frames(sketch.pixels, (height, width)).clamp(-1.0, 1.0)
        return Variant("bicubic", self._frames(video), None, time.perf_counter() - started)

    def direct(self, seed: int, height: int, width: int) -> Variant:
        """(b) The stock pipeline at the target size."""
        import torch

        started = time.perf_counter()
        frames = self.pipe(
            **self.text, height=height, width=width, num_frames=self.num_frames, num_inference_steps=self.steps,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        ).frames[0]  # fmt: skip
        return Variant("direct", frames, None, time.perf_counter() - started)

    def naive(self, seed: int, height: int, width: int) -> Variant:
        """(c) Every step tiled, from the seed's noise, on a fixed non-overlapping grid, no sketch."""
        import torch

        self.check(height, width)
        spec = self.fixed.adapter.spec
        s = spec.vae_scale[1]
        latent_frames = (self.num_frames - 1) // spec.vae_scale[0] + 1
        h, w = self.native_size
        zero = torch.zeros(1, spec.latent_channels, latent_frames, h // s, w // s, device=self.pipe._execution_device)
        # "latent" upscaling of the zero sketch is exactly zero (the pixel path would decode and encode a
        # made-up sketch), so the start is sigma_0 * noise with nothing of any sketch in it.
        return self._tiled("naive", self.fixed, zero, torch.Generator().manual_seed(seed), height, width, self.steps,
                           self.text["guidance_scale"], upscale="latent")  # fmt: skip

    def supergen(self, sketch: Sketch, height: int, width: int, shift: bool = True) -> Variant:
        """(d) SuperGen from the sketch; ``shift=False`` is the same run on a fixed grid (the ablation)."""
        self.check(height, width)
        sg = self.shifted if shift else self.fixed
        name = "supergen" if shift else "supergen-noshift"
        return self._from_sketch(name, sg, sketch, height, width)

    def untiled(self, sketch: Sketch, height: int, width: int) -> Variant:
        """The control of the seam and duplication measures: SuperGen's refinement of the same sketch with
        one tile covering the whole canvas (no tile edges; the model runs off its native size)."""
        from .config import TilingConfig
        from .pipeline import SuperGen

        s = self.shifted.adapter.spec.vae_scale[1]
        whole = SuperGen(self.pipe, tiling=TilingConfig(tile=(height // s, width // s), shift=False))
        return self._from_sketch("untiled", whole, sketch, height, width)

    def _from_sketch(self, name, sg, sketch: Sketch, height: int, width: int) -> Variant:
        """Stage 2 of ``sg`` on ``sketch``, its re-noise drawn from where the sketch left the generator."""
        import torch

        generator = torch.Generator()
        generator.set_state(sketch.generator_state)
        return self._tiled(name, sg, sketch.latents, generator, height, width, self.refine_steps,
                           self.refine_guidance_scale)  # fmt: skip

    def _tiled(self, name, sg, sketch_latents, generator, height, width, refine_steps, refine_guidance_scale,
               upscale="pixel") -> Variant:  # fmt: skip
        started = time.perf_counter()
        h, w = self.native_size
        out = sg(
            **self.text, refine_guidance_scale=refine_guidance_scale, height=height, width=width,
            num_frames=self.num_frames, num_inference_steps=self.steps,
            refine_steps=refine_steps, sketch_height=h, sketch_width=w, sketch_latents=sketch_latents,
            upscale=upscale, generator=generator, output_type="np",
        )  # fmt: skip
        report = out.report
        return Variant(name, out.frames[0], report["seam_score"], time.perf_counter() - started,
                       report["tiling"]["tiles_per_step"], refine_steps)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the PNG
# --------------------------------------------------------------------------------------------------


def frame_indices(num_frames: int) -> tuple[int, int, int]:
    """First, middle and last frame."""
    return 0, (num_frames - 1) // 2, num_frames - 1


def cell_origin(row: int, col: int, height: int, width: int) -> tuple[int, int]:
    """Top-left (x, y) of the frame cell at ``row``/``col`` for frames of ``height`` x ``width``.

    Two title lines and a line of column headers sit on top; each row is a label line then the cells.
    """
    x = PAD + col * (width + GAP)
    y = PAD + 3 * LINE + row * (LINE + height + GAP) + LINE
    return x, y


def canvas_size(rows: int, cols: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) of the PNG."""
    return 2 * PAD + cols * width + (cols - 1) * GAP, 2 * PAD + 3 * LINE + rows * (LINE + height) + (rows - 1) * GAP


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis so it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def compose(rows: list[tuple[str, np.ndarray]], title: list[str]):
    """A PIL image: one row per ``(label, frames)`` (frames (F, H, W, 3) in [0, 1], all one size),
    showing the first, middle and last frame, with up to two ``title`` lines on top."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont

    shapes = {tuple(frames.shape) for _, frames in rows}
    if len(shapes) != 1:
        raise ValueError(f"every row must have frames of one shape but they have {sorted(shapes)}.")
    num_frames, height, width = next(iter(shapes))[:3]
    picks = frame_indices(num_frames)
    size = canvas_size(len(rows), len(picks), height, width)
    image = PIL.Image.new("RGB", size, "white")
    draw = PIL.ImageDraw.Draw(image)
    font = PIL.ImageFont.load_default()
    room = size[0] - 2 * PAD
    for i, line in enumerate(title[:2]):
        draw.text((PAD, PAD + i * LINE), _fit(draw, line, font, room), fill="black", font=font)
    for col, index in enumerate(picks):
        x, _ = cell_origin(0, col, height, width)
        draw.text((x, PAD + 2 * LINE), _fit(draw, f"frame {index + 1}/{num_frames}", font, width), fill="black",
                  font=font)  # fmt: skip
    for row, (label, frames) in enumerate(rows):
        pixels = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        x, y = cell_origin(row, 0, height, width)
        draw.text((x, y - LINE), _fit(draw, label, font, room), fill="black", font=font)
        for col, index in enumerate(picks):
            image.paste(PIL.Image.fromarray(np.ascontiguousarray(pixels[index])), cell_origin(row, col, height, width))
    return image


def label(variant: Variant, native: tuple[int, int], height: int, width: int, steps: int) -> str:
    seam = "" if variant.seam is None else f", seam {variant.seam:.3f}"
    if variant.method == "bicubic":
        return f"(a) sketch {native[0]}x{native[1]}, bicubic to {height}x{width}"
    if variant.method == "direct":
        return f"(b) direct {height}x{width}, stock pipeline, {steps} steps"
    if variant.method == "naive":
        return f"(c) naive tiles from noise: {variant.tiles} fixed tiles, {steps} steps, no sketch{seam}"
    return f"(d) supergen: sketch + {variant.refine_steps} of {steps} steps on shifted tiles{seam}"


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------


def add_compare_parser(subparsers) -> None:
    c = subparsers.add_parser(
        "compare",
        help="one PNG comparing bicubic, direct, naive tiling and supergen for one prompt and seed",
        description="For one prompt and seed, write one PNG with the first, middle and last frame of (a) the "
        "sketch upscaled bicubically, (b) direct generation at the target size, (c) naive tiling from noise "
        "(fixed tiles, no sketch) and (d) supergen. Sizes are in pixels. No network access is ever attempted.",
    )
    from .cli import add_model_arguments

    add_model_arguments(c)
    c.add_argument("--seed", type=int, default=0, help="seed of the sketch, direct and naive noise and the re-noise")
    c.add_argument("--out", required=True, help="output image (.png)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 tiny, else torch's)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")


def check_compare_args(args) -> dict:
    """Everything that can be checked without loading a model; returns the resolved settings."""
    from .cli import (
        EMBEDDED,
        OTHER_PROMPT,
        TINY_PROMPT,
        _check_model_folder,
        _check_output,
        resolve_model,
        resolve_model_arguments,
    )
    from .tiny import NATIVE_SIZE, read_sidecar

    kind, folder = resolve_model(args.model)
    if folder is not None:
        _check_model_folder(str(folder), allow_pickle=False)
    out = _check_output("--out", args.out, ".png", args.overwrite)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"`--threads` must be >= 1 but is {args.threads}.")
    if args.seed < 0:
        raise ValueError(f"`--seed` must be >= 0 but is {args.seed}.")
    model = resolve_model_arguments(args, folder)
    # The native size, where it is known without loading (the model's own check runs again after loading).
    sidecar = {} if folder is None else read_sidecar(folder)
    native = NATIVE_SIZE if folder is None else sidecar.get("native_size")
    if native is not None:
        for flag, value, least in (("--height", args.height, native[0]), ("--width", args.width, native[1])):
            if value is not None and value < least:
                raise ValueError(
                    f"`{flag}` must be at least the model's native size {native[0]}x{native[1]} but is {value}."
                )
    # Default prompt: one in the synthetic vocabulary for the embedded models and folders trained on it
    # (their sidecar lists the vocabulary), as `supergen generate` does for the embedded ones.
    in_domain = folder is None or args.model == "tiny" or "vocabulary" in sidecar
    prompt = args.prompt if args.prompt is not None else TINY_PROMPT if in_domain else OTHER_PROMPT
    if not prompt:
        raise ValueError(f"`--prompt` must be a non-empty text but is {prompt!r}.")
    return {
        "kind": kind,
        "folder": folder,
        # The embedded models and folders made by training/train_tiny_wan.py (they carry a sidecar) are tiny.
        "tiny": folder is None or args.model in EMBEDDED or bool(sidecar),
        "out": out,
        "prompt": prompt,
        **model,
    }


def load_pipeline(kind: str, folder: Path | None):
    """The random embedded tiny Wan (``kind == "random"``) or a local folder, offline, safetensors only."""
    from .tiny import load_model

    return load_model(None if kind == "random" else folder)


def run_compare(args) -> int:
    # 1. Inputs that need no model (files, counts, sizes against a known native size): exit 2 on error.
    settings = check_compare_args(args)

    import torch

    from .cli import _atomic

    if args.threads:
        torch.set_num_threads(args.threads)
    elif settings["tiny"]:
        torch.set_num_threads(1)  # tiny ops: one thread is faster than two (see `supergen generate`)

    # 2. Load, then check the target against the model's own grid before any generation.
    pipe = load_pipeline(settings["kind"], settings["folder"]).to(settings["device"])
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    comparison = Comparison(
        pipe, prompt=settings["prompt"], negative_prompt=args.negative_prompt, num_frames=settings["frames"],
        num_inference_steps=settings["steps"], refine_steps=settings["refine_steps"],
        guidance_scale=settings["guidance_scale"], refine_guidance_scale=settings["refine_guidance_scale"],
    )  # fmt: skip
    native = comparison.native_size
    height, width = args.height or 2 * native[0], args.width or 2 * native[1]
    comparison.check(height, width)

    # 3. The four variants.
    sketch = comparison.sketch(args.seed)
    variants = [
        comparison.bicubic(sketch, height, width),
        comparison.direct(args.seed, height, width),
        comparison.naive(args.seed, height, width),
        comparison.supergen(sketch, height, width),
    ]

    # 4. One PNG, written under a temporary name and renamed.
    steps = settings["steps"]
    title = [
        f"prompt: {settings['prompt']}",
        f"model {args.model}, seed {args.seed}, {settings['frames']} frames, {steps} steps, "
        f"guidance {settings['guidance_scale']:g} (stage 2: {comparison.refine_guidance_scale:g}), "
        f"{native[0]}x{native[1]} -> {height}x{width}",
    ]
    image = compose([(label(v, native, height, width, steps), v.frames) for v in variants], title)
    with _atomic(settings["out"]) as tmp:
        image.save(tmp, format="PNG")
    print(f"supergen: wrote {settings['out']} ({image.width}x{image.height})")
    for v in variants:
        seam = "" if v.seam is None else f"  seam {v.seam:.3f}"
        print(f"  {v.method:<9} {v.seconds:7.2f} s{seam}")
    return 0
