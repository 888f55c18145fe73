"""`supergen generate`: the main job on the embedded tiny model, determinism, saved latents, a local
diffusers folder, and every bad input answered with exit code 2 and no file written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("imageio_ffmpeg")

from supergen.cli import main  # noqa: E402

# The random embedded model: seconds per run (``tiny`` is the trained one once installed).
SMALL = ["--model", "tiny-random", "--height", "96", "--width", "64", "--frames", "5", "--steps", "3",
         "--refine-steps", "2", "--quiet"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("single_thread")


def _ffmpeg_frames(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = reader.__next__()
    w, h = meta["size"]
    for frame in reader:
        yield np.frombuffer(frame, dtype=np.uint8).reshape(h, w, 3)


def test_main_job_writes_video_report_and_latents(tmp_path, capsys):
    """The README's main job with the random embedded model: default sizes (64x64 sketch → 128x128, 9 frames)."""
    out, report, latents = tmp_path / "fox.mp4", tmp_path / "fox.json", tmp_path / "fox.safetensors"
    code = main(["generate", "--model", "tiny-random", "--prompt", "a red fox", "--out", str(out),
                 "--report", str(report), "--save-latents", str(latents), "--quiet"])  # fmt: skip
    assert code == 0
    frames = np.stack(list(_ffmpeg_frames(out)))
    assert frames.shape == (9, 128, 128, 3)
    data = json.loads(report.read_text())
    assert data["sizes"]["target"] == [128, 128] and data["sizes"]["sketch"] == [64, 64]
    assert data["tiling"]["tiles_per_step"] == 4 and data["steps"] == {"total": 10, "refine": 7, "begin_index": 3}
    assert data["seed"] == 0 and data["outputs"]["out"] == str(out)
    assert {"seconds", "peak_memory_bytes", "seam_score", "versions", "device"} <= set(data)
    from safetensors.torch import load_file

    assert load_file(str(latents))["latents"].shape == (1, 16, 3, 16, 16)
    printed = capsys.readouterr().out
    assert "tiles per step  4" in printed and "seam score" in printed
    assert not list(tmp_path.glob(".*partial*"))  # temporary names renamed away


def test_same_seed_same_bytes(tmp_path):
    """Same seed → identical latents and mp4 bytes; another seed → different latents."""

    def run(name, seed):
        paths = tmp_path / f"{name}.mp4", tmp_path / f"{name}.safetensors"
        argv = ["generate", *SMALL, "--seed", str(seed), "--out", str(paths[0]), "--save-latents", str(paths[1])]
        assert main(argv) == 0
        return paths[0].read_bytes(), paths[1].read_bytes()

    a, b, c = run("a", 7), run("b", 7), run("c", 8)
    assert a == b
    assert c[1] != a[1]


def test_image_to_video_with_the_tiny_model(tmp_path):
    import PIL.Image

    image = tmp_path / "first.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((64, 48, 3)) * 255).astype("uint8")).save(image)
    out = tmp_path / "i2v.mp4"
    assert main(["generate", *SMALL, "--image", str(image), "--positions", "canvas", "--out", str(out)]) == 0
    assert np.stack(list(_ffmpeg_frames(out))).shape == (5, 96, 64, 3)


def _save_wan_folder(folder, boundary_ratio=None):
    """A real diffusers WanPipeline folder (tiny parts, word-level tokenizer, tiny UMT5), safetensors only;
    with ``boundary_ratio``, Wan 2.2's two experts."""
    from diffusers import WanPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    from supergen.tiny import tiny_wan_components

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate("a red fox in the snow".split())}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    )
    components = tiny_wan_components()
    if boundary_ratio is not None:
        components.update(transformer_2=tiny_wan_components(seed=1)["transformer"], boundary_ratio=boundary_ratio)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, **components)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return _save_wan_folder(tmp_path_factory.mktemp("wan"))


