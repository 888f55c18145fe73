"""`supergen compare` (one PNG: bicubic, direct, naive tiling, supergen), its metric helper, and the
quality benchmark's bookkeeping; on the random embedded tiny Wan, seconds per test."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import supergen.compare as compare  # noqa: E402
from supergen.metrics import downsampled_psnr, psnr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving right on a dark gradient"
# The tiny models' native 64x64 (8x8 latent cells, the tile) -> a 96x64 target: 12x8 cells, 2 tiles a step.
SMALL = ["--model", "tiny-random", "--prompt", PROMPT, "--height", "96", "--width", "64", "--frames", "5",
         "--steps", "3", "--refine-steps", "2", "--seed", "3", "--quiet"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("single_thread")


def _parse(argv):
    parser = argparse.ArgumentParser()
    compare.add_compare_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["compare", *argv])


def _png(path) -> np.ndarray:
    import PIL.Image

    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _cell(png: np.ndarray, row: int, col: int, height: int, width: int) -> np.ndarray:
    x, y = compare.cell_origin(row, col, height, width)
    return png[y : y + height, x : x + width]


def _uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


# -- the PNG ---------------------------------------------------------------------------------------


def test_compose_places_first_middle_last_frames_of_each_row():
    """Cells hold exactly the given frames (first, middle, last), one row per variant, labels above."""
    rng = np.random.default_rng(0)
    rows = [(f"row {r}", rng.random((7, 24, 40, 3)).astype(np.float32)) for r in range(4)]
    image = np.asarray(compare.compose(rows, ["title", "second line"]))
    # 4 rows x 3 columns of 24x40 cells: width 2*8 + 3*40 + 2*4, height 2*8 + 3*16 + 4*(16 + 24) + 3*4.
    assert image.shape == (236, 144, 3)
    for r, (_, frames) in enumerate(rows):
        for c, index in enumerate((0, 3, 6)):
            np.testing.assert_array_equal(_cell(image, r, c, 24, 40), _uint8(frames[index]))
    # The label lines carry text (dark pixels on white), the gaps between cells stay white.
    label_strip = image[compare.cell_origin(0, 0, 24, 40)[1] - compare.LINE : compare.cell_origin(0, 0, 24, 40)[1]]
    assert (label_strip < 128).any()
    x, y = compare.cell_origin(0, 0, 24, 40)
    assert (image[y : y + 24, x + 40 : x + 40 + compare.GAP] == 255).all()


def test_compose_rejects_rows_of_different_sizes():
    with pytest.raises(ValueError, match="one shape"):
        compare.compose([("a", np.zeros((3, 8, 8, 3))), ("b", np.zeros((3, 8, 16, 3)))], [])


def test_compare_png_holds_the_four_variants(tmp_path, capsys):
    """The PNG is 4 rows x 3 frames at the target size; row (d) is exactly SuperGen's own output for the
    seed and row (b) exactly the stock pipeline's at the target size; no temporary file is left."""
    from supergen import SuperGen
    from supergen.tiny import tiny_wan_pipeline

    out = tmp_path / "cmp.png"
    assert compare.run_compare(_parse([*SMALL, "--out", str(out)])) == 0
    png = _png(out)
    assert png.shape == (2 * 8 + 3 * 16 + 4 * (16 + 96) + 3 * 4, 2 * 8 + 3 * 64 + 2 * 4, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png"]
    printed = capsys.readouterr().out
    assert "wrote" in printed and "seam" in printed

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, negative_prompt="", height=96, width=64, num_frames=5, num_inference_steps=3,
                guidance_scale=5.0, output_type="np")  # fmt: skip
    ours = SuperGen(pipe)(**call, refine_steps=2, generator=torch.Generator().manual_seed(3)).frames[0]
    direct = pipe(**call, generator=torch.Generator().manual_seed(3)).frames[0]
    for col, index in enumerate((0, 2, 4)):
        np.testing.assert_array_equal(_cell(png, 3, col, 96, 64), _uint8(ours[index]))
        np.testing.assert_array_equal(_cell(png, 1, col, 96, 64), _uint8(direct[index]))
    # Row (a): the stock pipeline's own sketch, resized bicubically (up to one level of rounding).
    sketch = pipe(**dict(call, height=64, width=64), generator=torch.Generator().manual_seed(3)).frames[0]
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(sketch).permute(0, 3, 1, 2), size=(96, 64), mode="bicubic", align_corners=False
    )
    bicubic = resized.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for col, index in enumerate((0, 2, 4)):
        assert np.abs(_cell(png, 0, col, 96, 64).astype(int) - _uint8(bicubic[index]).astype(int)).max() <= 1
    # Naive tiling is a different video from supergen's (no sketch): the rows differ.
    assert not np.array_equal(_cell(png, 2, 2, 96, 64), _cell(png, 3, 2, 96, 64))


