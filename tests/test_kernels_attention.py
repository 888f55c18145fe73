"""The Triton masked-attention kernel against the reference and SDPA (interpreter on CPU, small shapes).

Every case fills ``out`` and ``lse`` with a sentinel first, so "inactive rows untouched" is checked
bit for bit, and poisons what the kernel must never read (q rows of inactive blocks, k/v rows of
invalid blocks) with NaN, so a stray read shows up in the output.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_verbose_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supergen.kernels import masked_attention as kernel_attention

import supergen.ops as ops
from supergen import reference
from supergen.reference import ATTN_MASK_BLOCK, expand_block_mask

ma = importlib.import_module("supergen.kernels.masked_attention")  # the module, not the launcher
SENTINEL = 12345.0  # exactly representable in fp16/bf16/fp32
#: CUDA when present (the compiled kernel), else the CPU (conftest sets TRITON_INTERPRET=1).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


#: (atol, rtol) for half types on the GPU, where the kernel rounds the softmax probabilities to the value
#: dtype before the PV product (FlashAttention's practice for tensor-core speed): one more rounding step
#: of the half type than the fp32 reference. Under the interpreter operands are upcast, helpers' table holds.
GPU_HALF_TOL = {torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def tol(dtype) -> dict:
    if DEVICE == "cuda" and dtype in GPU_HALF_TOL:
        return dict(zip(("atol", "rtol"), GPU_HALF_TOL[dtype]))
    return {}


@pytest.fixture(autouse=True)
def fixed_config(monkeypatch):
    """One config per launch: autotuning every test shape would dominate a GPU run (the benchmark tunes)."""
    monkeypatch.setenv("SUPERGEN_NO_AUTOTUNE", "1")


def blocks(length: int) -> int:
    return -(-length // ATTN_MASK_BLOCK)


def make_qkv(B, H, Lq, Lk, D, dtype, layout="bhld", seed=0):
    """q (B, H, Lq, D), k/v (B, H, Lk, D); ``blhd`` gives diffusers' transposed (B, L, H, D) views."""
    g = torch.Generator().manual_seed(seed)

    def rand(L):
        if layout == "blhd":
            return torch.randn((B, L, H, D), generator=g).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn((B, H, L, D), generator=g).to(DEVICE, dtype)

    return rand(Lq), rand(Lk), rand(Lk)


def make_mask(kind, B, H, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "on":
        return torch.ones((B, H, n), dtype=torch.bool, device=DEVICE)
    if kind == "off":
        return torch.zeros((B, H, n), dtype=torch.bool, device=DEVICE)
    if kind == "shared":  # one mask for every batch element and head: an expanded zero-stride view
        return (torch.rand((1, 1, n), generator=g) < 0.5).to(DEVICE).expand(B, H, n)
    return (torch.rand((B, H, n), generator=g) < 0.5).to(DEVICE)


def poison(q, k, v, q_mask, kv_mask):
    """NaN into q rows of inactive blocks and k/v rows of invalid ones: the kernel must not read them."""
    q, k, v = q.clone(), k.clone(), v.clone()
    q[~expand_block_mask(q_mask, q.shape[2])] = float("nan")
    kv_off = ~expand_block_mask(kv_mask, k.shape[2])
    k[kv_off] = float("nan")
    v[kv_off] = float("nan")
    return q, k, v


def run_both(q, k, v, q_mask, kv_mask, scale, config=None):
    """(kernel out, kernel lse, reference out, reference lse), all starting from the sentinel."""
    out = torch.full_like(q, SENTINEL)
    lse = torch.full(q.shape[:3], SENTINEL, device=q.device)
    ref_out, ref_lse = out.clone(), lse.clone()
    kernel_attention(q, k, v, q_mask, kv_mask, out, scale, lse, config=config)
    reference.masked_attention(q, k, v, q_mask, kv_mask, ref_out, scale, ref_lse)
    return out, lse, ref_out, ref_lse


def check_against_reference(q, k, v, q_mask, kv_mask, scale=None, config=None, what=""):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = poison(q, k, v, q_mask, kv_mask)
    out, lse, ref_out, ref_lse = run_both(q, k, v, q_mask, kv_mask, scale, config)
    rows = expand_block_mask(q_mask, q.shape[2])
    # Untouched rows: bit-identical sentinel.
    assert torch.equal(out[~rows], ref_out[~rows]), f"{what}: inactive rows of `out` changed"
    assert torch.equal(lse[~rows], ref_lse[~rows]), f"{what}: inactive rows of `lse` changed"
    assert_verbose_close(out, ref_out, what=f"{what} out", **tol(q.dtype))
    assert torch.equal(lse.isinf(), ref_lse.isinf()), f"{what}: -inf lse rows differ"
    finite = ~ref_lse.isinf()
    assert_verbose_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5, what=f"{what} lse")