def test_two_expert_folder_takes_guidance_scale_2(tmp_path, capsys):
    """A Wan 2.2 two-expert folder runs (the refinement below the boundary on `transformer_2`) and
    `--guidance-scale-2` reaches its second expert; a one-model folder refuses the flag before any model work."""
    from safetensors.torch import load_file

    folder = _save_wan_folder(tmp_path / "wan22", boundary_ratio=0.9)
    base = ["generate", *SMALL, "--model", str(folder), "--sketch-size", "64,64"]
    latents = {}
    for scale in (2.0, 6.0):
        out, report, saved = (tmp_path / f"g{scale}{ext}" for ext in (".mp4", ".json", ".safetensors"))
        argv = [*base, "--guidance-scale-2", str(scale), "--out", str(out), "--report", str(report),
                "--save-latents", str(saved)]  # fmt: skip
        assert main(argv) == 0
        assert json.loads(report.read_text())["guidance_scale_2"] == scale
        latents[scale] = load_file(str(saved))["latents"]
    assert not torch.equal(latents[2.0], latents[6.0])
    one = _save_wan_folder(tmp_path / "wan21")
    code = main(["generate", *SMALL, "--model", str(one), "--guidance-scale-2", "2", "--out", str(tmp_path / "x.mp4")])
    assert code == 2 and "`--guidance-scale-2` is for two-expert Wan 2.2 folders" in capsys.readouterr().err


def test_local_diffusers_folder(wan_folder, tmp_path):
    out = tmp_path / "local.mp4"
    argv = ["generate", "--model", str(wan_folder), "--sketch-size", "64,64", *SMALL, "--out", str(out)]
    assert main(argv) == 0
    assert np.stack(list(_ffmpeg_frames(out))).shape == (5, 96, 64, 3)


