"""One rank of a tile-parallel test run (started by tests/test_parallel.py, one process per rank, with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set).

``python tests/parallel_worker.py SPEC.json OUT_DIR``: runs every case of the spec; rank 0 saves each
case's final latent to ``OUT_DIR/<case>.pt`` and every rank its exchange stats to
``OUT_DIR/<case>.rank<r>.json``. The refine loop runs with :class:`FakeAdapter`, a cheap deterministic
predictor whose output at a cell depends on the whole tile (so a missing or wrong halo cell shows),
or, for ``"model": "tiny"`` cases, SuperGen on the tiny Wan.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

torch.set_num_threads(1)
DEVICE_COUNT = torch.accelerator.device_count


class FakeAdapter:
    """Tile predictor for tests: a smooth function of each cell, its tile's mean and its canvas place."""

    def denoiser_index(self, timestep):  # one model for the whole schedule
        return 0

    def begin_step(self, step_index, timestep, sigma, num_steps):
        self.step = step_index

    def predict(self, tiles, timestep, cond, origins, canvas_hw):
        n = origins.shape[0]
        batch = tiles.shape[0] // n
        mean = tiles.mean(dim=(1, 2, 3, 4), keepdim=True)
        place = (origins[:, 0] * 0.013 + origins[:, 1] * 0.007).repeat_interleave(batch).view(-1, 1, 1, 1, 1)
        return torch.tanh(0.8 * tiles + 0.5 * mean + place + 1e-3 * float(timestep))

    def scheduler_step(self, scheduler, noise_pred, t, latents, *, step_index, state, generator=None):
        # a scheduler that draws noise (DDPM) draws it from the run's generator
        kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        return scheduler.step(noise_pred, t, latents, **kwargs, return_dict=False)[0]


class GuidedFakeAdapter(FakeAdapter):
    """:class:`FakeAdapter` with classifier-free guidance run as two forwards per tile, as the Wan
    adapter runs it, so tile parallelism may split them across ranks."""

    scale = 3.0

    def guidance_branches(self, cond):
        return ("cond", "uncond")

    def predict_branch(self, tiles, timestep, cond, origins, canvas_hw, branch):
        return super().predict(tiles * (1.2 if branch == "cond" else 0.7), timestep, cond, origins, canvas_hw)

    def guide(self, outputs, cond, timestep=None):
        return outputs["uncond"] + self.scale * (outputs["cond"] - outputs["uncond"])

    def predict(self, tiles, timestep, cond, origins, canvas_hw):
        args = (tiles, timestep, cond, origins, canvas_hw)
        return self.guide({b: self.predict_branch(*args, b) for b in self.guidance_branches(cond)}, cond)


