"""Tile parallelism: region geometry and the LPT assignment (in process), and real multi-process runs
(gloo on the CPU, one process per rank started by tests/parallel_worker.py) whose final latent must
equal the single-process latent, plus the failure and configuration-mismatch behaviour."""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from parallel_worker import fake_run  # noqa: E402

from supergen import parallel as par  # noqa: E402
from supergen.config import ParallelConfig, TilingConfig  # noqa: E402
from supergen.parallel.refine import _halo_dtype  # noqa: E402
from supergen.parallel.state import _rebuild_latents, _region_refs  # noqa: E402
from supergen.tiling import TileGrid  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
WORKER = Path(__file__).resolve().parent / "parallel_worker.py"

# Fake-predictor cases: odd tile counts, uneven (overlapping) torus windows, fixed overlap, clamp + shift,
# and a 2-tile canvas (more ranks than tiles at 3 and 4 ranks); UniPC (multistep history) and Euler.
CASES = [
    {"name": "torus_odd", "canvas": [2, 24, 24], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc"},
    {"name": "torus_uneven", "canvas": [2, 22, 26], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "euler"},
    {"name": "overlap", "canvas": [2, 20, 28], "tile": [8, 8], "tiling": {"shift": False, "overlap": 2},
     "scheduler": "euler"},
    {"name": "clamp", "canvas": [2, 22, 26], "tile": [8, 8], "tiling": {"boundary": "clamp", "overlap": 2},
     "scheduler": "unipc"},
    {"name": "few_tiles", "canvas": [2, 8, 16], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc"},
    {"name": "rehash", "canvas": [2, 24, 24], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc",
     "rehash": [True, False, True, False, True]},
    # classifier-free guidance as two forwards per tile: ranks above ceil(2C/R) forwards hand one away
    {"name": "torus_guided", "canvas": [2, 24, 24], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc",
     "guided": True},
    {"name": "few_guided", "canvas": [2, 8, 16], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "euler",
     "guided": True},
    # a scheduler drawing noise inside step (as CogVideoX's DPM): each region's cells of the canvas's draw
    {"name": "noise_torus", "canvas": [2, 22, 26], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "ddpm"},
]  # fmt: skip
for _case in CASES:
    _case.update(steps=6, refine_steps=5)
# The tile cache (gate / budget) under parallelism: torus shifted (9 tiles, one step skips all of them),
# fixed overlap, clamp + overlap (tile count changes per step), 2 tiles (more ranks than tiles). Warm-up
# of one step and 7 refinement steps, so that each case really skips tiles (asserted below).
CACHE_CASES = [
    {"name": "gate_torus", "canvas": [2, 24, 24], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc",
     "cache": {"mode": "gate"}},
    {"name": "budget_overlap", "canvas": [2, 20, 28], "tile": [8, 8], "tiling": {"shift": False, "overlap": 2},
     "scheduler": "unipc", "cache": {"mode": "budget", "budget": 0.5}},
    {"name": "gate_clamp", "canvas": [2, 22, 26], "tile": [8, 8], "tiling": {"boundary": "clamp", "overlap": 2},
     "scheduler": "euler", "cache": {"mode": "gate", "threshold": 0.3}},
    {"name": "budget_few", "canvas": [2, 8, 16], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc",
     "cache": {"mode": "budget", "budget": 0.5}},
    {"name": "budget_guided", "canvas": [2, 16, 24], "tile": [8, 8], "tiling": {"shift": True}, "scheduler": "unipc",
     "cache": {"mode": "budget", "budget": 0.5}, "guided": True},
]  # fmt: skip
for _case in CACHE_CASES:
    _case.update(steps=8, refine_steps=7)
    _case["cache"].update(warmup=1, max_skips=2)
CASES += CACHE_CASES
for _case in CASES:
    _case["regions"] = "follow"  # regions move with the grid, carrying their state
# The same with fixed regions (the default): shifted tiles straddle boundaries, no state ever moves.
FIXED_CASES = [dict(c, name=f"{c['name']}_fixed", regions="fixed") for c in CASES]
# The cache cases with ParallelConfig(fill_idle=True) (and the default regions): ranks short of the
# busiest one's tile count compute more.
FILL_CASES = [dict(c, name=f"{c['name']}_fill", fill_idle=True, regions="fixed") for c in CACHE_CASES]
TINY = {"name": "tiny_wan", "model": "tiny", "height": 128, "width": 192, "steps": 4, "refine_steps": 3,
        "tiling": {"shift": True}}  # fmt: skip
TINY_CACHE = dict(TINY, name="tiny_wan_budget", steps=5, refine_steps=4, cache={"mode": "budget", "warmup": 1})
TINY_FOLLOW = dict(TINY_CACHE, name="tiny_wan_budget_follow", regions="follow")
TINY_BF16 = dict(TINY, name="tiny_wan_bf16", dtype="bfloat16")  # bf16 model, fp32 latents
TINY_DRIFT = dict(TINY, name="tiny_wan_drift", drift_rank=1)  # rank 1's VAE encode is off by 1e-3
TINY_SPLIT = dict(TINY, name="tiny_wan_split", height=64, width=192)  # 3 tiles: 2 ranks split one's guidance
TINY_WHOLE = dict(TINY, name="tiny_wan_whole", split_guidance=False)  # stage 1 on rank 0 alone, whole tiles
# noise reshifting: stage 1 is the stock pipeline (K steps), one forward, then the lower size's own loop
TINY_RESHIFT = dict(TINY, name="tiny_wan_reshift", reshift={"native_steps": 2, "scale": 0.5})
# decoded to video: the ranks share the upscale's encode and the final decode in bands of (small) VAE tiles
TINY_DECODE = dict(TINY, name="tiny_wan_decode", output_type="pt", vae_tile=[8, 6])
# Wan 2.2's two experts, switching inside the refinement (9 steps, refined from timestep 960: 960 913 857 789 |
# 706 600 462 274), with the tile cache, which warms up again at the switch on both ranks
TINY_EXPERTS = dict(TINY_CACHE, name="tiny_wan22_budget", steps=9, refine_steps=8, boundary_ratio=0.75)
TINY_CASES = [TINY, TINY_CACHE, TINY_FOLLOW, TINY_BF16, TINY_DRIFT, TINY_SPLIT, TINY_WHOLE, TINY_RESHIFT, TINY_DECODE,
              TINY_EXPERTS]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, cases: list, out: Path, timeout: float = 60.0) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "timeout": timeout}))
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(spec), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    return procs


def _wait(procs, limit: float) -> list[tuple[int, str]]:
    results = []
    try:
        for p in procs:
            text, _ = p.communicate(timeout=limit)
            results.append((p.returncode, text))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture(scope="module")
def single_process():
    """Every fake case's final latent and cache from the plain single-process loop."""
    return {case["name"]: fake_run(case) for case in CASES}


