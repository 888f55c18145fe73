"""The ``supergen`` command line: ``supergen generate``, ``supergen compare`` and ``supergen info``.

Exit codes: 0 success, 2 bad input (the message names the value and what is valid), 1 other errors.
Bad input is reported before any generation work; outputs are written under a temporary name and
renamed when complete, so a failed run never leaves a half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from .config import TilingConfig, default_refine_steps

OPS = ("halo_gather", "blend_scatter", "masked_attention")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    """Versions, devices and which backend each op uses (builds/loads the optional backends)."""
    import torch

    from . import __version__, ops

    lines = [f"supergen {__version__}", f"python   {platform.python_version()} ({platform.machine()})"]
    for dist in ("torch", "triton", "diffusers", "transformers"):
        lines.append(f"{dist:<12} {_version(dist)}")
    cuda = torch.cuda.is_available()
    lines.append(
        f"cuda         {torch.version.cuda or 'none'} ({torch.cuda.get_device_name(0) if cuda else 'no device'})"
    )
    lines.append("backends:")
    for name, state in ops.availability(load=True).items():
        label = "supergen._C (C++ CPU extension)" if name == "cpp" else name
        lines.append(f"  {label:<34} {state}")
    lines.append("op dispatch:")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for op in OPS:
        lines.append(f"  {op:<18} " + ", ".join(f"{d} -> {ops.selected_backend(op, d)}" for d in devices))
    lines += ["tile parallelism (under torchrun):", *(f"  {k:<18} {v}" for k, v in parallel_support().items())]
    return "\n".join(lines)


def parallel_support() -> dict:
    """What this machine offers ``torchrun`` runs: process-group backends, and what ``--parallel-sketch-context``
    (diffusers' context parallelism, one accelerator per rank) finds here."""
    import torch.distributed as dist

    available = dist.is_available()
    groups = [b for b in ("gloo", "nccl") if available and getattr(dist, f"is_{b}_available")()]
    from diffusers import ModelMixin

    from .parallel import accelerator_count

    cp = "diffusers has it" if hasattr(ModelMixin, "enable_parallelism") else "this diffusers lacks it"
    return {
        "process groups": ", ".join(groups) or "none (torch.distributed unavailable)",
        "sketch context": f"{cp}; {accelerator_count()} accelerator(s) here, one per rank needed",
    }


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: ``--model`` names of the embedded models (``supergen.tiny``); anything else is a local folder.
EMBEDDED = ("tiny", "tiny-random")
TINY_DEFAULTS = {"frames": 9, "steps": 10, "guidance_scale": 5.0, "refine_fraction": 0.7}
PATH_DEFAULTS = {"frames": 81, "steps": 50, "guidance_scale": 5.0, "refine_fraction": 0.7}
#: A prompt inside the embedded models' vocabulary (``supergen.synthetic.VOCABULARY``).
TINY_PROMPT = "a blue bar moving right on a dark gradient"
OTHER_PROMPT = "a red fox running through fresh snow, golden hour"


def add_model_arguments(p) -> None:
    """Options shared by ``generate`` and ``compare``: the model, the prompt and the sizes and steps."""
    p.add_argument(
        "--model",
        default="tiny",
        help="`tiny` (embedded, trained on supergen's synthetic shapes), `tiny-random` (embedded, random weights: "
        "a smoke test) or a local diffusers folder",
    )
    p.add_argument("--prompt", default=None, help="text prompt (default: an in-vocabulary one for the tiny models)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (used when guidance > 1)")
    p.add_argument("--height", type=int, default=None, help="target height (default: 2x native)")
    p.add_argument("--width", type=int, default=None, help="target width (default: 2x native)")
    p.add_argument("--frames", type=int, default=None, help="frames, 4k+1 (default: the model's, else 81)")
    p.add_argument("--steps", type=int, default=None, help="N, denoising steps (default: the model's, else 50)")
    p.add_argument("--refine-steps", type=int, default=None, help="k: refine the last k of N (default: model's, 0.7N)")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: model's, or 5)")
    p.add_argument(
        "--refine-guidance-scale",
        type=float,
        default=None,
        help="guidance scale of the tiled refinement (default: the model's, else --guidance-scale; 1 = no CFG)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (this process's CUDA device where CUDA is present, else the CPU), cpu, "
        "cuda (under torchrun: cuda:LOCAL_RANK) or cuda:N",
    )


def resolve_device(name: str):
    """``--device`` as a ``torch.device``, checked before any model work. ``auto``: this process's CUDA device
    where there is one, else the CPU; ``cuda``: this process's (``cuda:LOCAL_RANK`` under ``torchrun``, one
    device per process as NCCL needs); ``cuda:N``: that one, for one process per node; ``cpu``."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local, per_node = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if name == "cpu" or (name == "auto" and count == 0):
        return torch.device("cpu")
    if name in ("auto", "cuda"):
        if count == 0:
            raise ValueError(f"`--device cuda`: this machine has no CUDA device (torch {torch.__version__}); use cpu.")
        if local >= count:
            raise ValueError(
                f"`--device {name}`: this process (LOCAL_RANK {local}) would take cuda:{local}, but this node has "
                f"{count} CUDA device(s); launch at most {count} process(es) per node (torchrun --nproc-per-node)."
            )
        return torch.device("cuda", local)
    index = name.removeprefix("cuda:")
    if not name.startswith("cuda:") or not index.isdigit():
        raise ValueError(f"`--device` must be auto, cpu, cuda or cuda:N but is {name!r}.")
    if int(index) >= count:
        raise ValueError(f"`--device {name}`: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})."
                         if count else f"`--device {name}`: this machine has no CUDA device; use cpu.")  # fmt: skip
    if per_node > 1:
        raise ValueError(
            f"`--device {name}` would put all {per_node} processes of this node on one device; use --device cuda "
            "(each process takes cuda:LOCAL_RANK)."
        )
    return torch.device(name)


def add_generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate",
        help="two-stage high-resolution video: sketch at native size, tiled refinement at the target",
        description="Generate a video with a diffusers pipeline: a native-size sketch, then tiled refinement at "
        "the target size. Sizes are in pixels. No network access is ever attempted.",
    )
    add_model_arguments(g)
    g.add_argument("--image", default=None, help="first frame for image-to-video (PNG/JPEG)")
    g.add_argument("--tile-size", default=None, help="tile H,W in pixels (default: the model's native size)")
    g.add_argument("--overlap", default="0", help="tile overlap in pixels, N or H,W (blended with ramps)")
    g.add_argument("--shift", choices=("on", "off"), default="on", help="shift the tile grid every step")
    g.add_argument(
        "--shift-period",
        type=int,
        default=TilingConfig.shift_period,
        help="each axis's grid sweeps its tile in at most this many steps (default %(default)s); set it to the refined "
        "steps for the slowest drift that still crosses every band (fewer bytes between ranks, see README)",
    )
    g.add_argument("--boundary", choices=("torus", "clamp"), default="torus", help="windows wrap or stay inside")
    g.add_argument("--positions", choices=("local", "canvas"), default="local", help="rotary positions per tile")
    g.add_argument("--upscale", choices=("pixel", "latent"), default="pixel", help="where the sketch is upscaled")
    g.add_argument("--sketch-size", default=None, help="stage-1 size H,W in pixels (default: native)")
    g.add_argument(
        "--reshift-steps",
        type=int,
        default=None,
        help="noise reshifting of the sketch: run only the first K steps at the sketch size, the rest at "
        "--reshift-scale of it (off by default)",
    )
    g.add_argument(
        "--reshift-scale", type=float, default=None, help="with --reshift-steps: the lower size per side (default 0.5)"
    )
    g.add_argument(
        "--cache",
        default="off",
        help="tile cache: off, gate, budget:F (fraction of tiles computed per step) or rehash:G (Step Rehash: "
        "whole steps reused while their calibrated similarity to the key step is >= G; adds a calibration pass)",
    )
    g.add_argument("--cache-threshold", type=float, default=None, help="gate threshold (with --cache gate)")
    g.add_argument("--seed", type=int, default=0, help="seed for the sketch noise and the re-noise")
    g.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    g.add_argument("--out", required=True, help="output video (.mp4)")
    g.add_argument("--report", default=None, help="also write the report as JSON here")
    g.add_argument("--save-latents", default=None, help="also write the refined latent (.safetensors)")
    g.add_argument(
        "--guidance-scale-2",
        type=float,
        default=None,
        help="two-expert Wan 2.2 folders: the low-noise expert's guidance scale (default: the same as the first's)",
    )
    g.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="the transformer's (and text encoder's) dtype; the VAE stays fp32",
    )
    g.add_argument(
        "--attention-backend",
        default=None,
        help="the transformer's attention: supergen (supergen's kernel: Triton on CUDA, C++/reference on the CPU) "
        "or a diffusers backend (_native_flash, _native_cudnn, flash, ...; --parallel-sketch-context ring needs one "
        "that returns the log-sum-exp); default: the model's own",
    )
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 tiny, else torch's)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin/.pt) weights")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument(
        "--parallel-timeout",
        type=float,
        default=600.0,
        help="under torchrun (WORLD_SIZE > 1): seconds a rank waits for the others before all ranks fail",
    )
    g.add_argument(
        "--parallel-exact",
        action="store_true",
        help="under torchrun with --cache gate/budget: compute exactly the single-process tiles (ranks with "
        "fewer tiles than the busiest wait instead of computing tiles the cache would reuse)",
    )
    g.add_argument(
        "--parallel-regions",
        choices=("auto", "fixed", "follow"),
        default="auto",
        help="under torchrun: ranks keep their canvas regions and exchange the halos of tiles shifted across "
        "them (fixed), regions move with the grid carrying the scheduler/cache state (follow), or whichever "
        "sends fewer bytes for this run (auto, counted before the loop)",
    )
    g.add_argument(
        "--parallel-whole-tiles",
        action="store_true",
        help="under torchrun: never split a tile's two guidance forwards across ranks (by default a busy rank "
        "hands one to an idle rank where that shortens the step, and ranks 0 and 1 share the sketch's: Wan, "
        "HunyuanVideo with true CFG)",
    )
    g.add_argument(
        "--parallel-sketch-context",
        choices=("ulysses", "ring"),
        default=None,
        help="under torchrun: every rank runs the sketch, each forward split along its tokens with diffusers' "
        "context parallelism (Ulysses or ring attention; over all ranks, or over each half of them where the "
        "halves split guidance's two calls; Wan, LTX-Video with ring; on GPUs) instead of rank 0 (and 1) "
        "running it while the others wait",
    )
    g.add_argument(
        "--separate-guidance",
        action="store_true",
        help="CogVideoX, LTX-Video: run stage 2's guidance as two forwards per tile instead of one batched "
        "forward, so that under torchrun two ranks can share a tile (the same result up to float rounding); "
        "Wan and HunyuanVideo always run two",
    )


def _pixel_pair(flag: str, text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 0:
        raise ValueError(f"`{flag}` must be N or H,W (pixels, >= 0) but is {text!r}.")
    return values


def _check_output(flag: str, path: str | None, suffix: str, overwrite: bool) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.suffix.lower() != suffix:
        raise ValueError(f"`{flag}` must end in {suffix} but is {path!r}.")
    if p.exists() and not overwrite:
        raise ValueError(f"`{flag}` {path!r} already exists; pass --overwrite to replace it.")
    if not p.parent.is_dir():
        raise ValueError(f"`{flag}` {path!r}: directory {str(p.parent)!r} does not exist.")
    return p


def _check_model_folder(path: str, allow_pickle: bool) -> dict:
    """The folder's model_index.json, after checking it is a supported diffusers pipeline we may load."""
    from .adapters.base import supported_transformers

    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"`--model` {path!r} does not exist; pass `tiny` or a local diffusers pipeline folder.")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"`--model` {path!r} is not a diffusers pipeline folder (it has no model_index.json).")
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"`--model` {path!r}: model_index.json is unreadable ({e}).") from None
    entry = index.get("transformer")
    transformer = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    supported = supported_transformers()
    if transformer not in supported:
        raise ValueError(
            f"unsupported model family: {path!r} is a {index.get('_class_name')} with transformer {transformer}; "
            f"supported transformers: {', '.join(supported)}."
        )
    for component, spec in index.items():
        if component.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = folder / component
        if not sub.is_dir():
            raise ValueError(f"`--model` {path!r}: component folder {component!r} is missing.")
        weights = [f.name for f in sub.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
        if weights and not any(w.endswith(".safetensors") for w in weights) and not allow_pickle:
            raise ValueError(
                f"`--model` {path!r}: {component!r} has only pickle weights ({', '.join(sorted(weights))}), "
                "which can run code when loaded; pass --allow-pickle to load them anyway."
            )
    if index.get("tokenizer", [None])[0] is None or index.get("text_encoder", [None])[0] is None:
        raise ValueError(f"`--model` {path!r} has no tokenizer/text encoder, so `--prompt` cannot be encoded.")
    return index


def resolve_model(name: str) -> tuple[str, Path | None]:
    """``--model`` → (``"random"`` or ``"folder"``, folder): ``tiny`` is the trained embedded model's folder
    (``tiny-random`` while an installation lacks it), ``tiny-random`` the random one, else the path itself."""
    from .tiny import trained_model_dir

    if name == "tiny-random" or (name == "tiny" and trained_model_dir() is None):
        return "random", None
    return "folder", trained_model_dir() if name == "tiny" else Path(name)


def model_defaults(name: str, folder: Path | None) -> dict:
    """Frames, steps, guidance and refined share when the command line does not give them: the folder's
    ``supergen.json`` sidecar (the trained tiny model has one), else per-kind defaults."""
    from .tiny import read_sidecar

    if folder is None:
        return dict(TINY_DEFAULTS)
    side = read_sidecar(folder)
    base = dict(TINY_DEFAULTS if name in EMBEDDED else PATH_DEFAULTS)
    keys = (("frames", "num_frames"), ("steps", "num_inference_steps"), ("guidance_scale",) * 2)
    for key, side_key in (*keys, ("refine_fraction",) * 2):
        if side_key in side:
            base[key] = side[side_key]
    return base


def resolve_model_arguments(args, folder: Path | None) -> dict:
    """The options of :func:`add_model_arguments` checked (counts >= 1, k <= N) and completed from the
    model's defaults: ``frames``, ``steps``, ``refine_steps``, ``guidance_scale`` and
    ``refine_guidance_scale`` (``None``: the model folder's sidecar value, else ``guidance_scale``,
    resolved by the pipeline); and the ``device`` (:func:`resolve_device`)."""
    from .config import check_guidance

    for flag, value in (("--height", args.height), ("--width", args.width), ("--frames", args.frames),
                        ("--steps", args.steps), ("--refine-steps", args.refine_steps)):  # fmt: skip
        if value is not None and value < 1:
            raise ValueError(f"`{flag}` must be >= 1 but is {value}.")
    defaults = model_defaults(args.model, folder)
    refine_guidance = args.refine_guidance_scale
    if refine_guidance is not None:
        refine_guidance = check_guidance("--refine-guidance-scale", refine_guidance)
    steps = args.steps or defaults["steps"]
    refine_steps = args.refine_steps or default_refine_steps(steps, defaults["refine_fraction"])
    if refine_steps > steps:
        raise ValueError(f"`--refine-steps` must be in [1, --steps={steps}] but is {refine_steps}.")
    return {
        "frames": args.frames or defaults["frames"],
        "steps": steps,
        "refine_steps": refine_steps,
        "guidance_scale": check_guidance(
            "--guidance-scale", args.guidance_scale if args.guidance_scale is not None else defaults["guidance_scale"]
        ),
        "refine_guidance_scale": refine_guidance,
        "device": resolve_device(args.device),
    }


def check_attention_backend(name: str | None) -> str | None:
    """``--attention-backend``: ``None`` (the model's own), ``supergen`` or a diffusers backend name."""
    if name is None or name == "supergen":
        return name
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(b.value for b in AttentionBackendName if b.value != "supergen")
    if name not in known:
        raise ValueError(f"`--attention-backend` must be supergen or one of diffusers' {known} but is {name!r}.")
    return name


def set_attention_backend(pipe, name: str | None) -> None:
    """Put the pipeline's transformer(s) on attention backend ``name`` (:func:`check_attention_backend`)."""
    from .adapters.base import denoisers

    if name is None:
        return
    for model in denoisers(pipe):
        if name == "supergen":
            from .attention import enable_masked_attention

            enable_masked_attention(model)
            continue
        try:
            model.set_attention_backend(name)
        except (ImportError, RuntimeError) as e:  # diffusers: the backend's package or hardware is missing
            raise ValueError(f"`--attention-backend {name}` cannot run here: {e}") from None


def _check_generate_args(args) -> dict:
    """Everything that can be checked without touching a model; returns the resolved settings."""
    kind, folder = resolve_model(args.model)
    index = None if folder is None else _check_model_folder(str(folder), args.allow_pickle)
    if args.image is not None and not Path(args.image).is_file():
        raise ValueError(f"`--image` {args.image!r} does not exist or is not a file.")
    if index is not None:
        i2v = "ImageToVideo" in str(index.get("_class_name"))
        if i2v and args.image is None:
            raise ValueError(f"`--model` {args.model!r} is image-to-video ({index['_class_name']}); pass `--image`.")
        if not i2v and args.image is not None:
            raise ValueError(f"`--image` given but `--model` {args.model!r} is {index.get('_class_name')}, not I2V.")
    out = _check_output("--out", args.out, ".mp4", args.overwrite)
    report = _check_output("--report", args.report, ".json", args.overwrite)
    latents = _check_output("--save-latents", args.save_latents, ".safetensors", args.overwrite)
    if len({p.resolve() for p in (out, report, latents) if p is not None}) != sum(
        p is not None for p in (out, report, latents)
    ):
        raise ValueError("`--out`, `--report` and `--save-latents` must be different files.")
    for flag, value in (("--fps", args.fps), ("--threads", args.threads), ("--shift-period", args.shift_period)):
        if value is not None and value < 1:
            raise ValueError(f"`{flag}` must be >= 1 but is {value}.")
    model = resolve_model_arguments(args, folder)
    tile = _pixel_pair("--tile-size", args.tile_size)
    if tile is not None and min(tile) < 1:
        raise ValueError(f"`--tile-size` must be >= 1 on both axes but is {args.tile_size!r}.")
    from .cache import CacheConfig

    cache = CacheConfig.parse(args.cache, args.cache_threshold)
    reshift = _reshift(args, model["steps"])
    check_attention_backend(args.attention_backend)
    guidance_2 = args.guidance_scale_2
    if guidance_2 is not None:
        from .config import check_guidance

        guidance_2 = check_guidance("--guidance-scale-2", guidance_2)
        if index is None or index.get("boundary_ratio") is None:
            raise ValueError(
                f"`--guidance-scale-2` is for two-expert Wan 2.2 folders (a `boundary_ratio` in model_index.json), "
                f"and `--model` {args.model!r} has one model."
            )
    return {
        "guidance_scale_2": guidance_2,
        "kind": kind,
        "folder": folder,
        "prompt": args.prompt if args.prompt is not None else TINY_PROMPT if args.model in EMBEDDED else OTHER_PROMPT,
        **model,
        "cache": None if cache.mode == "off" else cache,
        "out": out,
        "report": report,
        "latents": latents,
        "tile": tile,
        "overlap": _pixel_pair("--overlap", args.overlap),
        "sketch": _pixel_pair("--sketch-size", args.sketch_size),
        "reshift": reshift,
    }


def _reshift(args, steps: int):
    """``--reshift-steps``/``--reshift-scale`` as a :class:`ReshiftConfig` (``None`` when off), checked."""
    from .config import ReshiftConfig

    if args.reshift_steps is None:
        if args.reshift_scale is not None:
            raise ValueError("`--reshift-scale` needs `--reshift-steps` (the steps run at the sketch size).")
        return None
    if not 1 <= args.reshift_steps < steps:
        raise ValueError(f"`--reshift-steps` must be in [1, --steps={steps}) but is {args.reshift_steps}.")
    scale = 0.5 if args.reshift_scale is None else args.reshift_scale
    if not 0 < scale < 1:
        raise ValueError(f"`--reshift-scale` must be in (0, 1) but is {scale}.")
    return ReshiftConfig(native_steps=args.reshift_steps, scale=scale)


def _latent_cells(flag: str, pixels: tuple[int, int] | None, scale: int, multiple: int) -> tuple[int, int] | None:
    if pixels is None:
        return None
    if pixels[0] % multiple or pixels[1] % multiple:
        raise ValueError(f"`{flag}` must be a multiple of {multiple} pixels on both axes but is {pixels}.")
    return pixels[0] // scale, pixels[1] // scale


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds."""
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_mp4(frames, path: Path, fps: int) -> None:
    """``(F, H, W, 3)`` floats in [0, 1] → H.264 mp4 via imageio-ffmpeg (bit-exact flags: same frames, same bytes)."""
    import imageio_ffmpeg
    import numpy as np

    video = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    height, width = video.shape[1:3]
    with _atomic(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=fps, codec="libx264", macro_block_size=1,
            output_params=["-fflags", "+bitexact", "-flags:v", "+bitexact", "-threads", "1"],
        )  # fmt: skip
        writer.send(None)
        for frame in video:
            writer.send(np.ascontiguousarray(frame))
        writer.close()


def report_table(report: dict) -> str:
    sizes, tiling, steps = report["sizes"], report["tiling"], report["steps"]
    peak = max(report["peak_memory_bytes"].values()) if report["peak_memory_bytes"] else 0
    seam = report["seam_score"]
    rows = [
        ("model", f"{report['model']['pipeline']} ({report['model']['parameters']:,} transformer parameters)"),
        ("frames", sizes["frames"]),
        ("sketch", "x".join(map(str, sizes["sketch"]))),
        ("target", "x".join(map(str, sizes["target"]))),
        ("canvas latent", "x".join(map(str, sizes["canvas_latent"]))),
        ("tile latent", "x".join(map(str, sizes["tile_latent"]))),
        ("tiles per step", tiling["tiles_per_step"]),
        ("grid", f"shift={tiling['shift']} overlap={tiling['overlap']} boundary={tiling['boundary']} "
                 f"positions={tiling['positions']}"),
        ("steps", f"{steps['refine']} refined of {steps['total']}"),
        *((f"{k} s", f"{v:.2f}") for k, v in report["seconds"].items()),
        ("peak memory", f"{peak / 2**20:.0f} MiB ({report['peak_memory_kind']})"),
        ("seam score", "n/a (one tile)" if seam is None else f"{seam:.3f} (1.0 = no seam)"),
        ("cache", "off" if not report["cache"] else f"{report['cache']['mode']}: "
                  f"{report['cache']['compute_saved']:.0%} of tile forwards skipped"),
        ("device", report["device"]),
    ]  # fmt: skip
    return "\n".join(f"  {k:<15} {v}" for k, v in rows)


def run_generate(args) -> int:
    # 1. Check every input that needs no model (files, outputs, counts) — exit 2 on error.
    settings = _check_generate_args(args)

    import torch

    from .adapters.base import BatchedGuidance
    from .config import TilingConfig
    from .pipeline import SuperGen

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.model in EMBEDDED:
        # The tiny models'' ops are far too small to split across threads: measured 15x slower
        # forwards with 2 threads than with 1 on a shared 2-core machine.
        torch.set_num_threads(1)
    dtype = getattr(torch, DTYPES[args.dtype])

    # Under torchrun (WORLD_SIZE > 1) the ranks share the refinement; only rank 0 writes outputs.
    parallel = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .config import ParallelConfig

        parallel = ParallelConfig(
            timeout=args.parallel_timeout, fill_idle=not args.parallel_exact, regions=args.parallel_regions,
            split_guidance=not args.parallel_whole_tiles, sketch_context=args.parallel_sketch_context,
        )  # fmt: skip

    # 2. Load the pipeline (the random tiny one is built in code; folders load offline, safetensors only).
    from .tiny import load_model

    pipe = load_model(settings["folder"], dtype, image_to_video=args.image is not None, allow_pickle=args.allow_pickle)
    pipe.to(settings["device"])
    set_attention_backend(pipe, args.attention_backend)
    pipe.set_progress_bar_config(disable=args.quiet or int(os.environ.get("RANK", "0")) != 0, leave=False)

    # 3. Map pixel options onto the model's latent grid (exact multiples only, never rounded).
    probe = SuperGen(pipe)
    options = {}
    if args.separate_guidance and isinstance(probe.adapter, BatchedGuidance):  # the others run two forwards
        options["separate_guidance"] = True
    spec = probe.adapter.spec
    scale, multiple = spec.vae_scale[1], spec.pixel_multiple()
    tile = _latent_cells("--tile-size", settings["tile"], scale, multiple)
    overlap = _latent_cells("--overlap", settings["overlap"], scale, multiple)
    tiling = TilingConfig(
        tile=tile, overlap=overlap, boundary=args.boundary, shift=args.shift == "on", shift_period=args.shift_period
    )
    # The sketch size is the model's native size: it also sets the default tile.
    sketch = settings["sketch"] or probe.native_size
    sg = SuperGen(
        pipe, tiling=tiling, positions=args.positions, native_size=sketch, cache=settings["cache"], parallel=parallel,
        reshift=settings["reshift"], adapter_options=options,
    )  # fmt: skip
    call = dict(
        prompt=settings["prompt"],
        negative_prompt=args.negative_prompt,
        height=args.height or 2 * sketch[0],
        width=args.width or 2 * sketch[1],
        num_frames=settings["frames"],
        num_inference_steps=settings["steps"],
        refine_steps=settings["refine_steps"],
        guidance_scale=settings["guidance_scale"],
        refine_guidance_scale=settings["refine_guidance_scale"],
        **({} if settings["guidance_scale_2"] is None else {"guidance_scale_2": settings["guidance_scale_2"]}),
        sketch_height=sketch[0],
        sketch_width=sketch[1],
        upscale=args.upscale,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    )
    if args.image is not None:
        import PIL.Image

        try:
            call["image"] = PIL.Image.open(args.image).convert("RGB")
        except OSError as e:
            raise ValueError(f"`--image` {args.image!r} is not a readable image ({e}).") from None

    # 4. Generate (SuperGen checks sizes, frames and steps before the sketch starts).
    out = sg(**call)
    if out.frames is None:  # a rank other than 0 of a parallel run: rank 0 holds the video
        return 0

    # 5. Write every output atomically.
    write_mp4(out.frames[0], settings["out"], args.fps)
    if settings["latents"] is not None:
        from safetensors.torch import save_file

        # One metadata key: safetensors writes several keys in hash-map order, which would make the
        # bytes of two identical runs differ.
        meta = {"model": args.model, "seed": args.seed, "sizes": out.report["sizes"], "steps": out.report["steps"]}
        metadata = {"supergen": json.dumps(meta, sort_keys=True)}
        with _atomic(settings["latents"]) as tmp:
            save_file({"latents": out.latents.detach().float().contiguous().cpu()}, str(tmp), metadata=metadata)
    written = {k: str(settings[k]) for k in ("out", "report", "latents") if settings[k] is not None}
    argv = getattr(args, "argv", None) or sys.argv[1:]
    report = dict(out.report, seed=args.seed, prompt=settings["prompt"], attention_backend=args.attention_backend,
                  guidance_scale_2=settings["guidance_scale_2"], command=["supergen", *argv],
                  outputs=written)  # fmt: skip
    if settings["report"] is not None:
        with _atomic(settings["report"]) as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(f"supergen: wrote {settings['out']}")
    print(report_table(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supergen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, the backend each op uses, what tile parallelism finds here")
    add_generate_parser(sub)
    from .compare import add_compare_parser

    add_compare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        if args.command == "info":
            print(info_text())
            return 0
        if args.command == "generate":
            return run_generate(args)
        if args.command == "compare":
            from .compare import run_compare

            return run_compare(args)
    except ValueError as e:
        print(f"supergen: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