def make_scheduler(name: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if name == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    if name == "ddpm":  # draws noise inside step (as CogVideoX's DPM does), from the generator it is given
        from diffusers import DDPMScheduler

        return DDPMScheduler(prediction_type="v_prediction")
    raise ValueError(name)


def fake_case(case: dict, parallel=None):
    """The final latent of the fake refine loop for ``case`` (whole canvas; ``None`` on ranks > 0)."""
    return fake_run(case, parallel)[0]


def replayed_plan(config, hit_map):
    """A tile cache that computes exactly the tiles of a recorded hit map (``1`` = reused), instead of
    deciding: a single process replays what the ranks computed."""
    from supergen.cache import TileCache

    class ReplayedPlan(TileCache):
        def plan_cells(self, step, num_steps, windows, with_priority=False):
            compute = torch.tensor([not h for h in hit_map[step]])
            return (compute, None) if with_priority else compute

    return ReplayedPlan(config)


def fake_run(case: dict, parallel=None):
    """``(final latent, cache)`` of the fake refine loop; ``case["cache"]``: CacheConfig fields of a tile
    cache (gate/budget), ``case["rehash"]``: a Step Rehash schedule, ``case["hit_map"]``: replay these
    tile decisions instead of taking them (:func:`replayed_plan`)."""
    from supergen.cache import CacheConfig, StepRehash, TileCache
    from supergen.config import TilingConfig
    from supergen.stages import refine
    from supergen.tiling import TileGrid

    T, H, W = case["canvas"]
    tiling = TilingConfig(**case["tiling"])
    grid = TileGrid((T, H, W), tiling, native_tile=tuple(case["tile"]))
    steps, k = case["steps"], case["refine_steps"]
    plan = SimpleNamespace(begin_index=steps - k, num_inference_steps=steps)
    scheduler = make_scheduler(case["scheduler"])
    scheduler.set_timesteps(steps)
    latents = torch.randn(1, 4, T, H, W, generator=torch.Generator().manual_seed(case.get("seed", 0)))
    cache = StepRehash(case["rehash"]) if case.get("rehash") else None
    if case.get("cache"):
        config = CacheConfig(**case["cache"])
        cache = replayed_plan(config, case["hit_map"]) if "hit_map" in case else TileCache(config)
    adapter = GuidedFakeAdapter() if case.get("guided") else FakeAdapter()
    generator = torch.Generator().manual_seed(11) if case["scheduler"] == "ddpm" else None
    out = refine(adapter, scheduler, latents, None, grid, plan, generator=generator, cache=cache, parallel=parallel)
    return out, cache


def tiny_case(case: dict, parallel_config):
    from supergen import SuperGen, TilingConfig
    from supergen.cache import CacheConfig
    from supergen.config import ReshiftConfig
    from supergen.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline(boundary_ratio=case.get("boundary_ratio"))  # with a ratio: Wan 2.2's two experts
    pipe.set_progress_bar_config(disable=True)
    if case.get("supergen_attention"):  # the model's attention on supergen's kernel (the diffusers backend)
        from supergen.attention import enable_masked_attention

        enable_masked_attention(pipe.transformer)
    if case.get("dtype"):  # a half-precision model with fp32 latents, as Wan runs in bf16
        pipe.transformer.to(getattr(torch, case["dtype"]))
    if case.get("vae_tile"):  # (tile, stride) latent cells: small VAE tiles, so the decode spans several
        scale = pipe.vae_scale_factor_spatial
        pipe.vae.tile_sample_min_height = pipe.vae.tile_sample_min_width = case["vae_tile"][0] * scale
        pipe.vae.tile_sample_stride_height = pipe.vae.tile_sample_stride_width = case["vae_tile"][1] * scale
    cache = CacheConfig(**case["cache"]) if case.get("cache") else None
    reshift = ReshiftConfig(**case["reshift"]) if case.get("reshift") else None
    sg = SuperGen(pipe, tiling=TilingConfig(**case["tiling"]), positions="canvas", parallel=parallel_config,
                  cache=cache, reshift=reshift)  # fmt: skip
    runs, run_sketch = [], sg.adapter.sketch  # stage 1: rank 0 runs it under parallelism (and rank 1 if split)
    sg.adapter.sketch = lambda *a, **k: runs.append(1) or run_sketch(*a, **k)
    # the token counts the first block's self-attention sees (a sequence split over ranks shows as a share)
    tokens = set()
    pipe.transformer.blocks[0].attn1.register_forward_pre_hook(
        lambda module, args, kwargs: tokens.add((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    if case.get("drift_rank") == int(os.environ.get("RANK", "0")):  # this rank's upscale is not reproducible
        encode = sg.adapter.encode
        sg.adapter.encode = lambda *a, **k: encode(*a, **k) + 1e-3
    out = sg(
        prompt=case.get("prompt", "a lighthouse at dusk"),
        negative_prompt="low quality",
        guidance_scale=4.0,
        height=case["height"],
        width=case["width"],
        num_frames=9,
        num_inference_steps=case["steps"],
        refine_steps=case["refine_steps"],
        generator=torch.Generator().manual_seed(case.get("seed", 0)),
        output_type=case.get("output_type", "latent"),
    )
    left = _context_parallel_left(pipe.transformer)
    report = dict(out.report, sketch_runs=len(runs), frames=out.frames, context_parallel_left=left)
    return out.latents, dict(report, attention_tokens=sorted(tokens))


def _context_parallel_left(transformer) -> int:
    """diffusers' context-parallel hooks and processor configs left on ``transformer`` (by stage 1's)."""
    from supergen.cache import hook_names

    left = 0
    for m in transformer.modules():
        left += sum(name.startswith("cp_") for name in hook_names(m))
        left += getattr(getattr(m, "processor", None), "_parallel_config", None) is not None
    return left


def tiny_ltx_case(case: dict, parallel_config):
    """The tiny LTX-Video through SuperGen (guidance batched in one forward, or ``separate_guidance``)."""
    from helpers import ltx_text, tiny_ltx_pipeline

    from supergen import SuperGen, TilingConfig

    pipe = tiny_ltx_pipeline()
    pipe.set_progress_bar_config(disable=True)
    text = ltx_text()
    if case.get("dtype"):  # the stock pipeline feeds its transformer in the prompt embeddings' dtype
        dtype = getattr(torch, case["dtype"])
        pipe.transformer.to(dtype)
        text = {k: v.to(dtype) if k.endswith("embeds") else v for k, v in text.items()}
    options = {"separate_guidance": True} if case.get("separate_guidance") else {}
    sg = SuperGen(pipe, tiling=TilingConfig(tile=(8, 16)), positions="canvas", parallel=parallel_config,
                  adapter_options=options)  # fmt: skip
    rescale = case.get("guidance_rescale", 0.5)
    out = sg(**text, guidance_scale=3.0, guidance_rescale=rescale, height=case["height"], width=case["width"],
             sketch_height=32, sketch_width=64, num_frames=9, num_inference_steps=case["steps"],
             refine_steps=case["refine_steps"], generator=torch.Generator().manual_seed(0),
             output_type="latent")  # fmt: skip
    left = _context_parallel_left(pipe.transformer)
    return out.latents, dict(out.report, sketch_runs=None, frames=None, context_parallel_left=left)


def sketch_split_case(ctx) -> dict:
    """:class:`SketchGuidanceSplit` around a cheap two-call-per-step "pipeline" on ranks 0 and 1."""
    from supergen.parallel import SketchGuidanceSplit

    class Denoiser(torch.nn.Module):
        def forward(self, hidden_states, timestep, branch, return_dict=False):
            out = hidden_states.sin() * (1.0 + branch) + timestep  # per branch, not symmetric
            return (out,) if not return_dict else {"sample": out}

    def step_outputs(module, x, t, return_dict=False):
        get = (lambda o: o[0]) if not return_dict else (lambda o: o["sample"])
        return get(module(x, t, 1.0, return_dict)), get(module(hidden_states=x, timestep=t, branch=2.0,
                                                                return_dict=return_dict))  # fmt: skip

    result, model = {}, Denoiser()
    # pairs: two input sizes (the first pair of each runs whole), tuple and dict outputs
    with SketchGuidanceSplit(ctx, [model]) as split:
        ok = True
        for shape, as_dict in (((2, 3), False), ((5,), True)):
            x = torch.linspace(-1, 1, math.prod(shape)).reshape(shape)
            for step in range(3):
                t = torch.tensor(float(step))
                cond, uncond = step_outputs(model, x, t, as_dict)
                ok &= torch.equal(cond, x.sin() * 2.0 + t) and torch.equal(uncond, x.sin() * 3.0 + t)
                x = uncond + 0.5 * (cond - uncond)  # the pipeline's combine, then its "step"
        result["pairs"] = {"ok": bool(ok), "forwards": split.forwards, "sent": split.sent}
    assert "forward" not in model.__dict__  # the module's own forward again
    # calls that are not pairs (the second has another input): never split, every call computed here
    with SketchGuidanceSplit(ctx, [model]) as split:
        x = torch.ones(4)
        for step in range(3):
            outs = [model(x + i + step, torch.tensor(0.0), 1.0)[0] for i in range(2)]
            ok = all(torch.equal(o, (x + i + step).sin() * 2.0) for i, o in enumerate(outs))
        result["unpaired"] = {"ok": bool(ok), "enabled": split.enabled, "forwards": split.forwards}
    # a pair that stops matching after the split began: every rank raises, none hangs
    try:
        with SketchGuidanceSplit(ctx, [model]):
            x = torch.ones(4)
            for step in range(3):
                model(x, torch.tensor(float(step)), 1.0)
                model(x, torch.tensor(float(step) if step < 2 else 9.0), 2.0)
    except RuntimeError as e:
        result["error"] = str(e)
    return result


def batch_split_case(ctx) -> dict:
    """:class:`SketchBatchSplit` around cheap batched "models" on ranks 0 and 1: one whose samples are
    independent (its halves are exact: split after the first call of each size), one whose samples
    interact (not exact: every call whole), and one carrying a diffusers hook (never split)."""
    from diffusers.hooks import HookRegistry, ModelHook

    from supergen.parallel import SketchBatchSplit

    class Batched(torch.nn.Module):
        def __init__(self, coupled: bool):
            super().__init__()
            self.coupled = coupled

        def forward(self, hidden_states, encoder_hidden_states, timestep, ofs=None, return_dict=False):
            out = hidden_states.sin() * encoder_hidden_states + timestep[:, None] + (0 if ofs is None else ofs)
            if self.coupled:  # the samples of a batch interact: a half is not a slice of the whole
                out = out - out.mean(dim=0, keepdim=True)
            return (out,) if not return_dict else {"sample": out}

    result = {}
    for name, coupled in (("independent", False), ("coupled", True)):
        model = Batched(coupled)
        with SketchBatchSplit(ctx, [model]) as split:
            ok = True
            for shape, as_dict in (((4, 3), False), ((2, 5), True)):  # two input sizes, each probed once
                x = torch.linspace(-1, 1, math.prod(shape)).reshape(shape)
                text = torch.arange(1.0, shape[0] + 1)[:, None]  # one "prompt" per sample
                ofs = torch.full((1,), 0.25)  # not batched: every half gets it whole
                for step in range(3):
                    t = torch.full((shape[0],), float(step))
                    out = model(hidden_states=x, encoder_hidden_states=text, timestep=t, ofs=ofs, return_dict=as_dict)
                    out = out["sample"] if as_dict else out[0]
                    ok &= torch.equal(out, Batched.forward(model, x, text, t, ofs)[0])  # the whole call's
                    x = out * 0.5
        result[name] = {"ok": bool(ok), "enabled": split.enabled, "forwards": split.forwards, "sent": split.sent}
    hooked = Batched(False)
    HookRegistry.check_if_exists_or_initialize(hooked).register_hook(ModelHook(), "first_block_cache")
    result["hooked_enabled"] = SketchBatchSplit(ctx, [hooked]).enabled
    return result


def long_sketch_case(ctx, case: dict) -> dict:
    """Rank 0 runs a "sketch" of ``calls`` model calls of ``seconds`` each under :class:`SketchHeartbeat`,
    longer in all than the process group's timeout; the other ranks wait for it, then all meet."""
    import time

    import torch.distributed as dist

    from supergen.parallel import SketchHeartbeat, sketch_waiters_group, wait_for_sketch

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(case["seconds"])
            return (x + 1,)

    model, started = Slow(), time.perf_counter()
    group = sketch_waiters_group(ctx, (0,))
    if ctx.rank == 0:
        with SketchHeartbeat(ctx, group, [model]):
            x = torch.zeros(1)
            for _ in range(case["calls"]):
                x = model(x)[0]
    else:
        wait_for_sketch(ctx, group)
    dist.barrier()
    return {"waited": time.perf_counter() - started}


def main(spec_path: str, out_dir: str) -> None:
    from supergen import parallel as par
    from supergen.config import ParallelConfig

    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    rank = int(os.environ.get("RANK", "0"))
    for case in spec["cases"]:
        # exact single-process decisions unless a case asks for idle ranks to fill their slots; the
        # default region policy unless a case names one
        regions = {"regions": case["regions"]} if "regions" in case else {}
        config = ParallelConfig(timeout=spec.get("timeout", 60.0), fill_idle=case.get("fill_idle", False),
                                split_guidance=case.get("split_guidance", True),
                                sketch_context=case.get("sketch_context"), **regions)  # fmt: skip
        # diffusers' context parallelism places rank r on accelerator r % count, and a CPU has none: one
        # stand-in "device" for its cases, so that its meshes form on gloo (``accelerators: 0``: the real none)
        torch.accelerator.device_count = DEVICE_COUNT
        if case.get("sketch_context") and case.get("accelerators", 1):
            torch.accelerator.device_count = lambda: 1
        if case.get("expect_error"):  # every rank must raise before any model work, naming what is wrong
            try:
                tiny_case(case, config)
            except ValueError as e:
                (out / f"{case['name']}.rank{rank}.error").write_text(str(e))
            continue
        if "prompt_by_rank" in case:  # the ranks disagree: every rank must raise, naming the difference
            try:
                tiny_case({**case, "prompt": case["prompt_by_rank"][rank]}, config)
            except ValueError as e:
                (out / f"{case['name']}.rank{rank}.error").write_text(str(e))
            continue
        if case.get("kind") == "long_sketch":
            result = long_sketch_case(par.setup(config), case)
            (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(result))
            continue
        if case.get("kind") in ("sketch_split", "batch_split"):
            if rank < 2:
                run = sketch_split_case if case["kind"] == "sketch_split" else batch_split_case
                result = run(par.setup(config))
                (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(result))
            continue
        if case.get("model") in ("tiny", "tiny_ltx"):
            latents, report = (tiny_ltx_case if case["model"] == "tiny_ltx" else tiny_case)(case, config)
            stats = dict(report.get("parallel") or {}, cache=report.get("cache"), sketch_runs=report["sketch_runs"],
                         context_parallel_left=report.get("context_parallel_left"),
                         attention_tokens=report.get("attention_tokens"))  # fmt: skip
            if case.get("output_type", "latent") != "latent" and report["frames"] is not None:
                torch.save(report["frames"], out / f"{case['name']}.frames.pt")
        else:
            ctx = par.setup(config)
            if case.get("fail_rank") == rank:
                _fail_mid_run(rank, case["fail_at_step"])
            latents, cache = fake_run(case, ctx)
            stats = {"exchange": ctx.stats.as_dict(), "computed_tiles": ctx.computed_tiles,
                     "forwards": ctx.forwards, "latents_rebuilt": ctx.latents_rebuilt}  # fmt: skip
            if cache is not None:
                stats["cache"] = cache.stats.as_dict()
        if latents is not None:
            torch.save(latents, out / f"{case['name']}.pt")
        (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(stats))


def _fail_mid_run(rank: int, step: int) -> None:
    """Make this rank raise inside the refine loop at refinement ``step`` (the others are in it too)."""
    original = FakeAdapter.begin_step

    def begin_step(self, step_index, timestep, sigma, num_steps):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls > step:
            raise RuntimeError(f"rank {rank} fails on purpose at refinement step {step}")
        original(self, step_index, timestep, sigma, num_steps)

    FakeAdapter.begin_step = begin_step


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