# -- agreement with the reference --------------------------------------------------------------------

CASES = [
    # B, H, Lq, Lk, D, dtype, layout, q mask, kv mask, config
    (1, 2, 70, 130, 12, torch.float32, "blhd", "random", "random", None),
    (2, 1, 130, 70, 64, torch.float32, "bhld", "random", "on", None),
    (1, 2, 64, 200, 96, torch.float32, "blhd", "on", "random", None),
    (1, 2, 96, 96, 64, torch.float32, "bhld", "shared", "shared", None),
    (1, 1, 70, 70, 12, torch.float32, "bhld", "off", "random", None),
    (1, 2, 70, 100, 12, torch.float32, "bhld", "random", "off", None),
    (1, 2, 130, 130, 64, torch.float16, "blhd", "random", "random", None),
    (1, 2, 130, 70, 96, torch.bfloat16, "blhd", "random", "on", None),
    # The Hopper tiles: two 64-blocks per query tile and/or per key step.
    (1, 2, 300, 330, 24, torch.float32, "blhd", "random", "random", {"BLOCK_M": 128, "BLOCK_N": 128}),
    (1, 2, 300, 200, 24, torch.float32, "bhld", "random", "on", {"BLOCK_M": 128, "BLOCK_N": 128}),
    (1, 1, 200, 330, 64, torch.bfloat16, "bhld", "on", "random", {"BLOCK_M": 64, "BLOCK_N": 128}),
    (1, 2, 330, 130, 12, torch.float16, "blhd", "random", "random", {"BLOCK_M": 128, "BLOCK_N": 64}),
]