# --------------------------------------------------------------------------------------------------
# Multi-process runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_reproduce_the_single_process_latent(world, single_process, tmp_path):
    # at 2 ranks also the tiny Wan through SuperGen, and ranks started with different prompts
    mismatch = dict(TINY, name="mismatch", prompt_by_rank=["a red fox", "a blue fox"])
    sketch_split = {"name": "sketch_split", "kind": "sketch_split"}  # SketchGuidanceSplit on a cheap "model"
    batch_split = {"name": "batch_split", "kind": "batch_split"}  # SketchBatchSplit on cheap batched "models"
    # at 3 ranks the decoded tiny Wan: rank 0 splits the sketch's guidance with rank 1 and beats for rank 2
    tiny = [mismatch, sketch_split, batch_split, *TINY_CASES] if world == 2 else [TINY_DECODE] if world == 3 else []
    cases = CASES + FIXED_CASES + FILL_CASES + tiny
    results = _wait(_launch(world, cases, tmp_path), limit=300)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{text[-3000:]}"
    # 2 tiles on 3 or 4 ranks: rank 0 says how many ranks idle and how many processes would do
    idle = f"{world} ranks share 2 tiles per step, so {world - 2} of them have no tile to compute"
    assert (idle in results[0][1]) == (world > 2) and all(idle not in text for _, text in results[1:])
    for case in CASES + FIXED_CASES:
        got = torch.load(tmp_path / f"{case['name']}.pt")
        want = single_process[case["name"].removesuffix("_fixed")][0]
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, case["name"]
    stats = {c["name"]: json.loads((tmp_path / f"{c['name']}.rank1.json").read_text()) for c in CASES + FIXED_CASES}
    # aligned torus tiles never straddle a region: only the shift-wide migration strips move
    kinds = stats["torus_odd"]["exchange"]["bytes_sent_by_kind"]
    assert kinds["inputs"] == 0 and kinds["predictions"] == 0 and kinds["migration"] > 0
    # fixed overlapping tiles: halos both ways, regions never move
    kinds = stats["overlap"]["exchange"]["bytes_sent_by_kind"]
    assert kinds["inputs"] > 0 and kinds["predictions"] > 0 and kinds["migration"] == 0
    # the geometry code the benchmark counts with predicts every byte the ranks sent (Euler: no history)
    for name in ("torus_uneven", "overlap"):
        case = next(c for c in CASES if c["name"] == name)
        assert stats[name]["exchange"]["bytes_sent_per_step"] == _predicted_bytes(case, world, rank=1), name
    # UniPC: only its history migrates (the last sample and the model outputs it holds: one after the
    # first step, two after later ones); the receivers rebuild the latents from it (Euler's move)
    assert stats["torus_odd"]["latents_rebuilt"] and not stats["torus_uneven"]["latents_rebuilt"]
    assert not stats["torus_odd_fixed"]["latents_rebuilt"]  # fixed regions move nothing
    for name in ("torus_odd", "few_tiles"):
        case = next(c for c in CASES if c["name"] == name)
        history = [1 + min(i + 1, 2) for i in range(case["refine_steps"])]
        predicted = _predicted_bytes(case, world, rank=1, state_tensors=history)
        assert stats[name]["exchange"]["bytes_sent_per_step"] == predicted, name
    # fixed regions: nothing ever migrates, shifted tiles straddle boundaries (halos both ways), and the
    # geometry code predicts every byte (the scheduler's history never moves, so UniPC cases count too)
    for case in FIXED_CASES:
        kinds = stats[case["name"]]["exchange"]["bytes_sent_by_kind"]
        assert kinds["migration"] == 0, case["name"]
        if world > 1 and case["name"] in ("torus_odd_fixed", "clamp_fixed"):
            assert kinds["inputs"] > 0 and kinds["predictions"] > 0, case["name"]
        if "cache" not in case and "rehash" not in case:
            assert stats[case["name"]]["exchange"]["bytes_sent_per_step"] == _predicted_bytes(case, world, rank=1)
    # every tile computed exactly once per step; Step Rehash's reuse steps compute none
    for name in ("torus_odd", "overlap"):
        assert all(sum(step) == 9 if name == "torus_odd" else sum(step) > 0 for step in stats[name]["computed_tiles"])
    assert [sum(s) for s in stats["rehash"]["computed_tiles"]] == [9, 0, 9, 0, 9]
    # guidance split: whole tiles would leave the busiest rank 2 ceil(C/R) forwards; it hands second
    # branches to idle ranks down to ceil(2C/R), and the geometry code predicts every byte
    for name in ("torus_guided", "torus_guided_fixed", "few_guided", "few_guided_fixed"):
        for forwards, computed in zip(stats[name]["forwards"], stats[name]["computed_tiles"]):
            assert sum(forwards) == 2 * sum(computed) and max(forwards) == -(-2 * sum(computed) // world), name
        splits = any(max(f) < 2 * max(c) for f, c in zip(stats[name]["forwards"], stats[name]["computed_tiles"]))
        assert splits == (world in (2, 4) if name.startswith("torus") else world == 4), (name, world)
    by_name = {c["name"]: c for c in CASES + FIXED_CASES}
    for case in (by_name["torus_guided_fixed"], by_name["few_guided"]):
        assert stats[case["name"]]["exchange"]["bytes_sent_per_step"] == _predicted_bytes(case, world, rank=1)
    # tile cache: every rank takes the single-process decisions (the same hit map, so the same report
    # totals), it really skips, nobody computes a skipped tile, and the computed ones are balanced
    for case in [c for c in CASES + FIXED_CASES if "cache" in c]:
        name, want = case["name"], single_process[case["name"].removesuffix("_fixed")][1].stats
        assert want.skipped > 0, name
        for rank in range(world):
            got = json.loads((tmp_path / f"{name}.rank{rank}.json").read_text())
            assert got["cache"] == want.as_dict(), (name, rank)
            assert [sum(s) for s in got["computed_tiles"]] == [sum(s) for s in want.per_step], name
            assert all(max(s) - min(s) <= 1 for s in got["computed_tiles"]), (name, got["computed_tiles"])
        assert stats[name]["exchange"]["bytes_sent_by_kind"]["cache_stats"] > 0
    # with the cache too, the geometry code (and so the benchmark) predicts every byte (Euler: no history)
    cache = single_process["gate_clamp"][1]
    for case in (CACHE_CASES[2], next(c for c in FIXED_CASES if c["name"] == "gate_clamp_fixed")):
        want = _predicted_bytes(case, world, rank=1, cache=cache)
        assert stats[case["name"]]["exchange"]["bytes_sent_per_step"] == want, case["name"]
    assert [sum(s) for s in stats["gate_torus"]["computed_tiles"]].count(0) >= 1  # a step skipping every tile
    # idle slots filled: each step every rank computes as many tiles as the busiest (or all are computed),
    # the ranks agree on the decisions, and one process computing the same tiles gets the same latent
    added = 0
    for case in FILL_CASES:
        name = case["name"]
        got = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(world)]
        assert all(g["cache"] == got[0]["cache"] for g in got), name
        hit_map = got[0]["cache"]["hit_map"]
        k = 2 if case.get("guided") else 1  # forwards per tile, split across ranks where that helps
        for step, tiles, forwards in zip(hit_map, got[0]["computed_tiles"], got[0]["forwards"]):
            C = len(step) - sum(step)
            assert sum(tiles) == C and sum(forwards) == k * C
            # nobody idles where one more tile fits in the busiest rank's forwards
            assert max(forwards) == -(-k * C // world), (name, forwards)
            assert sum(step) == 0 or k * (C + 1) > max(forwards) * world, (name, forwards)
        replayed, _ = fake_run(dict(case, hit_map=hit_map))
        assert (torch.load(tmp_path / f"{name}.pt") - replayed).abs().max().item() <= 1e-5, name
        plain = single_process[name.removesuffix("_fill")][1].stats
        added += got[0]["cache"]["computed_tile_steps"] - plain.computed
    if world > 1:
        assert added > 0  # filling really computed tiles the single process skipped
    if world == 3:
        single, report = _tiny_single_process(TINY_DECODE)
        name = TINY_DECODE["name"]
        assert (torch.load(tmp_path / f"{name}.pt") - single).abs().max().item() <= 1e-5
        assert torch.equal(torch.load(tmp_path / f"{name}.frames.pt"), report["frames"])
        ranks = [json.loads((tmp_path / f"{name}.rank{r}.json").read_text()) for r in range(3)]
        assert [r["sketch_runs"] for r in ranks] == [1, 1, 0]  # rank 2 followed rank 0's heartbeat
        assert [r["sketch_forwards"] for r in ranks] == [TINY_DECODE["steps"] + 1] * 2 + [None]
        assert len(ranks[0]["decode_blocks"]["kept"]) == 3 and ranks[1]["decode_gather_bytes"] > 0
    if world == 2:
        # through SuperGen: without and with the tile cache, both region policies, and a bf16 model
        for case in TINY_CASES:
            single, report = _tiny_single_process(dict(case, drift_rank=None))
            got = torch.load(tmp_path / f"{case['name']}.pt")
            assert (got - single).abs().max().item() <= 1e-5, case["name"]
            split = case.get("split_guidance", True)  # the tiny Wan guides with two forwards (scale 4)
            reshifted = report["sizes"]["sketch_reshift"]  # the sketch is the lower size's latent
            sketch_latent = reshifted["latent"] if reshifted else report["sizes"]["sketch_latent"]
            for rank in range(2):
                ranks_report = json.loads((tmp_path / f"{case['name']}.rank{rank}.json").read_text())
                assert ranks_report["cache"] == report["cache"], (case["name"], rank)
                assert ranks_report["regions_configured"] == case.get("regions", "auto"), case["name"]
                assert ranks_report["regions"] == case.get("regions", ranks_report["regions"]), case["name"]
                assert ranks_report["regions"] in ("fixed", "follow"), case["name"]  # auto resolved
                # the tiny Wan steps with UniPC: following regions rebuild its latents from its history
                rebuilt = ranks_report["latents_rebuilt_from_history"]
                assert rebuilt == (ranks_report["regions"] == "follow"), case["name"]
                # stage 1 ran on rank 0, which broadcast the sketch latent (fp32) to the others, and with
                # split guidance on rank 1 too: each input size's first (cond, uncond) pair on both ranks,
                # every later pair one forward each, swapping outputs (one sketch-size output, model dtype)
                assert ranks_report["sketch_runs"] == (1 if rank == 0 or split else 0), (case["name"], rank)
                sketch_bytes = got.shape[0] * got.shape[1] * math.prod(sketch_latent) * 4
                assert ranks_report["sketch_broadcast_bytes"] == (sketch_bytes if rank == 0 else 0), case["name"]
                if not split:
                    assert ranks_report["sketch_forwards"] is None and ranks_report["sketch_branches_bytes"] == 0
                elif case.get("reshift"):  # K native steps + the estimate, then N - K steps at the lower size
                    K, N = case["reshift"]["native_steps"], case["steps"]
                    assert ranks_report["sketch_forwards"] == (K + 1) + 1 + (N - K) + 1, case["name"]
                else:  # N steps, 2N forwards in one process
                    assert ranks_report["sketch_forwards"] == case["steps"] + 1, case["name"]
                    size = {"bfloat16": 2}.get(case.get("dtype"), 4)
                    want = (case["steps"] - 1) * sketch_bytes // 4 * size
                    assert ranks_report["sketch_branches_bytes"] == want, (case["name"], rank)
                # the ranks' re-noised canvases agree (checksums), unless one rank's upscale drifted: then
                # rank 0 broadcast its canvas once and the result is still the single-process one
                canvas_bytes = got.numel() * 4 if case is TINY_DRIFT and rank == 0 else 0
                assert ranks_report["canvas_broadcast_bytes"] == canvas_bytes, (case["name"], rank)
            if case in (TINY_CACHE, TINY_EXPERTS):
                assert report["cache"]["skipped_tile_steps"] > 0
            if case is TINY_DECODE:  # rank 0's video is the one process's, pixel for pixel
                frames = torch.load(tmp_path / f"{case['name']}.frames.pt")
                assert torch.equal(frames, report["frames"])
                ranks = [json.loads((tmp_path / f"{case['name']}.rank{r}.json").read_text()) for r in range(2)]
                plan = ranks[0]["decode_blocks"]
                assert plan == ranks[1]["decode_blocks"] and len(plan["kept"]) == 2, plan
                assert ranks[0]["decode_broadcast_bytes"] == got.numel() * 4 and ranks[1]["decode_broadcast_bytes"] == 0
                # rank 1 sent rank 0 its block's pixels (B, 3, F, rows, columns) in the VAE's fp32, 8 pixels a cell
                ((a, b), (c, d)), (B, F) = plan["kept"][1], frames.shape[:2]
                block = B * 3 * F * (b - a) * 8 * (d - c) * 8
                assert ranks[1]["decode_gather_bytes"] == block * 4 and ranks[0]["decode_gather_bytes"] == 0
                # the upscale's encode in the same blocks: each rank sent the other its block of the latent (fp32),
                # and the refined latent above is still the one process's
                plan = ranks[0]["encode_blocks"]
                assert plan == ranks[1]["encode_blocks"] and len(plan["kept"]) == 2, plan
                for rank, ((a, b), (c, d)) in enumerate(plan["kept"]):
                    want = got.shape[0] * got.shape[1] * got.shape[2] * (b - a) * (d - c) * 4
                    assert ranks[rank]["encode_exchange_bytes"] == want, (rank, plan)
            elif "encode_blocks" in ranks_report:  # the VAE's default tiles: these canvases are one tile
                assert ranks_report["encode_blocks"] is None and ranks_report["decode_blocks"] is None
            if case is TINY_SPLIT:  # 3 tiles of 2 forwards on 2 ranks: 3 forwards each, one tile's sent
                assert all(f == [3, 3] for f in ranks_report["forwards_per_rank"]), ranks_report["forwards_per_rank"]
                sent = [json.loads((tmp_path / f"{case['name']}.rank{r}.json").read_text()) for r in range(2)]
                assert sum(r["bytes_sent_by_kind"].get("branches", 0) for r in sent) > 0
        # stage 1's guidance split on its own: the first pair of each input size whole on both ranks, every
        # later one a forward each (a 2x3 and a 5-element input, 3 steps each: 8 forwards instead of 12),
        # the outputs swapped; calls that are not pairs never split; a pair that stops matching raises
        for rank in range(2):
            got = json.loads((tmp_path / f"sketch_split.rank{rank}.json").read_text())
            assert got["pairs"] == {"ok": True, "forwards": 8, "sent": 2 * (6 + 5) * 4}, got
            assert got["unpaired"] == {"ok": True, "enabled": False, "forwards": 6}, got
            assert "not (conditional, unconditional) pairs" in got["error"], got
        # stage 1's batched guidance on its own: where a half of the batch is exactly a slice of the whole
        # call (independent samples), the first call of each size runs whole and in halves (3 half-batch
        # forwards), every later one a half each (2 sizes x (3 + 2) = 10 instead of 12), the halves swapped
        # (fp32: (2 x 3 + 1 x 5) values x 2 later calls); where samples interact, the probe fails on both ranks
        # and every call stays whole; a model with diffusers hooks (a stateful cache) never splits
        for rank in range(2):
            got = json.loads((tmp_path / f"batch_split.rank{rank}.json").read_text())
            assert got["independent"] == {"ok": True, "enabled": True, "forwards": 10, "sent": 2 * (6 + 5) * 4}, got
            assert got["coupled"] == {"ok": True, "enabled": False, "forwards": 3 + 2 * 2 + 3 * 2, "sent": 0}, got
            assert got["hooked_enabled"] is False, got
        # a bf16 model's input halos travel in bf16: the same cells as the fp32 run, half the bytes
        fp32, bf16 = (json.loads((tmp_path / f"{c['name']}.rank1.json").read_text()) for c in (TINY, TINY_BF16))
        assert fp32["bytes_sent_by_kind"]["inputs"] > 0
        assert bf16["bytes_sent_by_kind"]["inputs"] * 2 == fp32["bytes_sent_by_kind"]["inputs"]
        # the mismatch raised on every rank before any model work, naming the differing value
        for rank in range(2):
            message = (tmp_path / f"mismatch.rank{rank}.error").read_text()
            assert "different settings" in message and "prompt: rank 0='a red fox', rank 1='a blue fox'" in message


# LTX-Video guides in fp32 after a bf16 forward that batches both branches: 3 tiles of 8x16 latent cells
TINY_LTX = {"name": "tiny_ltx_bf16", "model": "tiny_ltx", "dtype": "bfloat16", "height": 32, "width": 192,
            "steps": 4, "refine_steps": 3}  # fmt: skip
TINY_LTX_SEPARATE = dict(TINY_LTX, name="tiny_ltx_separate", separate_guidance=True)
TINY_LTX_HALVES = dict(TINY_LTX, name="tiny_ltx_halves", guidance_rescale=0.0)  # plain CFG: elementwise


def test_batched_guidance_family_reproduces_one_process_and_splits_where_exact(tmp_path):
    """The tiny LTX-Video (bf16 model) at 2 ranks gives the one-process latent: its predictions travel and
    blend in the fp32 its adapter returns (``prediction_dtype``), not in the model's bf16. Its guidance is
    one batched forward per tile, so 3 tiles take 2 forwards on the busiest rank, unless the two halves
    of that forward, run apart, give its prediction bit for bit (both ranks check it on the first tile):
    then, as with ``separate_guidance`` (two forwards in the one process too), the busiest rank hands one
    tile's second half to the other (3 half-batch forwards each), which sends it back in the model's
    bf16. Stage 1's batched call splits the same way where exact."""
    results = _wait(_launch(2, [TINY_LTX, TINY_LTX_SEPARATE, TINY_LTX_HALVES], tmp_path), limit=300)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{text[-3000:]}"
    for case in (TINY_LTX, TINY_LTX_SEPARATE, TINY_LTX_HALVES):
        single, _ = _tiny_single_process(case)
        got = torch.load(tmp_path / f"{case['name']}.pt")
        assert torch.equal(got, single), (case["name"], (got - single).abs().max().item())
        ranks = [json.loads((tmp_path / f"{case['name']}.rank{r}.json").read_text()) for r in range(2)]
        # batched guidance splits where its halves give the batched prediction exactly (checked by both
        # ranks on the first tile: it depends on the kernels, and on the guidance arithmetic where
        # guidance_rescale sums in another order), and always with separate_guidance (the one process runs
        # the halves too); on this CPU the halves are exact with and without guidance_rescale
        halves = [r["guidance_halves_exact"] for r in ranks]
        assert halves[0] == halves[1] and (halves[0] is None) == (case is TINY_LTX_SEPARATE), (case["name"], halves)
        # the check itself: one batched and two half-batch forwards of the first tile on every rank
        assert [r["probe_forwards"] for r in ranks] == [0 if halves[0] is None else 3] * 2, (case["name"], ranks)
        split = case is TINY_LTX_SEPARATE or halves[0]
        forwards = [3, 3] if split else [2, 1]  # 3 tiles: batched, 2 and 1; split, 3 half-batch forwards each
        assert all(sorted(f, reverse=True) == forwards for f in ranks[0]["forwards_per_rank"]), (case["name"], ranks[0])
        # stage 1 (4 steps, one batched call each) on ranks 0 and 1: split where a half-batch forward is
        # exactly a slice of the whole call (the first call probes it: whole and a half, 3 half-batch
        # forwards, then one half per step), else every call whole on both; the latent is the same either way
        steps = case["steps"]
        sketch_split = [r["sketch_forwards"] for r in ranks] == [steps + 2] * 2
        assert sketch_split or [r["sketch_forwards"] for r in ranks] == [3 + 2 * (steps - 1)] * 2, ranks
        assert all((r["sketch_branches_bytes"] > 0) == sketch_split for r in ranks), ranks
        branches = [r["bytes_sent_by_kind"].get("branches", 0) for r in ranks]
        B, C, T, h, w = 1, 8, 3, 8, 16  # one tile's branch output, bf16, per refined step
        assert sum(branches) == (B * C * T * h * w * 2 * case["refine_steps"] if split else 0), branches


def test_supergen_generate_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m supergen.cli generate` (the README's launch) writes the same latent
    as one process, only rank 0 writes the outputs, and its report names the run's two ranks."""
    from safetensors.torch import load_file

    argv = ["-m", "supergen.cli", "generate", "--model", "tiny-random", "--height", "96", "--width", "64",
            "--frames", "5", "--steps", "3", "--refine-steps", "2", "--quiet", "--parallel-timeout", "60"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    one = tmp_path / "one"
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    runs = {"one": [sys.executable], "two": [sys.executable, *torchrun]}
    for name, prefix in runs.items():
        out = tmp_path / name
        out.mkdir()
        files = ["--out", str(out / "v.mp4"), "--report", str(out / "r.json"),
                 "--save-latents", str(out / "l.safetensors")]  # fmt: skip
        done = subprocess.run([*prefix, *argv, *files], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == ["l.safetensors", "r.json", "v.mp4"], name  # nothing stray
    got, want = (load_file(tmp_path / n / "l.safetensors")["latents"] for n in ("two", "one"))
    assert (got - want).abs().max().item() <= 1e-5
    report = json.loads((tmp_path / "two" / "r.json").read_text())["parallel"]
    assert report["world_size"] == 2 and report["rank"] == 0 and report["sketch_broadcast_bytes"] > 0
    assert json.loads((one / "r.json").read_text())["parallel"] is None


# Stage 1 on every rank with diffusers' Ulysses attention (the tiny Wan: 2 heads, a 3x8x8 sketch latent in
# (1, 2, 2) patches = 48 tokens). Without the guidance split every forward's tokens are split over all ranks
# (2 here; with noise reshifting supergen's own lower-size loop runs under it too); with it (the default) the
# ranks split in two halves, each computing one call of every guidance pair with its tokens over its half
# (4 ranks: 2 x 2). Errors: 3 tokens (a reshifted 3x2x2 latent) on 2 ranks, 2 heads on 3 (odd: no halves), a
# machine without accelerators.
TINY_CONTEXT = dict(TINY, name="tiny_wan_context", sketch_context="ulysses", split_guidance=False)
TINY_CONTEXT_RESHIFT = dict(TINY_RESHIFT, name="tiny_wan_context_reshift", sketch_context="ulysses",
                            split_guidance=False)  # fmt: skip
TINY_CONTEXT_HALVES = dict(TINY, name="tiny_wan_context_halves", sketch_context="ulysses")
# ring attention merges each key/value shard's partial output by its log-sum-exp, which supergen's
# attention backend returns (diffusers' native one does not): the CPU runs ring on supergen's kernel
TINY_RING = dict(TINY_CONTEXT, name="tiny_wan_ring", sketch_context="ring", supergen_attention=True)
TINY_ULYSSES_OURS = dict(TINY_CONTEXT, name="tiny_wan_ulysses_supergen_attention", supergen_attention=True)
CONTEXT_CASES = {2: [TINY_CONTEXT, TINY_CONTEXT_RESHIFT, TINY_RING, TINY_ULYSSES_OURS], 4: [TINY_CONTEXT_HALVES]}
CONTEXT_ERRORS = {
    2: [dict(TINY_CONTEXT, name="context_tokens", reshift={"native_steps": 2, "scale": 0.25}, expect_error=True),
        dict(TINY_CONTEXT, name="context_no_accelerator", accelerators=0, expect_error=True)],
    3: [dict(TINY_CONTEXT_HALVES, name="context_heads", expect_error=True)],
}  # fmt: skip
CONTEXT_MESSAGES = {
    "context_tokens": "splits the tokens over the 2 ranks, but the reshifted sketch (latent 3x2x2) has 3 tokens",
    "context_no_accelerator": "needs an accelerator per rank",
    "context_heads": "splits the attention heads over the 3 ranks, but WanTransformer3DModel has 2",
}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_sketch_context_parallel_shares_every_sketch_forward_and_matches_one_process(world, tmp_path):
    """``ParallelConfig(sketch_context="ulysses")``: every rank runs the stock pipeline (and, with noise
    reshifting, supergen's lower-size loop), each forward split along its tokens with diffusers' context
    parallelism over all ranks or, with the guidance split, over each half of the ranks, the halves
    computing one call of every guidance pair each and swapping outputs; the model is given back without
    its hooks for stage 2's tile forwards; the latent is the one process's (on this CPU a token's output
    is the same in a shard as in the whole sequence). What does not fit fails on every rank before any
    model work, naming it."""
    ok, errors = CONTEXT_CASES.get(world, []), CONTEXT_ERRORS.get(world, [])
    results = _wait(_launch(world, ok + errors, tmp_path), limit=300)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{text[-3000:]}"
    for case in errors:
        for rank in range(world):
            message = (tmp_path / f"{case['name']}.rank{rank}.error").read_text()
            assert CONTEXT_MESSAGES[case["name"]] in message, (rank, message)
    for case in ok:
        single, _ = _tiny_single_process(case)
        got = torch.load(tmp_path / f"{case['name']}.pt")
        assert (got - single).abs().max().item() <= 1e-5, case["name"]
        halves = case.get("split_guidance", True)
        # all ranks: two calls per step (+ the reshift's estimate's two); halves: the first pair both calls,
        # then one call per step, and one sketch-size output (fp32) sent per later step
        N = case["steps"]
        forwards = N + 1 if halves else 2 * N + (2 if case.get("reshift") else 0)
        sent = (N - 1) * got.shape[0] * got.shape[1] * 3 * 8 * 8 * 4 if halves else 0
        for rank in range(world):
            report = json.loads((tmp_path / f"{case['name']}.rank{rank}.json").read_text())
            assert report["sketch_context"] == case["sketch_context"], (case["name"], rank)
            assert report["sketch_runs"] == 1, (case["name"], rank)
            assert report["sketch_forwards"] == forwards, (case["name"], rank, report["sketch_forwards"])
            assert report["sketch_branches_bytes"] == sent, (case["name"], rank, report["sketch_branches_bytes"])
            assert report["context_parallel_left"] == 0, (case["name"], rank)  # stage 2 ran the stock model
            assert (report["sketch_broadcast_bytes"] > 0) == (rank == 0), (case["name"], rank)
            # the sketch's 48 tokens (and the reshifted sketch's 12) were split over 2 ranks; tiles run whole (48)
            split_tokens = [6, 24, 48] if case.get("reshift") else [24, 48]
            assert report["attention_tokens"] == split_tokens, (case["name"], rank, report["attention_tokens"])


def test_sketch_context_check_names_what_does_not_fit(monkeypatch):
    """What ``sketch_context`` needs is checked before any model work, each failure naming its value."""
    import diffusers
    from diffusers import CogVideoXTransformer3DModel
    from helpers import tiny_ltx_pipeline, tiny_wan_transformer
    from packaging.version import Version

    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    wan = tiny_wan_transformer()  # 2 heads, diffusers' native attention backend
    cog = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      time_embed_dim=8, text_embed_dim=16, num_layers=1)  # fmt: skip
    ctx = lambda kind, world=2: par.ParallelContext(world_size=world, config=ParallelConfig(sketch_context=kind))  # noqa: E731
    par.check_sketch_context(ctx("ulysses"), [wan, None], {"sketch": 48})  # fits: no error
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel has no context-parallel plan"):
        par.check_sketch_context(ctx("ulysses"), [cog], {"sketch": 48})
    # LTX-Video's plan reaches a masked cross-attention, which diffusers' Ulysses fails on up to 0.42.1
    ltx = tiny_ltx_pipeline().transformer
    known_bug = Version(diffusers.__version__) <= Version("0.42.1")
    match = r"does not split the head axis .* LTXVideoTransformer3DModel .*#14316"
    with pytest.raises(ValueError, match=match) if known_bug else contextlib.nullcontext():
        par.check_sketch_context(ctx("ulysses"), [ltx], {"sketch": 48})
    with pytest.raises(ValueError, match="needs an attention backend that returns the log-sum-exp.*is 'native'"):
        par.check_sketch_context(ctx("ring"), [wan], {"sketch": 48})
    # supergen's kernel returns the log-sum-exp, for plain attention: Wan's self-attention, not LTX's masked one
    from supergen.attention import disable_masked_attention, enable_masked_attention

    par.check_sketch_context(ctx("ring"), [enable_masked_attention(wan)], {"sketch": 48})
    disable_masked_attention(wan)
    with pytest.raises(ValueError, match="LTXVideoTransformer3DModel passes an attention mask .* plain attention only"):
        par.check_sketch_context(ctx("ring"), [enable_masked_attention(ltx)], {"sketch": 48})
    with pytest.raises(ValueError, match="heads over the 4 ranks, but WanTransformer3DModel has 2; use 'ring'"):
        par.check_sketch_context(ctx("ulysses", 4), [wan], {"sketch": 48})
    with pytest.raises(ValueError, match="tokens over the 2 ranks, but the sketch has 45 tokens"):
        par.check_sketch_context(ctx("ulysses"), [wan], {"sketch": 45})
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="needs an accelerator per rank"):
        par.check_sketch_context(ctx("ulysses"), [wan], {"sketch": 48})
    monkeypatch.setattr(wan, "_parallel_config", object())  # the caller enabled diffusers' parallelism already
    with pytest.raises(ValueError, match="WanTransformer3DModel already has diffusers parallelism enabled"):
        par.check_sketch_context(ctx("ulysses"), [wan], {"sketch": 48})


def test_cli_sketch_context_fails_every_rank_before_model_work_without_accelerators(tmp_path):
    """`--parallel-sketch-context ulysses` reaches the ranks' ParallelConfig: with whole guidance pairs
    (`--parallel-whole-tiles`) each sketch forward would be split over both ranks, which needs an
    accelerator per rank: on this machine (none) both ranks exit 2 with the reason, and nothing is written."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port())]
    argv = ["-m", "supergen.cli", "generate", "--model", "tiny-random", "--steps", "3", "--quiet",
            "--parallel-sketch-context", "ulysses", "--parallel-whole-tiles",
            "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    done = subprocess.run([sys.executable, *torchrun, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("sketch_context='ulysses' needs an accelerator per rank") == 2, done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def _predicted_bytes(case: dict, world: int, rank: int, cache=None, state_tensors=None) -> list[int]:
    """Bytes per step the geometry code predicts; with ``cache`` (the single-process TileCache of the
    case) its decisions, its state migrating with the regions and its window-sum all-reduces;
    ``state_tensors[i]``: the latent-shaped tensors migrating after step ``i`` (default: the latents);
    guided cases split guidance branches across ranks (:func:`par.assign_branches`)."""
    grid = TileGrid(tuple(case["canvas"]), TilingConfig(**case["tiling"]), native_tile=tuple(case["tile"]))
    T, steps = case["canvas"][0], case["refine_steps"]
    cell_bytes = 1 * 4 * T * 4  # B * C * T * fp32
    extra = {}
    if cache is not None:
        extra["cache_cell_bytes"] = par.tile_cache_cell_bytes(cache, torch.zeros(1, 4, T, 1))
    regions, out = case["regions"], []
    layout = par.Layout.first(grid, world, steps, regions)
    for i in range(steps):
        nxt = par.Layout.at_step(grid, i + 1, world, previous=layout, regions=regions) if i + 1 < steps else None
        compute = None
        if cache is not None:
            compute = torch.tensor(cache.stats.per_step[i])
            extra["cache_reductions"] = 1 + cache.decides(i, steps)  # the decision, the gain
        if state_tensors is not None:
            extra["state_tensors"] = state_tensors[i]
        computer = par.computers(layout, compute, True)
        helper = par.branch_helpers(layout, computer) if case.get("guided") else None
        sent = par.exchange_bytes(layout, computer, cell_bytes, nxt, helper=helper, **extra)
        out.append(int(sum(v[rank] for v in sent.values())))
        layout = nxt
    return out


def _tiny_single_process(case: dict) -> tuple[torch.Tensor, dict]:
    from parallel_worker import tiny_case, tiny_ltx_case

    latents, report = (tiny_ltx_case if case["model"] == "tiny_ltx" else tiny_case)(case, None)
    assert report["parallel"] is None
    return latents, report


@pytest.mark.parametrize("case", [CASES[0], CACHE_CASES[0]], ids=lambda c: c["name"])
def test_world_size_one_needs_no_process_group(monkeypatch, single_process, case):
    import torch.distributed as dist

    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = par.setup(ParallelConfig())
    assert not ctx.distributed and not dist.is_initialized()
    got, cache = fake_run(case, ctx)
    assert torch.equal(got, single_process[case["name"]][0])
    if cache is not None:
        assert cache.stats.as_dict() == single_process[case["name"]][1].stats.as_dict()


def test_a_failing_rank_makes_every_rank_exit_nonzero(tmp_path):
    """Rank 1 raises inside the loop at step 2; rank 0 (blocked in a transfer) must fail too, well within
    the configured timeout plus start-up, instead of hanging."""
    case = dict(CASES[0], name="fails", fail_rank=1, fail_at_step=2)
    results = _wait(_launch(2, [case], tmp_path, timeout=20.0), limit=20.0 + 90)
    codes = [code for code, _ in results]
    assert all(code != 0 for code in codes), codes
    assert "fails on purpose" in results[1][1]


def test_ranks_waiting_for_a_sketch_longer_than_the_timeout_follow_its_forwards(tmp_path):
    """A real sketch is minutes of forwards on rank 0, longer than the transfer timeout: the waiting ranks
    follow its heartbeat (one all-reduce per forward) instead of waiting the whole sketch in one transfer.
    Rank 0's forwards of 1.2 s each, 6 s in all, with a 3-second timeout: every rank gets through; one
    forward of 6 s (no heartbeat within the timeout) makes the waiting ranks fail."""
    timeout = 3.0
    steady = {"name": "steady", "kind": "long_sketch", "calls": 5, "seconds": 1.2}
    results = _wait(_launch(3, [steady], tmp_path / "steady", timeout=timeout), limit=timeout + 90)
    for rank, (code, text) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{text[-3000:]}"
    waited = json.loads((tmp_path / "steady" / "steady.rank2.json").read_text())["waited"]
    assert waited > 2 * timeout  # it really waited longer than one transfer may
    stalled = {"name": "stalled", "kind": "long_sketch", "calls": 1, "seconds": 2 * timeout}
    results = _wait(_launch(3, [stalled], tmp_path / "stalled", timeout=timeout), limit=timeout + 90)
    assert all(code != 0 for code, _ in results[1:]), [code for code, _ in results]


# --------------------------------------------------------------------------------------------------
# Geometry and assignment (in process)
# --------------------------------------------------------------------------------------------------


def _layout(canvas, tile, tiling, world, step=0, previous=None):
    grid = TileGrid(canvas, TilingConfig(**tiling), native_tile=tile)
    return grid, par.Layout.at_step(grid, step, world, previous)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    "canvas, tiling", [((1, 24, 24), {"shift": True}), ((1, 22, 26), {"overlap": 2, "shift": False}),
                       ((1, 22, 26), {"boundary": "clamp", "overlap": 2})],
)  # fmt: skip
def test_regions_partition_the_canvas_balanced_by_tiles(canvas, tiling, world):
    grid, layout = _layout(canvas, (8, 8), tiling, world, step=1)
    H, W = canvas[1:]
    # every cell has exactly one owner, and it is the owner of one of the tiles covering it
    assert layout.owner.shape == (H * W,) and int(layout.owner.min()) >= 0 and int(layout.owner.max()) < world
    covering = [set() for _ in range(H * W)]
    for n in range(layout.num_tiles):
        for c in layout.windows[n].tolist():
            covering[c].add(int(layout.home_rank[n]))
    assert all(int(layout.owner[c]) in covering[c] for c in range(H * W))
    # home tiles: contiguous runs, sizes differ by at most one
    counts = torch.bincount(layout.home_rank, minlength=world)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == layout.num_tiles
    assert sum(layout.cells(r).numel() for r in range(world)) == H * W


def test_aligned_torus_regions_move_one_shift_strip_per_boundary():
    """3x3 tiles of 8 on a 24x24 torus, shift 1 cell per step per axis, 3 ranks = one tile row each: no
    halo ever, and each step every rank hands exactly one 1-row strip (24 cells) to its neighbour."""
    grid, layout = _layout((1, 24, 24), (8, 8), {"shift": True}, 3)
    for step in range(1, grid.period + 2):
        computer = layout.home_rank
        assert sum(par.exchange_bytes(layout, computer, 1).values()).tolist() == [0, 0, 0]
        new = par.Layout.at_step(grid, step, 3, previous=layout)
        moved = layout.owner != new.owner
        assert torch.bincount(layout.owner[moved], minlength=3).tolist() == [24, 24, 24], step
        layout = new


def test_fixed_regions_keep_their_cells_and_give_each_tile_to_its_majority_owner():
    """Fixed regions: the first step's owners stay for the whole run (the same tensor, so the loop moves
    no state); each shifted tile's home is the rank owning most of its window (ties: lower rank)."""
    grid, _ = _layout((1, 24, 24), (8, 8), {"shift": True}, 3)
    first = par.Layout.fixed(grid, 3, grid.period)
    assert sorted(set(first.owner.tolist())) == [0, 1, 2]
    layout = first
    for step in range(1, grid.period + 1):
        layout = par.Layout.at_step(grid, step, 3, previous=layout, regions="fixed")
        assert layout.owner is first.owner
        owned = torch.stack([torch.bincount(first.owner[w], minlength=3) for w in layout.windows])
        best = owned.max(dim=1, keepdim=True).values
        assert layout.home_rank.tolist() == [row.index(b) for row, b in zip(owned.tolist(), best.flatten().tolist())]
        # a tile shifted off its region reads its neighbour's cells: a halo, both ways
        if step % grid.period:
            assert int(sum(par.exchange_bytes(layout, layout.home_rank, 1).values()).sum()) > 0
    with pytest.raises(ValueError, match="`regions` must be 'fixed' or 'follow' but is 'moving'"):
        par.Layout.at_step(grid, 1, 3, previous=first, regions="moving")


def _busiest_rank_cells(grid, world, owner, steps):
    total = 0
    for i in range(steps):
        layout = par.Layout.with_owner(grid.at_step(i), grid.tile, grid.canvas[1:], grid.wrap, world, owner)
        total += int(sum(par.exchange_bytes(layout, par.computers(layout, None, True), 1).values()).max())
    return total


def test_fixed_regions_are_the_candidate_partition_that_sends_least():
    """Wan 480p tiles on 2K and 4K canvases, 2 ranks: the fixed regions chosen send (busiest rank, over the
    run) no more than column bands, row bands or the runs of home tiles the grid-following regions start
    from, all of them candidates; on 2K strictly less than those runs."""
    tiling = TilingConfig()
    for H, W in ((180, 320), (270, 480)):
        grid = TileGrid((1, H, W), tiling, multiple=(2, 2), native_tile=(60, 104))
        chosen = _busiest_rank_cells(grid, 2, par.fixed_owner(grid, 2, 35), 35)
        columns = _busiest_rank_cells(grid, 2, torch.arange(W).repeat(H) * 2 // W, 35)
        rows = _busiest_rank_cells(grid, 2, torch.arange(H).repeat_interleave(W) * 2 // H, 35)
        runs = _busiest_rank_cells(grid, 2, par.Layout.at_step(grid, 0, 2).owner, 35)
        assert chosen <= min(columns, rows, runs), (H, W, chosen, columns, rows, runs)
        assert chosen < runs or H == 270, (chosen, runs)


class _Stepper:
    """The adapter protocol's default scheduler step (what the Wan and HunyuanVideo adapters use)."""

    def scheduler_step(self, scheduler, noise_pred, t, latents, *, step_index, state, generator=None):
        return scheduler.step(noise_pred, t, latents, return_dict=False)[0]


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' set_timesteps, NumPy 2
def test_unipc_latents_are_rebuilt_from_its_history_and_only_where_they_are():
    """UniPC's step returns its predictor applied to the history it keeps, so a rank receiving cells
    rebuilds their latents from their history (bit for bit, on any subset of cells); the one-cell probe
    says so for UniPC (data or epsilon prediction) and not where a step does anything else."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    like = torch.zeros(1, 4, 3, 1, 7)
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc, eps = UniPCMultistepScheduler(**flow), UniPCMultistepScheduler()
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (unipc, eps, euler):
        scheduler.set_timesteps(10)
    assert par.probe_scheduler(_Stepper(), unipc, like, 4).rebuilds_latents
    assert par.probe_scheduler(_Stepper(), eps, like, 0).rebuilds_latents
    assert not par.probe_scheduler(_Stepper(), euler, like, 4).rebuilds_latents  # no history to rebuild from

    class Clipping(_Stepper):  # a family whose step does more than the scheduler's update
        def scheduler_step(self, scheduler, noise_pred, t, latents, **kwargs):
            return super().scheduler_step(scheduler, noise_pred, t, latents, **kwargs).clamp(-1, 1)

    assert not par.probe_scheduler(Clipping(), unipc, like, 4).rebuilds_latents
    assert unipc.model_outputs[-1] is None  # the probes leave the real scheduler untouched

    # a region of 7 cells stepped three times; cells 1, 4, 5 rebuilt from their history alone
    g = torch.Generator().manual_seed(0)
    x = torch.randn(like.shape, generator=g)
    unipc.set_begin_index(4)
    for t in unipc.timesteps[4:7]:
        x = unipc.step(torch.randn(like.shape, generator=g), t, x, return_dict=False)[0]
    refs = _region_refs([unipc], x)
    assert len(refs) == 3  # last sample + 2 model outputs
    cells = torch.tensor([1, 4, 5])
    rebuilt = _rebuild_latents(unipc)(refs, [c[k][..., cells] for c, k in refs])
    assert torch.equal(rebuilt, x[..., cells])
    assert unipc.last_sample.shape[-1] == 7  # the scheduler holds its own region again


def test_auto_regions_follow_without_history_and_stay_fixed_with_it():
    """The scheduler's region-shaped state is measured on a one-cell copy (UniPC: 2 model outputs and the
    last sample; Euler: none), and auto picks the policy the counted bytes favour: on Wan's 2K canvas
    with a bf16 model, following regions for Euler (only the latents move), fixed ones for UniPC."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    like = torch.zeros(1, 16, 21, 1, 7)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    euler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for scheduler in (unipc, euler):
        scheduler.set_timesteps(10)
    cell = 16 * 21
    rng = torch.get_rng_state()
    assert par.probe_scheduler(_Stepper(), unipc, like, 4).state_bytes == 3 * cell * 4
    assert par.probe_scheduler(_Stepper(), euler, like, 4).state_bytes == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws no global randomness
    assert len(unipc.timesteps) == 10 and unipc.model_outputs[-1] is None  # the real scheduler is untouched
    grid = TileGrid((1, 180, 320), TilingConfig(), multiple=(2, 2), native_tile=(60, 104))
    bf16 = (cell * 4, cell * 2, cell * 2)  # latents fp32; halos and predictions bf16
    config = ParallelConfig()
    assert config.regions == "auto"
    assert par.choose_regions(config, grid, 2, 35, bf16[0], 0, *bf16[1:]) == ("follow", None)
    regions, owner = par.choose_regions(config, grid, 2, 35, bf16[0], 3 * cell * 4, *bf16[1:])
    assert regions == "fixed" and torch.equal(owner, par.fixed_owner(grid, 2, 35))  # chosen once, handed on
    assert par.choose_regions(ParallelConfig(regions="follow"), grid, 2, 35, bf16[0], 10**9, *bf16[1:]) == (
        "follow",
        None,
    )


@pytest.mark.parametrize("world", [2, 4])
def test_following_regions_move_only_the_drift_when_an_axis_shift_wraps_round(world):
    """2x2 torus tiles drifting 2 rows and 4 columns a step: the column shift wraps round every 4 steps,
    which reorders the same windows row-major; the regions must still move by the drift only (every
    step the same strips), not hand whole tiles over because the tile order changed."""
    grid = TileGrid((1, 16, 32), TilingConfig(shift_period=4), native_tile=(8, 16))
    assert (grid.rows.step, grid.cols.step, grid.cols.period) == (2, 4, 4)
    layout, moved = par.Layout.first(grid, world, 10, "follow"), []
    for i in range(1, 10):
        nxt = par.Layout.at_step(grid, i, world, previous=layout, regions="follow")
        moved.append(torch.bincount(layout.owner[layout.owner != nxt.owner], minlength=world).tolist())
        assert torch.bincount(nxt.home_rank, minlength=world).tolist() == [4 // world] * world  # balanced
        layout = nxt
    strips = {2: 2 * 32, 4: 2 * 16 + 4 * 8 - 2 * 4}[world]  # rows (x width), + columns (x height) - corner
    assert moved == [[strips] * world] * 9


def test_a_grid_drifting_one_sweep_lets_regions_follow_with_multistep_history():
    """720p tiles on 2K (2x2), 45 refined steps, a bf16 model with UniPC (3 fp32 history tensors beside
    the fp32 latents): on the default grid (6 and 10 cells per step) following regions would move more
    than fixed ones send, so auto keeps them fixed; with ``shift_period`` = the refined steps the grid
    drifts 2 and 4 cells per step, auto follows, and the run sends under half the bytes."""
    cell = 16 * 11
    sizes = (cell * 4, 3 * cell * 4, cell * 2, cell * 2)  # latents, history, halos, predictions
    config, steps, sent = ParallelConfig(), 45, {}
    for name, tiling in (("default", TilingConfig()), ("sweep", TilingConfig(shift_period=steps))):
        grid = TileGrid((1, 180, 320), tiling, multiple=(2, 2), native_tile=(90, 160))
        regions, owner = par.choose_regions(config, grid, 2, steps, *sizes)
        sent[name] = par.count_regions(grid, 2, steps, regions, *sizes, owner=owner)
        assert regions == ("fixed" if name == "default" else "follow"), (name, regions)
        if name == "sweep":
            assert (grid.rows.step, grid.cols.step) == (2, 4) and max(grid.rows.period, grid.cols.period) <= steps
    assert sent["sweep"] < 0.5 * sent["default"], sent


def test_auto_regions_count_the_tile_caches_skips():
    """With the tile cache, rebalancing moves computed tiles between ranks, which following regions pay
    in whole tiles: auto counts seeded random skip patterns at the cache's budget (the real ones are
    learnt only as the run goes). 720p tiles on 2K at 2 ranks, UniPC in fp32 (its latents rebuilt from
    its history): following wins with every tile computed, fixed regions with half of them skipped."""
    from supergen.cache import CacheConfig, TileCache

    cell = 16 * 11
    cache = TileCache(CacheConfig(mode="budget", budget=0.5))
    cache_cell = par.tile_cache_cell_bytes(cache, torch.zeros(1, 16, 11, 1))
    grid = TileGrid((1, 180, 320), TilingConfig(), multiple=(2, 2), native_tile=(90, 160))
    sizes = (cell * 4, 3 * cell * 4 + cache_cell, cell * 4, cell * 4)
    config = ParallelConfig()
    assert par.choose_regions(config, grid, 2, 45, *sizes, latents_migrate=False)[0] == "follow"
    assert par.choose_regions(config, grid, 2, 45, *sizes, latents_migrate=False, cache=cache)[0] == "fixed"

    layout = par.Layout.first(grid, 2, 45, "follow")
    assert par.random_skips(layout, 0, 45, cache, draw=0) is None  # warm-up: every tile computed
    assert par.random_skips(layout, 44, 45, cache, draw=0) is None  # the last step too
    picks = [par.random_skips(layout, i, 45, cache, draw=0, fill_idle=False) for i in range(3, 44)]
    assert all(int(p.sum()) == 2 for p in picks) and len({tuple(p.tolist()) for p in picks}) > 1
    assert all(torch.equal(p, par.random_skips(layout, i + 3, 45, cache, draw=0, fill_idle=False))
               for i, p in enumerate(picks))  # deterministic: every rank counts the same  # fmt: skip


def test_halo_dtype_is_the_models_only_where_predict_casts_first():
    from supergen.adapters.base import cast_first_dtype

    class Model:
        def __init__(self, dtype):
            self.dtype = dtype

    assert cast_first_dtype(Model(torch.bfloat16), torch.float32) == torch.bfloat16
    assert cast_first_dtype(Model(torch.float32), torch.float32) == torch.float32
    assert cast_first_dtype(Model(torch.bfloat16), torch.float16) == torch.float16  # not narrower: keep
    assert cast_first_dtype(Model(torch.float64), torch.float32) == torch.float32

    class Plain:  # an adapter without tile_input_dtype (the test fakes): halos in the latents' dtype
        pass

    assert _halo_dtype(Plain(), torch.zeros(1)) == torch.float32


def test_halo_cells_are_exactly_the_foreign_window_cells():
    grid, layout = _layout((1, 20, 28), (8, 8), {"overlap": 2, "shift": False}, 2)
    computer = layout.home_rank
    need = layout.needs(computer)
    for r in range(2):
        q = 1 - r
        halo = set(layout.input_cells(computer, q, r, need).tolist())
        expected = {c for n in range(layout.num_tiles) if int(computer[n]) == r for c in layout.windows[n].tolist()
                    if int(layout.owner[c]) == q}  # fmt: skip
        assert halo == expected and halo  # overlapping windows cross the boundary: a non-empty halo
    # a split tile's second branch goes back whole, in its own dtype (the model's: bf16 under fp32 predictions)
    helper = torch.full_like(computer, -1)
    helper[0] = 1 - int(computer[0])
    sent = par.exchange_bytes(layout, computer, 4, helper=helper, prediction_cell_bytes=4, branch_cell_bytes=2)
    assert int(sent["branches"].sum()) == 2 * 64 and int(sent["branches"][1 - int(computer[0])]) == 2 * 64
    assert int(par.exchange_bytes(layout, computer, 4, helper=helper)["branches"].sum()) == 4 * 64  # default


def test_lpt_assigns_every_tile_once_balanced_and_prefers_own_tiles():
    home = torch.tensor([0] * 7 + [1] * 3)
    moves = [[0 if r == int(home[n]) else 10 for r in range(2)] for n in range(10)]
    computer = par.assign_tiles([1.0] * 10, home, moves, 2)
    assert torch.bincount(computer, minlength=2).tolist() == [5, 5]
    assert all(int(computer[n]) == 1 for n in range(7, 10))  # rank 1 keeps all its own tiles
    assert sum(int(computer[n]) == 0 for n in range(7)) == 5  # rank 0 keeps five of its seven


def test_lpt_skipped_tiles_cost_nothing_and_ties_move_fewest_bytes():
    home = torch.tensor([0, 0, 0, 0, 1, 1])
    costs = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]  # the cache skips tiles 1, 4, 5
    moves = [[0, 8], [0, 8], [0, 2], [0, 8], [8, 0], [8, 0]]  # tile 2 is cheap to move to rank 1
    computer = par.assign_tiles(costs, home, moves, 2)
    assert computer.tolist() == [0, -1, 1, 0, -1, -1]
    # a rank over its share keeps the tiles dearest to move and gives away the cheap one, whatever its index
    assert par.assign_tiles([1.0, 1.0], torch.tensor([0, 0]), [[0, 2], [0, 8]], 2).tolist() == [1, 0]
    assert par.assign_tiles([1.0, 1.0], torch.tensor([0, 0]), [[0, 8], [0, 2]], 2).tolist() == [0, 1]
    with_ties = par.assign_tiles([1.0] * 3, torch.tensor([0, 0, 0]), [[0, 9, 3]] * 3, 3)
    assert sorted(with_ties.tolist()) == [0, 1, 2]
    assert par.assign_tiles([1.0] * 4, torch.tensor([0, 0, 0, 0]), [[0, 9, 3]] * 4, 3).tolist().count(2) == 1


def _moved(computer, home) -> int:
    return int(((computer >= 0) & (computer != home)).sum())


def test_fill_idle_slots_fills_own_tiles_first_and_never_lengthens_a_step():
    home = torch.tensor([0] * 4 + [1] * 4 + [2] * 4)
    moves = [[0 if r == int(home[n]) else 10 for r in range(3)] for n in range(12)]
    compute = torch.zeros(12, dtype=torch.bool)
    compute[[0, 1, 2, 4]] = True  # home loads 3, 1, 0: LPT gives 2, 1, 1 (one tile moves)
    priority = torch.arange(12, dtype=torch.float64)  # later tiles are predicted to change more
    filled = par.fill_idle_slots(compute, priority, home, 3)
    assert filled.nonzero().flatten().tolist() == [0, 1, 2, 4, 10, 11]  # rank 2 has two free slots
    before, after = (par.assign_tiles(c.float().tolist(), home, moves, 3) for c in (compute, filled))
    # wait: 4 tiles on 3 ranks take 2 forwards on the busiest; filled, every rank computes 2
    assert torch.bincount(after[after >= 0], minlength=3).tolist() == [2, 2, 2]
    assert _moved(after, home) == _moved(before, home) == 1
    # without rebalancing only a rank's own tiles, up to the largest home load
    own = par.fill_idle_slots(compute, priority, home, 3, rebalance=False)
    assert own.nonzero().flatten().tolist() == [0, 1, 2, 4, 6, 7, 9, 10, 11]
    # nothing to decide or one rank: unchanged
    assert torch.equal(par.fill_idle_slots(compute, None, home, 3), compute)
    assert torch.equal(par.fill_idle_slots(compute, priority, torch.zeros(12, dtype=torch.int64), 1), compute)


@pytest.mark.parametrize("seed", range(20))
def test_fill_idle_slots_balances_any_decision(seed):
    g = torch.Generator().manual_seed(seed)
    R = int(torch.randint(2, 6, (1,), generator=g))
    N = int(torch.randint(R, 30, (1,), generator=g))
    home = torch.sort(torch.randint(R, (N,), generator=g)).values
    compute = torch.rand(N, generator=g) < torch.rand(1, generator=g)
    priority = torch.rand(N, generator=g, dtype=torch.float64)
    moves = [[0 if r == int(home[n]) else 1 for r in range(R)] for n in range(N)]
    filled = par.fill_idle_slots(compute, priority, home, R)
    assert bool((filled | ~compute).all())  # a superset
    before, after = (par.assign_tiles(c.float().tolist(), home, moves, R) for c in (compute, filled))
    loads = torch.bincount(after[after >= 0], minlength=R)
    C = int(compute.sum())
    if C:
        assert int(loads.max()) == -(-C // R)  # the busiest rank does no more than before
        assert bool(filled.all()) or int(loads.min()) == int(loads.max())  # and nobody idles
        assert _moved(after, home) <= _moved(before, home) + max(0, int(filled.sum()) - C)
    else:
        assert not filled.any()


def test_idle_ranks_message_names_separate_guidance_where_guidance_is_batched():
    from helpers import ltx_text, tiny_ltx_pipeline

    from supergen.adapters.ltx_video import LTXVideoAdapter

    pipe = tiny_ltx_pipeline()
    batched, separate = LTXVideoAdapter(pipe), LTXVideoAdapter(pipe, separate_guidance=True)
    cond = batched.conditioning((1, 8, 3, 8, 48), **ltx_text(), guidance_scale=3.0)
    config = ParallelConfig()
    assert par.idle_ranks_message(config, 3, 3, False, batched, cond) is None
    message = par.idle_ranks_message(config, 4, 3, False, batched, cond)
    assert message.startswith("4 ranks share 3 tiles per step, so 1 of them have no tile to compute; at most 3")
    assert "LTXVideoAdapter batches guidance" in message and "separate_guidance=True" in message
    whole = par.idle_ranks_message(ParallelConfig(split_guidance=False), 4, 3, False, batched, cond)
    assert "separate_guidance" not in whole  # the user keeps tiles whole: nothing to suggest
    assert par.idle_ranks_message(config, 6, 3, True, separate, cond) is None  # 3 tiles, 2 forwards each
    message = par.idle_ranks_message(config, 8, 3, True, separate, cond)
    assert "3 tiles per step (two guidance branches each), so 2 of them" in message
    assert "separate_guidance" not in message


def test_guidance_branches_split_only_where_they_shorten_the_step():
    def split(computer, world, moves=None):
        computer = torch.tensor(computer)
        moves = moves or [[1] * world for _ in computer]
        helper = par.assign_branches(computer, moves, world)
        return helper.tolist(), par.forwards_per_rank(computer, helper, world, branches=2)

    # 4 tiles on 8 ranks: whole tiles take 2 forwards and idle half the ranks; split, 1 each
    helper, forwards = split([0, 1, 2, 3], 8)
    assert forwards == [1] * 8 and sorted(helper) == [4, 5, 6, 7]
    # 9 tiles on 8 ranks (5 on 2 ranks): one tile is split, the busiest runs 3 forwards instead of 4
    assert split([0, 0, 1, 2, 3, 4, 5, 6, 7], 8)[1] == [3, 3, 2, 2, 2, 2, 2, 2]
    assert split([0, 0, 0, 1, 1], 2) == ([1, -1, -1, -1, -1], [5, 5])  # its first tile, in tile order
    # nothing to gain: no split (6 tiles on 3 ranks, 2 on 3 ranks, skipped tiles, one rank)
    assert split([0, 0, 1, 1, 2, 2], 3)[0] == [-1] * 6
    assert split([0, 1], 3)[0] == [-1, -1]
    assert split([-1, 0, -1, 1], 4) == ([-1, 2, -1, 3], [1, 1, 1, 1])
    assert split([0, 0], 1)[0] == [-1, -1]
    # among equally idle ranks, the one whose choice moves the fewest cells
    assert split([0, 1], 4, moves=[[0, 9, 9, 2], [9, 0, 5, 9]])[0] == [3, 2]
    # and among a busy rank's tiles, those whose windows the helper already partly owns
    moves = [[0, 9], [0, 3], [0, 5], [9, 0]]
    assert split([0, 0, 0, 1], 2, moves=moves) == ([-1, 1, 1, -1], [4, 4])
    # an unbalanced assignment (not from assign_tiles) is split as far as it goes
    assert split([0, 0, 0, 0], 4)[1] == [4, 2, 1, 1]


def test_fill_idle_slots_counts_split_guidance_forwards():
    home = torch.tensor([0, 1, 2, 3, 0, 1])
    compute = torch.tensor([True, False, True, False, False, False])
    priority = torch.arange(6, dtype=torch.float64)
    # 2 tiles on 4 ranks: whole, the busiest runs 2 forwards while two ranks idle, so two more tiles fit
    # (their own, highest priority first); split, every rank runs 1 forward and none fits
    assert par.fill_idle_slots(compute, priority, home, 4).tolist() == [True, False, True, True, False, True]
    assert torch.equal(par.fill_idle_slots(compute, priority, home, 4, branches=2), compute)
    # 8 ranks: split, 4 tiles take one forward on every rank
    assert int(par.fill_idle_slots(compute, priority, home, 8, branches=2).sum()) == 4


def test_parallel_config_validation():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        ParallelConfig(backend="mpi")
    with pytest.raises(ValueError, match="`timeout` must be a number of seconds > 0"):
        ParallelConfig(timeout=0)
    with pytest.raises(ValueError, match="`fill_idle` must be a bool but is 'yes'"):
        ParallelConfig(fill_idle="yes")
    with pytest.raises(ValueError, match="`split_guidance` must be a bool but is 1"):
        ParallelConfig(split_guidance=1)
    with pytest.raises(ValueError, match=r"`regions` must be one of \('auto', 'fixed', 'follow'\) but is 'moving'"):
        ParallelConfig(regions="moving")
    with pytest.raises(ValueError, match=r"`sketch_context` must be one of \(None, 'ulysses', 'ring'\) but is 'tp'"):
        ParallelConfig(sketch_context="tp")
    with pytest.raises(TypeError, match="`parallel` must be a ParallelConfig"):
        par.setup({"backend": "gloo"})