def test_dtype_leaves_the_vae_in_fp32(wan_folder):
    """`--dtype bf16` on a folder: the transformer in bf16, the VAE kept in fp32 for the decode at 4K."""
    from supergen.tiny import load_model

    pipe = load_model(wan_folder, torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32


def test_sidecar_sets_native_size_and_defaults(wan_folder, tmp_path):
    """A folder's supergen.json (as the trained tiny model has) gives the sketch size, frames, steps and
    guidance; the command line still wins over it."""
    sidecar = wan_folder / "supergen.json"
    sidecar.write_text(json.dumps({"native_size": [48, 32], "num_frames": 5, "num_inference_steps": 4,
                                   "guidance_scale": 1.0}))  # fmt: skip
    try:
        report = tmp_path / "r.json"
        argv = ["generate", "--model", str(wan_folder), "--quiet", "--out", str(tmp_path / "a.mp4"),
                "--report", str(report)]  # fmt: skip
        assert main(argv) == 0
        data = json.loads(report.read_text())
        assert data["sizes"]["sketch"] == [48, 32] and data["sizes"]["target"] == [96, 64]
        assert data["sizes"]["frames"] == 5 and data["steps"]["total"] == 4
        assert main([*argv[:-4], "--steps", "3", "--overwrite", "--out", str(tmp_path / "a.mp4"), "--report",
                     str(report)]) == 0  # fmt: skip
        assert json.loads(report.read_text())["steps"]["total"] == 3
    finally:
        sidecar.unlink()


def test_tiny_falls_back_to_random_without_the_trained_folder(monkeypatch):
    import supergen.cli as cli
    import supergen.tiny as tiny

    monkeypatch.setattr(tiny, "TRAINED_DIR", tiny.TRAINED_DIR.parent / "no-such-model")
    assert cli.resolve_model("tiny") == ("random", None)
    assert cli.resolve_model("tiny-random") == ("random", None)
    assert cli.resolve_model("/x/y") == ("folder", __import__("pathlib").Path("/x/y"))


def _folder(tmp_path, transformer="WanTransformer3DModel", weights="diffusion_pytorch_model.safetensors"):
    folder = tmp_path / "pipe"
    folder.mkdir()
    index = {"_class_name": "SomePipeline", "transformer": ["diffusers", transformer],
             "tokenizer": ["transformers", "T"], "text_encoder": ["transformers", "E"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    for component in ("transformer", "tokenizer", "text_encoder"):
        (folder / component).mkdir()
    (folder / "transformer" / weights).write_bytes(b"x")
    return str(folder)


BAD = [
    (lambda p: ["--model", str(p / "missing")], "does not exist"),
    (lambda p: ["--model", str(p)], "not a diffusers pipeline folder"),
    (lambda p: ["--model", _folder(p, "MochiTransformer3DModel")], "unsupported model family.*Wan"),
    (lambda p: ["--model", _folder(p, weights="diffusion_pytorch_model.bin")], "--allow-pickle"),
    (lambda p: ["--image", str(p / "nope.png")], "`--image`.*does not exist"),
    (lambda p: ["--height", "100"], "`height` must be a multiple of 16"),
    (lambda p: ["--width", "32"], "at least the native"),
    (lambda p: ["--frames", "8"], "`num_frames` must be 4k\\+1"),
    (lambda p: ["--steps", "4", "--refine-steps", "5"], "`--refine-steps` must be in \\[1, --steps=4\\]"),
    (lambda p: ["--steps", "0"], "`--steps` must be >= 1"),
    (lambda p: ["--guidance-scale", "nan"], "`--guidance-scale` must be a finite number >= 0 but is nan"),
    (lambda p: ["--refine-guidance-scale", "-2"], "`--refine-guidance-scale` must be a finite number >= 0 but is -2.0"),
    (lambda p: ["--tile-size", "40,40"], "`--tile-size` must be a multiple of 16"),
    (lambda p: ["--tile-size", "big"], "`--tile-size` must be N or H,W"),
    (lambda p: ["--overlap", "48"], "overlap"),
    (lambda p: ["--shift-period", "0"], "`--shift-period` must be >= 1 but is 0"),
    (lambda p: ["--report", str(p / "r.txt")], "`--report` must end in .json"),
    (lambda p: ["--cache", "sometimes"], "`--cache` must be off, gate, budget:F or rehash:G"),
    (lambda p: ["--cache", "rehash:1.5"], "`rehash_gamma` must be in \\(0, 1\\]"),
    (lambda p: ["--steps", "4", "--reshift-steps", "4"], "`--reshift-steps` must be in \\[1, --steps=4\\) but is 4"),
    (lambda p: ["--reshift-steps", "2", "--reshift-scale", "1.5"], "`--reshift-scale` must be in \\(0, 1\\)"),
    (lambda p: ["--reshift-scale", "0.5"], "`--reshift-scale` needs `--reshift-steps`"),
    (lambda p: ["--reshift-steps", "2", "--reshift-scale", "0.95"], "`reshift.scale` 0.95 leaves the sketch"),
    (lambda p: ["--device", "mps"], "`--device` must be auto, cpu, cuda or cuda:N but is 'mps'"),
    (lambda p: ["--guidance-scale-2", "3"], "`--guidance-scale-2` is for two-expert Wan 2.2 folders .* 'tiny'"),
    (lambda p: ["--attention-backend", "fastest"], "`--attention-backend` must be supergen or one of .*'flex'"),
]


@pytest.mark.parametrize("extra, match", BAD)
def test_bad_input_exit_2_and_nothing_written(tmp_path, capsys, extra, match):
    import re

    out = tmp_path / "out.mp4"
    code = main(["generate", "--quiet", "--out", str(out), *extra(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert re.search(match, err), err
    assert not out.exists() and not list(tmp_path.glob("*.mp4")) and not list(tmp_path.glob(".*partial*"))


def test_device_is_this_process_s_own(monkeypatch):
    """`--device`: auto takes this process's CUDA device where CUDA is present (under torchrun cuda:LOCAL_RANK,
    one device per process as NCCL needs), else the CPU; what cannot run is refused naming the value."""
    import torch

    from supergen.cli import resolve_device

    def cuda(count):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def node(rank, size):  # torchrun's LOCAL_RANK of LOCAL_WORLD_SIZE processes on this node
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(size))

    cuda(0)
    node(0, 1)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=f"`--device {name}`: this machine has no CUDA device"):
            resolve_device(name)
    cuda(2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"`--device cuda:2`: this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")
    node(1, 2)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="would put all 2 processes of this node on one device; use --device cuda"):
        resolve_device("cuda:0")
    node(2, 3)
    with pytest.raises(ValueError, match=r"LOCAL_RANK 2\) would take cuda:2, but this node has 2 CUDA device"):
        resolve_device("auto")
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N but is 'gpu'"):
        resolve_device("gpu")


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "taken.mp4"
    out.write_bytes(b"keep me")
    assert main(["generate", "--quiet", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"


def test_argparse_rejects_bad_choices(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--out", str(tmp_path / "x.mp4"), "--shift", "sometimes"])
    assert e.value.code == 2


def test_step_rehash_from_the_command_line(tmp_path, capsys):
    """`--cache rehash:G`: a calibration pass, timed as its own stage, then key steps only."""
    out, report = tmp_path / "r.mp4", tmp_path / "r.json"
    argv = ["generate", *SMALL, "--steps", "6", "--refine-steps", "5", "--cache", "rehash:0.9"]
    assert main([*argv, "--out", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    cache = data["cache"]
    assert cache["mode"] == "rehash" and cache["gamma"] == 0.9 and cache["similarity_source"] == "calibrated"
    assert len(cache["key_steps"]) == 5 and cache["key_steps"][0] and cache["key_steps"][-1]
    assert len(cache["similarity"]) == 5 and "calibrate" in data["seconds"]
    assert "calibrate s" in capsys.readouterr().out


def test_shift_period_from_the_command_line(tmp_path):
    """`--shift-period P` reaches the grid: a shorter period moves it further per step (the report says so)."""
    cells = {}
    for period in (16, 2):
        report = tmp_path / f"p{period}.json"
        argv = ["generate", *SMALL, "--steps", "3", "--refine-steps", "2", "--shift-period", str(period)]
        assert main([*argv, "--out", str(tmp_path / f"p{period}.mp4"), "--report", str(report)]) == 0
        tiling = json.loads(report.read_text())["tiling"]
        assert tiling["shift_period"] == period
        cells[period] = tiling["shift_cells"]
    tile = json.loads(report.read_text())["sizes"]["tile_latent"]
    # an axis with one tile never shifts (0); the others step by a divisor of the tile whose sweep fits
    moving = [(t, a, b) for t, a, b in zip(tile, cells[16], cells[2]) if b]
    assert moving and all(t % b == 0 and t // b <= 2 and a < b for t, a, b in moving), (tile, cells)


def test_attention_backend_from_the_command_line(tmp_path, monkeypatch):
    """`--attention-backend supergen` runs the transformer's attention on supergen's kernel: the same video as
    the model's own attention up to float rounding, and the report names it."""
    from safetensors.torch import load_file

    from supergen import attention

    seen, enable = [], attention.enable_masked_attention
    monkeypatch.setattr(attention, "enable_masked_attention", lambda m: seen.append(type(m).__name__) or enable(m))
    latents = {}
    for backend in (None, "supergen"):
        name = backend or "default"
        out = {"--out": ".mp4", "--report": ".json", "--save-latents": ".safetensors"}
        argv = ["generate", *SMALL, *(x for flag, ext in out.items() for x in (flag, str(tmp_path / f"{name}{ext}")))]
        assert main(argv + (["--attention-backend", backend] if backend else [])) == 0
        assert json.loads((tmp_path / f"{name}.json").read_text())["attention_backend"] == backend
        latents[name] = load_file(str(tmp_path / f"{name}.safetensors"))["latents"]
    assert seen == ["WanTransformer3DModel"]
    assert (latents["supergen"] - latents["default"]).abs().max().item() <= 1e-4


def test_noise_reshifting_from_the_command_line(tmp_path):
    """`--reshift-steps K --reshift-scale S`: the report names the lower sketch the refinement started from."""
    report = tmp_path / "r.json"
    argv = ["generate", *SMALL, "--steps", "4", "--reshift-steps", "2", "--reshift-scale", "0.5"]
    assert main([*argv, "--out", str(tmp_path / "r.mp4"), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["sizes"]["sketch_reshift"] == {"native_steps": 2, "scale": 0.5, "latent": [2, 4, 4]}
    assert data["sizes"]["target"] == [96, 64]


def test_separate_guidance_flag_is_a_no_op_for_two_forward_families(tmp_path):
    """`--separate-guidance` is an option of the adapters that batch guidance (CogVideoX, LTX-Video); Wan
    already runs two forwards per tile, so the flag changes nothing: the same latent bit for bit."""
    from safetensors.torch import load_file

    latents = []
    for flag in ([], ["--separate-guidance"]):
        path = tmp_path / f"l{len(flag)}.safetensors"
        argv = ["generate", *SMALL, "--out", str(tmp_path / f"v{len(flag)}.mp4"), "--save-latents", str(path)]
        assert main([*argv, *flag]) == 0
        latents.append(load_file(path))
    assert latents[0].keys() == latents[1].keys()
    assert all(torch.equal(latents[0][k], latents[1][k]) for k in latents[0])


def test_info_says_what_tile_parallelism_finds_here(capsys):
    """`supergen info` lists the process-group backends torch.distributed offers and, for
    `--parallel-sketch-context`, whether diffusers has context parallelism and how many accelerators
    this machine has."""
    import torch.distributed as dist
    from diffusers import ModelMixin

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    groups = ", ".join(b for b in ("gloo", "nccl") if getattr(dist, f"is_{b}_available")())
    assert f"  process groups     {groups}\n" in out
    has = "diffusers has it" if hasattr(ModelMixin, "enable_parallelism") else "this diffusers lacks it"
    assert f"  sketch context     {has}; {torch.accelerator.device_count()} accelerator(s) here" in out