@pytest.mark.parametrize(
    "B, H, Lq, Lk, D, dtype, layout, qk, kk, config",
    CASES,
    ids=[f"{c[2]}x{c[3]}-d{c[4]}-{str(c[5])[6:]}-{c[6]}-q{c[7]}-kv{c[8]}-{bool(c[9])}" for c in CASES],
)
def test_kernel_matches_reference(B, H, Lq, Lk, D, dtype, layout, qk, kk, config):
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype, layout)
    q_mask = make_mask(qk, B, H, blocks(Lq), seed=2)
    kv_mask = make_mask(kk, B, H, blocks(Lk), seed=3)
    check_against_reference(q, k, v, q_mask, kv_mask, config=config, what=f"{Lq}x{Lk} d{D} {dtype}")


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    Lq=st.integers(1, 200),
    Lk=st.integers(1, 200),
    D=st.sampled_from([8, 12, 20, 32]),
    p_q=st.sampled_from([0.0, 0.4, 1.0]),
    p_kv=st.sampled_from([0.0, 0.6, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_random_shapes(Lq, Lk, D, p_q, p_kv, seed):
    q, k, v = make_qkv(1, 2, Lq, Lk, D, torch.float32, "blhd", seed=seed)
    g = torch.Generator().manual_seed(seed)
    q_mask = (torch.rand((1, 2, blocks(Lq)), generator=g) < p_q).to(DEVICE)
    kv_mask = (torch.rand((1, 2, blocks(Lk)), generator=g) < p_kv).to(DEVICE)
    check_against_reference(q, k, v, q_mask, kv_mask, what=f"{Lq}x{Lk} d{D}")


@pytest.mark.parametrize("scale", [-0.3, 0.0, 2.0])
def test_any_scale(scale):
    """A negative scale is applied by negating q; a zero scale gives a uniform softmax."""
    q, k, v = make_qkv(1, 2, 70, 100, 12, torch.float32)
    q_mask = make_mask("random", 1, 2, 2)
    kv_mask = make_mask("random", 1, 2, 2, seed=4)
    check_against_reference(q, k, v, q_mask, kv_mask, scale=scale, what=f"scale {scale}")


def test_rows_without_valid_keys_are_zero_with_lse_minus_inf():
    q, k, v = make_qkv(1, 2, 70, 70, 12, torch.float32)
    q_mask = torch.ones((1, 2, 2), dtype=torch.bool, device=DEVICE)
    kv_mask = torch.tensor([[[False, False], [True, False]]], device=DEVICE)  # head 0: no key at all
    out = torch.full_like(q, SENTINEL)
    lse = torch.full((1, 2, 70), SENTINEL, device=DEVICE)
    kernel_attention(q, k, v, q_mask, kv_mask, out, 0.5, lse)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    assert bool((lse[0, 0] == -math.inf).all())
    assert bool(lse[0, 1].isfinite().all())


# -- agreement with SDPA (all blocks active) ----------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, D, Lq, Lk",
    [(torch.float32, 64, 130, 70), (torch.float16, 12, 70, 130), (torch.bfloat16, 96, 100, 100)],
)
def test_all_active_equals_sdpa(dtype, D, Lq, Lk):
    q, k, v = make_qkv(2, 2, Lq, Lk, D, dtype, "blhd")
    out = torch.empty((2, Lq, 2, D), dtype=dtype, device=DEVICE).transpose(1, 2)  # diffusers' layout
    lse = torch.empty((2, 2, Lq), device=DEVICE)
    on_q = torch.ones((2, 2, blocks(Lq)), dtype=torch.bool, device=DEVICE)
    on_k = torch.ones((2, 2, blocks(Lk)), dtype=torch.bool, device=DEVICE)
    kernel_attention(q, k, v, on_q, on_k, out, D**-0.5, lse)
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
    assert_verbose_close(out, expected, what=f"vs sdpa {dtype}", **tol(dtype))
    scores = (q.float() @ k.float().transpose(-1, -2)) * D**-0.5
    assert_verbose_close(lse, torch.logsumexp(scores, -1), atol=2e-5, rtol=1e-5, what="lse vs logsumexp")


# -- through the public op ------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_shape", ["bhn", "bn", "n", "none"])
def test_public_op_with_triton_backend(mask_shape):
    q, k, v = make_qkv(2, 2, 100, 130, 12, torch.float32, "blhd")
    g = torch.Generator().manual_seed(5)
    shape = {"bhn": (2, 2), "bn": (2,), "n": (), "none": None}[mask_shape]
    q_mask = None if shape is None else (torch.rand((*shape, 2), generator=g) < 0.5).to(DEVICE)
    kv_mask = None if shape is None else (torch.rand((*shape, 3), generator=g) < 0.7).to(DEVICE)
    out = torch.full_like(q, SENTINEL)
    expected = out.clone()
    lse, expected_lse = torch.zeros(2, 2, 100, device=DEVICE), torch.zeros(2, 2, 100, device=DEVICE)
    with ops.backend("triton"):
        ops.masked_attention(q, k, v, q_mask, kv_mask, out=out, lse=lse)
    with ops.backend("reference"):
        ops.masked_attention(q, k, v, q_mask, kv_mask, out=expected, lse=expected_lse)
    assert_verbose_close(out, expected, what=f"ops triton, masks {mask_shape}")
    assert torch.equal(lse.isinf(), expected_lse.isinf())


# -- validation -----------------------------------------------------------------------------------------


def _args(**over):
    q, k, v = make_qkv(1, 2, 70, 70, 12, torch.float32)
    args = dict(
        q=q,
        k=k,
        v=v,
        q_block_mask=torch.ones((1, 2, 2), dtype=torch.bool, device=DEVICE),
        kv_block_mask=torch.ones((1, 2, 2), dtype=torch.bool, device=DEVICE),
        out=torch.zeros_like(q),
        scale=0.3,
        lse=None,
    )
    args.update(
        {k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v for k, v in over.items()}
    )
    return args


@pytest.mark.parametrize(
    "over, error, match",
    [
        ({"k": torch.zeros(1, 2, 70, 12, device="meta")}, ValueError, "must be on"),
        ({"out": torch.zeros(1, 2, 70, 12, dtype=torch.float16)}, TypeError, "share one dtype"),
        ({"q": torch.zeros(1, 2, 70, 12, dtype=torch.int32)}, TypeError, "share one dtype"),
        ({"q_block_mask": torch.ones((1, 2, 3), dtype=torch.bool)}, ValueError, "q_block_mask"),
        ({"kv_block_mask": torch.ones((1, 2, 2), dtype=torch.uint8)}, ValueError, "kv_block_mask"),
        ({"lse": torch.zeros((1, 2, 69))}, ValueError, "lse"),
        ({"out": torch.zeros(1, 2, 64, 12)}, ValueError, "shape of `q`"),
        ({"v": torch.zeros(1, 2, 71, 12)}, ValueError, "`k` and `v`"),
        ({"q_block_mask": [True, True]}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises(over, error, match):
    with pytest.raises(error, match=match):
        kernel_attention(**_args(**over))


def test_head_dim_limit_raises():
    big = torch.zeros(1, 1, 64, ma.MAX_HEAD_DIM + 1, device=DEVICE)
    mask = torch.ones((1, 1, 1), dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        kernel_attention(big, big, big, mask, mask, big.clone(), 1.0)


def test_config_blocks_must_be_mask_multiples():
    with pytest.raises(ValueError, match="multiples of 64"):
        kernel_attention(**_args(), config={"BLOCK_M": 32})


# -- autotune configs -------------------------------------------------------------------------------------


def test_autotune_pruning_fits_problem_and_shared_memory():
    q = torch.zeros(1, dtype=torch.bfloat16)
    long = ma._prune(ma._CONFIGS, {"Lq": 17550, "Lk": 17550, "Q": q}, BLOCK_D=128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in long} == {(64, 64), (64, 128), (128, 64), (128, 128)}
    for c in long:
        smem = (c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"]) * 128 * 2
        assert smem <= ma.SMEM_BYTES
        assert not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4), "128-row tiles on 4 warps spill at D=128"
    short = ma._prune(ma._CONFIGS, {"Lq": 64, "Lk": 40, "Q": q}, BLOCK_D=128)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in short} == {(64, 64)}
    huge = ma._prune(ma._CONFIGS, {"Lq": 4096, "Lk": 4096, "Q": torch.zeros(1)}, BLOCK_D=256)
    assert huge, "pruning must always leave a config"
    assert all(c.num_warps == 4 for c in ma._CONFIGS if c.kwargs["BLOCK_M"] == 64)


# -- the compiled GPU path, without a GPU ---------------------------------------------------------------

_AOT_SCRIPT = r"""
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("masked_attention_aot", sys.argv[1])
ma = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ma)
fn = ma._masked_attn_fwd
pointers = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32"}
constexprs = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=128, BLOCK_N=128, NEGATE_Q=False, HAS_LSE=True,
                  UPCAST=False, DOT_PRECISION="tf32", stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
signature, attrs = {}, {}
for i, name in enumerate(fn.arg_names):
    if name in constexprs:
        signature[name] = "constexpr"
    elif name in pointers or name in ("QList", "QCount", "KVList", "KVCount"):
        signature[name] = pointers.get(name, "*i32")
        attrs[(i,)] = [["tt.divisibility", 16]]
    else:
        signature[name] = "fp32" if name == "qk_scale" else "i32"
        if name.startswith("stride_"):  # as Triton specialises them for the diffusers layout at D=128
            attrs[(i,)] = [["tt.divisibility", 16]]
src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
lines = kernel.asm["ttgir"].splitlines()
# The unmasked key loops run from 0 to `n_steps_unmasked` (TTGIR names values after the Python
# variables); the first async_wait in each says how many k/v copies stay in flight across steps.
waits = []
for i, line in enumerate(lines):
    if "scf.for" in line and "= %c0_i32 to %n_steps_unmasked " in line:
        wait = next(w for w in lines[i + 1 :] if "ttg.async_wait" in w)
        waits.append(int(wait.split("num = ")[1].split(" ")[0]))
print(json.dumps({
    "shared": kernel.metadata.shared,
    "wgmma": sum("ttng.warp_group_dot " in line for line in lines),
    "unmasked_loop_copies_in_flight": waits,
}))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU tests above run the compiled kernel itself")
def test_hopper_build_uses_wgmma_and_pipelines_both_key_loops(tmp_path):
    """Compile the 128x128 bf16 config for sm_90 ahead of time (no GPU needed): the interpreter cannot
    see codegen, so check here that it compiles, uses wgmma, fits in shared memory, and that both the
    dense and the gathered key loops prefetch k/v two steps ahead (num_stages=3)."""
    import json
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _AOT_SCRIPT, ma.__file__], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["wgmma"] > 0, facts
    assert facts["shared"] <= ma.SMEM_BYTES, facts
    # Dense and gathered loops both keep num_stages - 1 = 2 k/v copies in flight.
    assert facts["unmasked_loop_copies_in_flight"] == [2, 2], facts