def test_naive_tiling_starts_from_the_seed_noise_without_a_sketch(monkeypatch):
    """(c) is a SuperGen run over all N steps on a fixed grid whose clean canvas is exactly zero, so its
    first canvas is sigma_0 (= 1 - 1e-6) times the seed's noise: nothing of a sketch."""
    import supergen.pipeline
    from supergen.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    comparison = compare.Comparison(pipe, prompt=PROMPT, num_frames=5, num_inference_steps=3, refine_steps=2,
                                    guidance_scale=5.0)  # fmt: skip
    calls = []
    renoise = supergen.pipeline.renoise
    monkeypatch.setattr(supergen.pipeline, "renoise", lambda s, x0, b, g: calls.append((x0, b)) or renoise(s, x0, b, g))
    variant = comparison.naive(3, 96, 64)
    assert variant.method == "naive" and variant.refine_steps == 3 and variant.tiles == 2
    assert variant.frames.shape == (5, 96, 64, 3) and variant.seam is not None
    ((x0, begin_index),) = calls
    assert begin_index == 0 and x0.shape == (1, 16, 2, 12, 8) and torch.count_nonzero(x0) == 0
    assert float(pipe.scheduler.sigmas[0]) > 1 - 1e-5
    # supergen proper enters at step N - k from the upscaled sketch, on a shifting grid.
    calls.clear()
    variant = comparison.supergen(comparison.sketch(3), 96, 64)
    assert calls[0][1] == 1 and torch.count_nonzero(calls[0][0]) > 0 and variant.refine_steps == 2
    assert comparison.shifted.tiling.shift and not comparison.fixed.tiling.shift


def test_refine_guidance_is_for_the_sketch_refinements_only(monkeypatch):
    """A model's sidecar ``refine_guidance_scale`` (the trained tiny model's is 1) applies to (d) and its
    untiled control; (c) generates from noise and keeps the full guidance: two branches per tile."""
    from supergen.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.supergen_info = {"refine_guidance_scale": 1.0}
    comparison = compare.Comparison(pipe, prompt=PROMPT, num_frames=5, num_inference_steps=3, refine_steps=2,
                                    guidance_scale=5.0)  # fmt: skip
    assert comparison.refine_guidance_scale == 1.0
    forward, calls = type(pipe.transformer).forward, []
    monkeypatch.setattr(
        type(pipe.transformer), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    sketch = comparison.sketch(3)
    for method, branches, steps in (("naive", 2, 3), ("supergen", 1, 2), ("untiled", 1, 2)):
        calls.clear()
        variant = comparison.naive(3, 96, 64) if method == "naive" else getattr(comparison, method)(sketch, 96, 64)
        assert len(calls) == branches * steps * variant.tiles, method
    given = compare.Comparison(pipe, prompt=PROMPT, num_frames=5, num_inference_steps=3, refine_steps=2,
                               guidance_scale=5.0, refine_guidance_scale=3.0)  # fmt: skip
    assert given.refine_guidance_scale == 3.0


# -- bad input: ValueError before any model work, no file written ----------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(compare, "load_pipeline", load)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "{tmp}/x.jpg"], r"`--out` must end in \.png"),
        (["--out", "{tmp}/missing-dir/x.png"], "does not exist"),
        (["--out", "{tmp}/x.png", "--height", "32"], "at least the model's native size 64x64 but is 32"),
        (["--out", "{tmp}/x.png", "--width", "0"], "`--width` must be >= 1 but is 0"),
        (
            ["--out", "{tmp}/x.png", "--steps", "3", "--refine-steps", "4"],
            r"`--refine-steps` must be in \[1, --steps=3\]",
        ),
        (["--out", "{tmp}/x.png", "--seed", "-1"], "`--seed` must be >= 0"),
        (["--out", "{tmp}/x.png", "--refine-guidance-scale", "inf"], "`--refine-guidance-scale` must be a finite"),
        (["--out", "{tmp}/x.png", "--model", "{tmp}/no-such-folder"], "does not exist"),
        (["--out", "{tmp}/x.png", "--prompt", ""], "`--prompt` must be a non-empty text"),
    ],
)
def test_bad_input_is_refused_before_loading(tmp_path, no_model, extra, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in ["--model", "tiny-random", *extra]]
    with pytest.raises(ValueError, match=message):
        compare.run_compare(_parse(argv))
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, no_model):
    out = tmp_path / "x.png"
    out.write_bytes(b"keep")
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        compare.run_compare(_parse(["--model", "tiny-random", "--out", str(out)]))
    assert out.read_bytes() == b"keep"


