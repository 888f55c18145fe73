"""The embedded tiny Wan: a diffusers-format folder, its training script, and (slow) its quality."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from supergen import synthetic

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "supergen" / "models" / "tiny-wan"
SCRIPT = ROOT / "training" / "train_tiny_wan.py"


def _load_script(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train():
    return _load_script("train_tiny_wan", SCRIPT)


def _load(path: Path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str, steps: int, seed: int = 0):
    return pipe(
        prompt=prompt,
        height=synthetic.SIZE,
        width=synthetic.SIZE,
        num_frames=synthetic.FRAMES,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames


def _no_unknown_tokens(tokenizer):
    ids = tokenizer(" ".join(synthetic.VOCABULARY)).input_ids
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == len(synthetic.VOCABULARY) + 1 and ids[-1] == tokenizer.eos_token_id
    for word in synthetic.VOCABULARY:
        assert tokenizer.unk_token_id not in tokenizer(word.upper()).input_ids  # lower-cased first
    assert tokenizer("a purple hexagon").input_ids.count(tokenizer.unk_token_id) == 2


def test_tokenizer_encodes_the_vocabulary(train):
    _no_unknown_tokens(train.build_tokenizer())


def test_training_cross_attention_equals_the_padded_prompt(train):
    """Training attends over one zero row with a log-count bias; inference over all padding rows."""
    pipe = train.build_pipeline(0)
    bank = train.TextBank(pipe.tokenizer, pipe.text_encoder, "cpu")
    captions = [synthetic.sample_clip(s).caption for s in range(3)] + [""]
    text, bias = bank.batch(captions)
    transformer = pipe.transformer.eval()
    channels, patch = transformer.config.in_channels, transformer.config.patch_size[-1]
    x = torch.randn(len(captions), channels, 3, 4 * patch, 4 * patch, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 500.0, 100.0, 10.0])
    with torch.no_grad():
        full = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=train.TEXT_LEN)[0]
        stock = transformer(hidden_states=x, timestep=t, encoder_hidden_states=full, return_dict=False)[0]
        processor = train.PaddedCrossAttnProcessor()
        processor.bias = bias
        saved = transformer.attn_processors
        transformer.set_attn_processor({k: processor if ".attn2." in k else p for k, p in saved.items()})
        try:
            fast = transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        finally:
            transformer.set_attn_processor(saved)
    assert full.shape[1] == train.TEXT_LEN
    torch.testing.assert_close(fast, stock, atol=2e-5, rtol=1e-4)


def test_training_script_two_steps_saves_a_loadable_folder(train, tmp_path):
    out = tmp_path / "tiny-wan"
    cmd = [sys.executable, str(SCRIPT), "--seed", "3", "--max-steps", "2", "--out", str(out), "--threads", "1"]
    cmd += ["--vae-batch", "2", "--dit-batch", "4", "--dit-clips", "4", "--log-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    log = json.loads((out / "training_log.json").read_text())
    assert log["seed"] == 3 and log["vae_steps"] == 2 and log["dit_steps"] == 2
    assert len(log["loss"]["vae"]) == 2 and len(log["loss"]["transformer"]) == 2
    pipe = _load(out)
    z = pipe.vae.config.z_dim
    assert pipe.transformer.config.in_channels == z and pipe.vae.config.scale_factor_spatial == 4
    # A token covers 16x16 pixels at either VAE stride: stride x patch.
    assert pipe.vae.config.scale_factor_spatial * pipe.transformer.config.patch_size[-1] == train.TOKEN_PIXELS
    assert len(pipe.vae.config.latents_std) == z and min(pipe.vae.config.latents_std) > 0
    assert pipe.vae.config.latents_std != [1.0] * z  # measured, not the placeholder
    frames = _generate(pipe, "a red circle moving left on a dark gradient", steps=2)
    assert frames.shape == (1, synthetic.FRAMES, synthetic.SIZE, synthetic.SIZE, 3)


def test_vae_only_then_vae_from_resumes_phase_two(tmp_path):
    """Phase 1 alone saves a VAE folder; a later run trains the transformer on it without retraining it."""
    common = [sys.executable, str(SCRIPT), "--seed", "4", "--max-steps", "2", "--threads", "1"]
    common += ["--vae-batch", "2", "--dit-batch", "4", "--dit-clips", "4"]
    vae_dir, out = tmp_path / "vae", tmp_path / "model"
    for extra in (["--vae-only", "--out", str(vae_dir)], ["--vae-from", str(vae_dir), "--out", str(out)]):
        run = subprocess.run(common + extra, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((vae_dir / "vae_log.json").read_text())["vae_steps"] == 2
    from safetensors.torch import load_file

    weights = "diffusion_pytorch_model.safetensors"
    before, after = load_file(vae_dir / weights), load_file(out / "vae" / weights)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((out / "training_log.json").read_text())["dit_steps"] == 2

    # `--vae-init` continues the saved VAE (its learned log-variance is kept) and logs both runs. Mark
    # the saved log-variance bias (a fresh run sets it to -6) to see that continuing does not reset it.
    from safetensors.torch import save_file

    z = before["quant_conv.bias"].numel() // 2  # means, then log-variances
    before["quant_conv.bias"][z:] = -2.0
    save_file(before, vae_dir / weights)
    more = tmp_path / "vae-more"
    run = subprocess.run(common + ["--vae-only", "--vae-init", str(vae_dir), "--out", str(more)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    log = json.loads((more / "vae_log.json").read_text())
    assert log["vae_steps"] == 4 and [r["vae_steps"] for r in log["runs"]] == [2, 2]
    continued = load_file(more / weights)
    assert not torch.equal(continued["quant_conv.weight"], before["quant_conv.weight"])  # trained further
    assert (continued["quant_conv.bias"][z:] + 2.0).abs().max() < 0.05

    # A VAE of another geometry than the flags say is refused before any training.
    run = subprocess.run(common + ["--vae-from", str(vae_dir), "--vae-spatial", "8", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode != 0 and "the VAE has stride 4 and 4 channels but --vae-spatial 8" in run.stderr


def test_previous_vae_log_of_a_full_model_folder(train, tmp_path):
    """`--vae-init MODEL/vae` (the committed model's VAE) reads its runs from MODEL/training_log.json."""
    runs = [{"vae_steps": 5, "seed": 0}, {"vae_steps": 3, "seed": 0, "lr": 5e-4, "threads": 1}]
    (tmp_path / "vae").mkdir()
    log = {"seed": 0, "vae_steps": 8, "loss": {"vae": [{"step": 0}], "vae_runs": runs}}
    (tmp_path / "training_log.json").write_text(json.dumps(log))
    got = train.previous_vae_log(tmp_path / "vae")
    assert got["vae_steps"] == 8 and got["runs"] == runs and got["loss"]["vae"] == [{"step": 0}]
    with pytest.raises(FileNotFoundError, match="no vae_log.json"):
        train.previous_vae_log(tmp_path / "elsewhere" / "vae")


# -- the committed model ----------------------------------------------------------------------------

needs_model = pytest.mark.skipif(not (MODEL / "model_index.json").exists(), reason="no trained tiny-wan folder")


@pytest.fixture(scope="module")
def model():
    return _load(MODEL)


@needs_model
def test_committed_folder_is_small_and_safetensors_only():
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    weights = [p for p in files if p.suffix not in {".json", ".txt", ".md"}]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    info = json.loads((MODEL / "supergen.json").read_text())
    assert info["native_size"] == [synthetic.SIZE, synthetic.SIZE] and info["num_frames"] == synthetic.FRAMES


@needs_model
def test_committed_model_loads_and_generates(model):
    _no_unknown_tokens(model.tokenizer)
    frames = _generate(model, "a blue pillar moving right on a light texture", steps=4)
    assert frames.shape == (1, synthetic.FRAMES, synthetic.SIZE, synthetic.SIZE, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0


@needs_model
def test_committed_vae_normalisation_matches_the_data(model):
    """``latents_mean``/``latents_std`` make held-out clips' latents roughly zero-mean, unit-variance."""
    x = torch.from_numpy(synthetic.sample_batch(range(90_000_500, 90_000_516))[0])
    with torch.no_grad():
        z = model.vae.encode(x).latent_dist.mode()
    mean = torch.tensor(model.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.vae.config.latents_std).view(1, -1, 1, 1, 1)
    zn = ((z - mean) / std).transpose(0, 1).flatten(1)
    assert zn.mean(1).abs().max() < 0.5
    assert ((zn.std(1) > 0.6) & (zn.std(1) < 1.5)).all()


@needs_model
def test_committed_vae_reconstructs_the_objects(model):
    """Held-out clips' objects come back with their colours, classes and count (tracks present in at
    least 5 of 9 frames): the class is what the elongation-based domain makes survive the 4x VAE."""
    agree = 0
    for seed in range(90_000_600, 90_000_610):
        clip = synthetic.sample_clip(seed)
        with torch.no_grad():
            x = torch.from_numpy(clip.video)[None]
            recon = model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample[0].numpy()
        found = synthetic.detect_objects(synthetic.to_unit_frames(recon))
        kept = sorted((t.colour, t.shape) for t in found.tracks if t.present >= 5)
        agree += kept == sorted((o.colour, o.shape) for o in clip.objects)
    assert agree >= 9


@needs_model
@pytest.mark.slow
def test_generations_show_the_prompted_shapes_moving(model):
    """For held-out prompts, every prompted colour is visible (detector, at least half the frames), in
    the prompted class for most of them, and its object moves (centroid travels at least 3 px)."""
    colour = shape = moving = 0
    prompts = [synthetic.sample_clip(90_001_000 + i, max_objects=1).caption for i in range(12)]
    for i, prompt in enumerate(prompts):
        frames = _generate(model, prompt, steps=20, seed=i)[0]
        ((want_colour, want_shape),) = synthetic.parse_caption(prompt)
        found = synthetic.detect_objects(frames)
        colour += found.visible(want_colour)
        shape += found.visible(want_colour, want_shape)
        tracks = [t for t in found.tracks if t.colour == want_colour and t.present >= 2]
        moving += any(max(abs(v) for v in t.displacement()) >= 3.0 for t in tracks)
    assert colour >= 10
    assert shape >= 7, f"the prompted class in {shape} of 12 generations"
    assert moving >= 9


def test_clip_workers_draw_the_same_batches_in_order(train):
    """Worker processes (``--data-workers``, for GPUs) only change who draws the clips, not which."""
    seed_lists = [range(i, i + 2) for i in range(0, 10, 2)]
    here = list(train.clip_batches(seed_lists, 0, "cpu"))
    ahead = train.clip_batches(iter(seed_lists), 2, "cpu")
    for (x0, caps0, cover0), (x1, caps1, cover1) in zip(here, ahead, strict=True):
        assert torch.equal(x0, x1) and caps0 == caps1 and torch.equal(cover0, cover1)
    assert len(here) == len(seed_lists)


def test_a_run_cut_short_replays_with_its_planned_schedule(train):
    """A time-fitted phase the time limit stops early laid its learning-rate schedule over the planned
    count; the replay must plan the same count and stop where the run stopped."""
    budget = train.StepBudget(seconds=1e9, steps=10, max_steps=None, stop=6)
    assert [budget.running(s) for s in range(8)] == [True] * 6 + [False] * 2
    assert budget.planned(3) == 10  # the schedule still spans 10 steps
    assert train.StepBudget(seconds=1e9, steps=10, max_steps=None).running(9)
    cut = [{"vae_steps": 1500, "vae_planned": 1839, "seed": 0}]
    assert train.replay_commands(cut, 0, 2000, 2, dit_planned=2100) == [
        "--seed 0 --vae-steps 1839 --vae-stop 1500 --dit-steps 2100 --dit-stop 2000 --threads 2 --out MODEL"
    ]
    whole = [{"vae_steps": 1356, "seed": 0}]
    assert train.replay_commands(whole, 0, 2713, 2, dit_planned=2713) == [
        "--seed 0 --vae-steps 1356 --dit-steps 2713 --threads 2 --out MODEL"
    ]