def test_sizes_off_the_model_grid_are_refused_before_generation(tmp_path, monkeypatch):
    """Sizes the loaded model cannot tile (not a multiple of 16 px for Wan, frames not 4k+1) fail after
    loading but before the sketch or any other variant runs."""

    def never(*args, **kwargs):
        raise AssertionError("generation started before the sizes were checked")

    for name in ("sketch", "bicubic", "direct", "naive", "supergen"):
        monkeypatch.setattr(compare.Comparison, name, never)
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match="`width` must be a multiple of 16"):
        compare.run_compare(_parse(["--model", "tiny-random", "--width", "72", "--out", str(out)]))
    with pytest.raises(ValueError, match="`num_frames` must be 4k\\+1"):
        compare.run_compare(_parse(["--model", "tiny-random", "--frames", "6", "--out", str(out)]))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    """The PNG goes to a temporary name first: a write that fails half-way leaves neither file."""
    import PIL.Image

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", broken_save)
    out = tmp_path / "x.png"
    with pytest.raises(OSError, match="disk full"):
        compare.run_compare(_parse([*SMALL, "--out", str(out)]))
    assert list(tmp_path.iterdir()) == []


# -- the metric helper -----------------------------------------------------------------------------


def test_downsampled_psnr():
    reference = torch.rand(2, 3, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    up = reference.repeat_interleave(2, dim=-2).repeat_interleave(3, dim=-1)  # each pixel a 2x3 block
    assert downsampled_psnr(up, reference) == float("inf")
    # Detail that averages out within each block is not a change of content...
    stripes = 0.1 * (-1.0) ** torch.arange(8).view(8, 1)  # +0.1 / -0.1 on the two rows of every block
    assert downsampled_psnr(up + stripes, reference) > 100
    # ...a uniform offset of 0.1 is: MSE 0.01, so 10*log10(1/0.01) = 20 dB for data range 1.
    assert downsampled_psnr(up + 0.1, reference, data_range=1.0) == pytest.approx(20.0)
    # Same size: the plain PSNR.
    other = reference + 0.05 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    assert downsampled_psnr(other, reference) == pytest.approx(psnr(other, reference))
    with pytest.raises(ValueError, match="at least as large"):
        downsampled_psnr(reference, up)
    with pytest.raises(ValueError, match="leading dimensions"):
        downsampled_psnr(up[:1], reference)


# -- bench/quality.py ------------------------------------------------------------------------------


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_cases_are_fixed_in_domain_captions():
    from supergen import synthetic

    quality = _quality()
    cases = quality.cases(20)
    assert cases == quality.cases(20) and len({c["prompt"] for c in cases}) == 20
    assert [c["seed"] for c in cases] == list(range(20))
    counts = [len(synthetic.parse_caption(c["prompt"])) for c in cases]
    assert set(counts[0::2]) == {1} and all(1 <= n <= 2 for n in counts)


def test_quality_summary_and_verdicts():
    quality = _quality()

    def cell(seam, count):
        lines = None if seam is None else 2 * seam  # the all-lines score; controls at 1/1.25 and 1/2 of it
        return {"seam_score": seam, "seam_score_all_lines": lines,
                "seam_score_bicubic_same_lines": lines and lines / 1.25,
                "seam_score_untiled_same_lines": lines and lines / 2,
                "seam_score_untiled_grid_same_lines": seam and 1.0, "seam_score_adjacent": seam and seam - 0.02,
                "seam_score_adjacent_untiled_same_lines": seam and 0.98, "count": count,
                "count_matches_sketch": count == 1, "psnr_vs_sketch_db": 30.0, "tiles_per_step": 4,
                "seconds": 1.0}  # fmt: skip

    rows = [
        {"native_visible": i < 8, "native_colour_visible": True, "sketch_count": 1, "prompted_objects": 1,
         "x2": {"supergen": cell(1.0 + 0.01 * i, 1 if i < 9 else 2), "supergen-noshift": cell(1.5, 1),
                "untiled": cell(None, 1 if i < 5 else 2), "naive": cell(1.4, 3)}}
        for i in range(10)
    ]  # fmt: skip
    summary = quality.summarise(rows, [2])
    sg = summary["x2"]["supergen"]
    assert sg["seam_score_mean"] == pytest.approx(1.045) and sg["seam_score_max"] == pytest.approx(1.09)
    seams = 1.0 + 0.01 * np.arange(10)
    assert sg["seam_score_sem"] == pytest.approx(seams.std(ddof=1) / np.sqrt(10))
    assert sg["seam_score_all_lines_mean"] == pytest.approx(2.09)
    assert sg["seam_score_bicubic_same_lines_mean"] == pytest.approx(2.09 / 1.25)
    assert sg["seam_excess_mean"] == pytest.approx(1.25)  # each method's score over the control's, averaged
    assert sg["seam_excess_vs_untiled_mean"] == pytest.approx(2.0)
    assert sg["seam_score_untiled_grid_same_lines_mean"] == pytest.approx(1.0)
    assert sg["seam_score_adjacent_mean"] == pytest.approx(1.025)
    assert sg["seam_score_adjacent_untiled_same_lines_mean"] == pytest.approx(0.98)
    untiled = summary["x2"]["untiled"]  # no tile edges: no seam measures, but counted like the others
    assert untiled["seam_score_mean"] is None and untiled["seam_excess_vs_untiled_mean"] is None
    assert untiled["seam_score_adjacent_mean"] is None
    assert untiled["count_match_fraction"] == 0.5
    assert sg["count_match_fraction"] == 0.9 and summary["x2"]["naive"]["count_match_fraction"] == 0.0
    assert summary["native"]["visible_fraction"] == 0.8
    rows[9]["sketch_count"] = 0  # an empty sketch: left out of the non-vacuous match fraction
    assert quality.summarise(rows, [2])["x2"]["supergen"]["count_match_fraction_sketch_has_objects"] == 1.0
    assert quality.summarise(rows, [2])["sketches_with_objects"] == 9
    rows[9]["sketch_count"] = 1
    assert quality.verdicts(summary, [2]) == {"native_visible": True, "x2_seam": True, "x2_duplication": True,
                                              "all": True}  # fmt: skip
    rows[0]["x2"]["supergen"]["count_matches_sketch"] = False
    assert quality.verdicts(quality.summarise(rows, [2]), [2])["all"] is False


def test_shift_period_moves_d_and_the_lines_its_seam_is_scored_on():
    """``Comparison(shift_period=)`` is (d)'s grid drift, and the quality bench scores (d)'s seams on the
    tile edges of that grid's last step (a faster drift puts them elsewhere)."""
    from supergen.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    slow, fast = (compare.Comparison(pipe, prompt=PROMPT, num_frames=5, num_inference_steps=3, refine_steps=2,
                                     guidance_scale=5.0, shift_period=p) for p in (16, 2))  # fmt: skip
    assert slow.shifted.tiling.shift_period == 16 and fast.shifted.tiling.shift_period == 2
    assert slow.fixed.tiling == fast.fixed.tiling  # the naive and no-shift variants do not shift at all
    quality = _quality()
    edges = [quality.last_step_edges(c, "supergen", 96, 64) for c in (slow, fast)]
    assert edges[0][0] and edges[0] != edges[1], edges


def test_quality_rejects_a_bad_shift_period(capsys):
    assert _quality().main(["--shift-period", "0", "--cases", "1"]) == 2
    assert "--shift-period must be >= 1 but is 0" in capsys.readouterr().err


def test_quality_refuses_without_the_trained_model(monkeypatch, capsys):
    import supergen.tiny as tiny

    monkeypatch.setattr(tiny, "TRAINED_DIR", tiny.TRAINED_DIR.parent / "no-such-model")
    assert _quality().main([]) == 2
    assert "not installed" in capsys.readouterr().err


@pytest.mark.slow
def test_quality_end_to_end_on_an_untrained_tiny_wan_folder(tmp_path):
    """The whole benchmark on a format-identical (barely trained) folder: one case, JSON written."""
    model = tmp_path / "tiny-wan"
    subprocess.run([sys.executable, str(ROOT / "training" / "train_tiny_wan.py"), "--seed", "0", "--max-steps", "1",
                    "--minutes", "1", "--dit-clips", "8", "--threads", "1", "--out", str(model)], check=True,
                   capture_output=True)  # fmt: skip
    out = tmp_path / "q.json"
    assert _quality().main(["--model", str(model), "--cases", "1", "--steps", "4", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["summary"]["cases"] == 1 and set(data["cases"][0]["x2"]) == set(_quality().METHODS)
    assert data["cases"][0]["x2"]["supergen"]["tiles_per_step"] == 4
    assert "quality.py" in data["command"] and set(data["pass"]) >= {"all", "x2_seam", "x2_duplication"}


def test_cli_routes_compare_and_exits_2_on_bad_input(tmp_path, capsys):
    """`supergen compare` is a subcommand of the one CLI: success writes the PNG, bad input exits 2."""
    from supergen.cli import main

    out = tmp_path / "c.png"
    argv = ["compare", "--model", "tiny-random", "--steps", "2", "--refine-steps", "1", "--frames", "5", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main([*argv, "--out", str(out)]) == 2  # exists, no --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
