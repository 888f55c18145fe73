"""Cache-masked flash-attention forward: only active query blocks, only valid key/value blocks.

Contract: :func:`supergen.reference.masked_attention`. ``q`` is ``(B, H, Lq, D)``, ``k``/``v`` are
``(B, H, Lk, D)`` with any strides (diffusers' ``(B, L, H, D)`` tensors arrive as transposed views and
are read through their strides, never copied). ``q_block_mask``/``kv_block_mask`` are bool
``(B, H, ceil(L / 64))``, one entry per 64-token block (expanded views with zero strides are fine).
Rows of inactive query blocks keep whatever ``out`` (and ``lse``) held; invalid key/value blocks are
never read; a row with no valid key gets zeros and ``lse = -inf``.

Design
------
* **Block lists instead of block masks.** The launcher turns each mask into a per-(b, h) list of the
  indices of its set blocks (ascending) plus a count, with one stable sort on the device (no host
  sync). A program then takes the next ``BLOCK_M // 64`` *active* query blocks, and the inner loop walks
  ``BLOCK_N // 64`` *valid* key blocks per step. Work is therefore proportional to the number of active
  (query, key) block pairs whatever the block sizes, so the 128x128 tiles Hopper needs for tensor-core
  throughput lose nothing to sparsity: with per-tile masks, a random 50 % of query blocks would
  leave 75 % of 128-row tiles with work to do. Softmax is order-free, so walking keys in list order is
  exact up to rounding.
* **Early exit.** Programs past the count of active query blocks return after one scalar load: no
  q/k/v load, no store. Inactive query rows inside a program (an odd count with ``BLOCK_M = 128``) are
  masked out of the store, so ``out`` rows of inactive blocks stay bit-identical.
* **Masked vs unmasked key steps** are split by a constexpr as in Triton's fused-attention tutorial:
  every step but the last covers whole, valid 64-blocks and runs without masks; only the final step
  (fewer than ``BLOCK_N // 64`` blocks left, or the ragged last block of ``Lk``) masks.
* **Numerics.** Online softmax in fp32 with ``exp2`` and ``log2(e)`` folded into the scale; fp32
  accumulation. On GPU, fp16/bf16 use the native-precision ``tl.dot`` (tensor cores) with ``p`` cast to
  the value dtype as in FlashAttention; fp32 inputs use IEEE fp32 dots (no silent TF32). Under
  ``TRITON_INTERPRET=1`` operands are upcast to fp32 first, because the interpreter's bf16 ``tl.dot`` is
  wrong. A negative ``scale`` is applied by negating ``q`` so the fused ``qk * scale - m`` stays valid.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

#: Token block of the masks (``supergen.reference.ATTN_MASK_BLOCK``; part of the contract). The jitted
#: code spells it ``64`` (and ln 2 as a literal): the interpreter cannot mix ints with constexpr globals.
MASK_BLOCK = 64
#: log2(e): scores are kept in base-2 units so the softmax uses the fast ``exp2``.
LOG2E = 1.4426950408889634
#: ln(2): converts the base-2 log-sum-exp back to the natural log of the contract.
LN2 = 0.6931471805599453
#: Largest head dim: a 128x256 fp32 accumulator already fills a Hopper SM's register file.
MAX_HEAD_DIM = 256
#: The one config used when autotuning cannot run (interpreter, CPU, ``SUPERGEN_NO_AUTOTUNE=1``):
#: 64x64 is the smallest tile the mask contract allows and the cheapest per step in the interpreter.
FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
#: Shared memory budget used to prune configs (H100/H200: 227 KiB per block).
SMEM_BYTES = 227 * 1024


@triton.jit
def _load_rows(ptrs, row_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks only the axes that can be out of range (constexpr)."""
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        return tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _masked_attn_inner(
    acc, l_i, m_i, q,
    k_base, v_base, kv_list, n_kv, step_lo, step_hi,
    stride_kn, stride_kd, stride_vn, stride_vd,
    Lk, qk_scale, offs_d,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, GATHER: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold key steps ``[step_lo, step_hi)`` into the running ``(acc, l_i, m_i)`` of one query tile.

    Step ``s`` covers entries ``s * BLOCK_N/64 ...`` of ``kv_list`` (indices of valid 64-blocks), or
    keys ``s * BLOCK_N ...`` directly when every block is valid (``GATHER`` off: the list is the
    identity, so the loads are plain contiguous tiles as in the tutorial). ``MASKED`` steps may run
    past the ``n_kv`` valid entries or past ``Lk``; unmasked ones may not.

    On sm_90 both unmasked loops software-pipeline like the tutorial (cp.async ``num_stages - 1``
    steps ahead of the wgmma); the gathered one thanks to the block indices loaded a step early.
    """
    SUB: tl.constexpr = BLOCK_N // 64
    sub = tl.arange(0, BLOCK_N) // 64
    within = tl.arange(0, BLOCK_N) % 64
    if GATHER:
        if not MASKED:
            # The block indices of step s + 1 are loaded during step s: k/v addresses then depend on
            # a loop-carried value, not on a load of the same step, and Triton's pipeliner can
            # prefetch the gathered k/v tiles num_stages - 1 steps ahead as in the dense loop
            # (checked on the sm_90 TTGIR; loading them in-step pipelines only one step deep).
            next_block = tl.load(kv_list + step_lo * SUB + sub, mask=step_lo * SUB + sub < n_kv, other=0)
    for step in range(step_lo, step_hi):
        if GATHER:
            entry = step * SUB + sub
            if MASKED:
                entry_ok = entry < n_kv
                block = tl.load(kv_list + entry, mask=entry_ok, other=0)
                offs_n = block * 64 + within
                col_ok = entry_ok & (offs_n < Lk)
            else:
                block = next_block
                next_block = tl.load(kv_list + entry + SUB, mask=entry + SUB < n_kv, other=0)
                offs_n = tl.max_contiguous(tl.multiple_of(block * 64 + within, 64), 64)
                col_ok = offs_n < Lk  # unused: unmasked steps read only whole valid blocks
        else:
            offs_n = step * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = offs_n < Lk
        k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        k = _load_rows(k_ptrs, col_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_rows(v_ptrs, col_ok, offs_d, HEAD_DIM, BLOCK_D, MASKED)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            # Scale before masking: -inf * qk_scale would be NaN for a zero scale.
            qk = tl.where(col_ok[None, :], qk * qk_scale, float("-inf"))
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            qk = qk - m_ij[:, None]
        else:
            # qk_scale >= 0 (the launcher negates q for a negative scale), so max commutes with it
            # and the scale folds into one FMA per score.
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _masked_attn_fwd(
    Q, K, V, Out, Lse, QList, QCount, KVList, KVCount,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_qlb, stride_qlh, stride_qcb, stride_qch,
    stride_klb, stride_klh, stride_kcb, stride_kch,
    H, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NEGATE_Q: tl.constexpr, HAS_LSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One program: up to ``BLOCK_M // 64`` active query blocks of one (batch, head), all valid keys.

    Grid: ``(cdiv(ceil(Lq / 64), BLOCK_M // 64), B * H)``. ``QList``/``KVList`` hold, per (b, h), the
    ascending indices of active/valid 64-blocks (last axis contiguous); ``QCount``/``KVCount`` their
    number. ``Lse`` is read only if ``HAS_LSE``.
    """
    tl.static_assert(BLOCK_M % 64 == 0, "BLOCK_M must be a multiple of the 64-token mask block")
    tl.static_assert(BLOCK_N % 64 == 0, "BLOCK_N must be a multiple of the 64-token mask block")
    tl.static_assert(BLOCK_D >= HEAD_DIM, "BLOCK_D pads the head dim")
    SUB_M: tl.constexpr = BLOCK_M // 64
    SUB_N: tl.constexpr = BLOCK_N // 64
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)

    n_q = tl.load(QCount + off_b * stride_qcb + off_h * stride_qch)
    if pid_m * SUB_M >= n_q:
        return  # no active query block left for this program: touch nothing

    # Prologue: rows of this program's active query blocks, gathered through the block list.
    offs_r = tl.arange(0, BLOCK_M)
    q_entry = pid_m * SUB_M + offs_r // 64
    q_entry_ok = q_entry < n_q
    q_block = tl.load(QList + off_b * stride_qlb + off_h * stride_qlh + q_entry, mask=q_entry_ok, other=0)
    offs_m = q_block * 64 + offs_r % 64
    row_ok = q_entry_ok & (offs_m < Lq)
    offs_d = tl.arange(0, BLOCK_D)

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = _load_rows(q_ptrs, row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    if NEGATE_Q:
        q = -q
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key steps: whole steps of whole valid blocks unmasked, then at most one masked step for the
    # remainder (fewer than SUB_N blocks, or the ragged last block of Lk).
    n_kv = tl.load(KVCount + off_b * stride_kcb + off_h * stride_kch)
    kv_list = KVList + off_b * stride_klb + off_h * stride_klh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    n_kv_whole = n_kv
    if Lk % 64 != 0:
        if n_kv > 0:
            last = tl.load(kv_list + n_kv - 1)
            n_kv_whole = n_kv - (last == (Lk - 1) // 64).to(tl.int32)
    n_steps_unmasked = n_kv_whole // SUB_N
    has_rest = n_steps_unmasked * SUB_N < n_kv
    # All blocks valid (the common, uncached case): address keys directly, no list loads.
    if n_kv == tl.cdiv(Lk, 64):
        acc, l_i, m_i = _masked_attn_inner(
            acc, l_i, m_i, q, k_base, v_base, kv_list, n_kv, 0, n_steps_unmasked,
            stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_d,
            BLOCK_N, BLOCK_D, HEAD_DIM, False, False, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        if has_rest:
            acc, l_i, m_i = _masked_attn_inner(
                acc, l_i, m_i, q, k_base, v_base, kv_list, n_kv, n_steps_unmasked, n_steps_unmasked + 1,
                stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_d,
                BLOCK_N, BLOCK_D, HEAD_DIM, True, False, UPCAST, DOT_PRECISION,
            )  # fmt: skip
    else:
        acc, l_i, m_i = _masked_attn_inner(
            acc, l_i, m_i, q, k_base, v_base, kv_list, n_kv, 0, n_steps_unmasked,
            stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_d,
            BLOCK_N, BLOCK_D, HEAD_DIM, False, True, UPCAST, DOT_PRECISION,
        )  # fmt: skip
        if has_rest:
            acc, l_i, m_i = _masked_attn_inner(
                acc, l_i, m_i, q, k_base, v_base, kv_list, n_kv, n_steps_unmasked, n_steps_unmasked + 1,
                stride_kn, stride_kd, stride_vn, stride_vd, Lk, qk_scale, offs_d,
                BLOCK_N, BLOCK_D, HEAD_DIM, True, True, UPCAST, DOT_PRECISION,
            )  # fmt: skip

    # Epilogue: a row that saw no valid key has l_i == 0 and acc == 0 -> output 0, lse -inf.
    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    if HEAD_DIM == BLOCK_D:
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None])
    else:
        tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if HAS_LSE:
        lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Autotuning (Hopper): a comprehension grid, a static keep() and a shape-aware early prune.
# --------------------------------------------------------------------------------------------------


def _keep(cfg: triton.Config) -> bool:
    """Drop combinations known to be poor: a 64-row tile is one warpgroup's wgmma, so 8 warps idle."""
    return not (cfg.kwargs["BLOCK_M"] == 64 and cfg.num_warps == 8)


_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (64, 128)
    for w in (4, 8)
    for s in (2, 3, 4)
]
_CONFIGS = [c for c in _CONFIGS if _keep(c)]


def _fits(block_m: int, block_n: int, num_stages: int, block_d: int, itemsize: int) -> bool:
    """Whether the q tile plus ``num_stages`` buffered k and v tiles fit in shared memory."""
    return (block_m + 2 * num_stages * block_n) * block_d * itemsize <= SMEM_BYTES


def _fits_registers(block_m: int, block_n: int, block_d: int, num_warps: int) -> bool:
    """Whether the fp32 accumulator and score tile take at most 128 of a thread's 255 registers.

    Measured with ptxas for sm_90 at D=128 bf16: 128-row tiles on 4 warps spill 0.4-3.5 KB per
    thread; within the bound 128x128 on 8 warps uses 253 registers without spilling, and 64x128 on
    4 warps, right at it, spills 44 bytes (left for the autotuner to judge).
    """
    return block_m * (block_d + block_n) <= 128 * 32 * num_warps


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the problem, pipelines that do not fit in shared memory, and tiles
    whose accumulators would spill registers.

    The estimate is optimistic: Triton may give the dense and the gathered loop separate buffers;
    a config that then exceeds shared memory fails to launch and the autotuner skips it.
    """
    args = {**named_args, **kwargs}  # the launcher passes everything by keyword
    Lq, Lk, D, itemsize = args["Lq"], args["Lk"], args["BLOCK_D"], args["Q"].element_size()
    kept = [
        c
        for c in configs
        if not (c.kwargs["BLOCK_M"] > 64 and Lq <= 64)
        and not (c.kwargs["BLOCK_N"] > 64 and Lk <= 64)
        and _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages, D, itemsize)
        and _fits_registers(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], D, c.num_warps)
    ]
    # Nothing fits only for fp32 with D > 128: one unpipelined 64x64 stage always does.
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]


# The autotune key holds what changes the best tile: lengths and head dim. Triton's autotuner also
# appends every tensor argument's dtype to the key, so fp16/bf16/fp32 tune separately. Re-running
# a config is harmless: the kernel writes the same values to the same rows (no accumulation).
# Results are cached on disk where this Triton can (>= 3.2), since a video model runs the same few
# tile shapes in every process.
_CACHE_KW = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
_masked_attn_fwd_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["Lq", "Lk", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _prune},
    **_CACHE_KW,
)(_masked_attn_fwd)


# --------------------------------------------------------------------------------------------------
# Host launcher
# --------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_list(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(b, h) ascending indices of set blocks (int32, padded past the count) and their count.

    Axes the mask broadcasts over (zero stride) are sorted once and expanded back, so a mask shared
    by every head costs one row of work.
    """
    index = tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride()[:2])
    base = mask[index]
    # Stable descending sort of 0/1 keys puts set blocks first, in ascending block order.
    order = torch.sort(base.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    blocks = order.to(torch.int32).contiguous().expand(mask.shape)
    count = base.sum(dim=-1, dtype=torch.int32).expand(mask.shape[:2])
    return blocks, count


def _check(q, k, v, q_block_mask, kv_block_mask, out, lse) -> None:
    """Reject what would make the kernel read or write out of bounds, with the reason."""
    tensors = {"q": q, "k": k, "v": v, "out": out, "q_block_mask": q_block_mask, "kv_block_mask": kv_block_mask}
    if lse is not None:
        tensors["lse"] = lse
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor but is {type(t).__name__}.")
        if t.device != q.device:
            raise ValueError(f"`{name}` must be on {q.device} like `q` but is on {t.device}.")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the Triton masked_attention kernel needs CUDA tensors (or TRITON_INTERPRET=1) but `q` is on {q.device}."
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"`q`, `k`, `v` must be 4-D (B, H, L, D) but have shapes {q.shape}, {k.shape}, {v.shape}.")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"`k` and `v` must both be (B={B}, H={H}, Lk, D={D}) but are {k.shape} and {v.shape}.")
    if out.shape != q.shape:
        raise ValueError(f"`out` must have the shape of `q` {tuple(q.shape)} but has {tuple(out.shape)}.")
    if not (q.dtype == k.dtype == v.dtype == out.dtype) or q.dtype not in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ):
        raise TypeError(
            f"`q`, `k`, `v`, `out` must share one dtype of float16, bfloat16, float32 but are "
            f"{q.dtype}, {k.dtype}, {v.dtype}, {out.dtype}."
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] but is {D}.")
    if Lq == 0 or Lk == 0:
        raise ValueError(f"sequence lengths must be >= 1 but are Lq={Lq}, Lk={Lk}.")
    for name, mask, length in (("q_block_mask", q_block_mask, Lq), ("kv_block_mask", kv_block_mask, Lk)):
        blocks = triton.cdiv(length, MASK_BLOCK)
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, H, blocks):
            raise ValueError(
                f"`{name}` must be a bool tensor of shape (B={B}, H={H}, {blocks}) (one entry per "
                f"{MASK_BLOCK}-token block of {length}) but is {mask.dtype} {tuple(mask.shape)}."
            )
    if lse is not None and (lse.dtype != torch.float32 or tuple(lse.shape) != (B, H, Lq)):
        raise ValueError(f"`lse` must be float32 of shape {(B, H, Lq)} but is {lse.dtype} {tuple(lse.shape)}.")
    if B * H > 65535:
        raise ValueError(f"B * H must be <= 65535 (CUDA grid axis 1) but is {B * H}.")
    # Offsets inside one (b, h) slice are int32 in the kernel (batch/head offsets are int64).
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        extent = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if extent >= 2**31:
            raise ValueError(f"`{name}` spans {extent} elements within one (batch, head); the limit is 2**31.")


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_block_mask: torch.Tensor,
    kv_block_mask: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None = None,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """Launch the masked flash-attention forward; updates ``out`` (and ``lse``) in place.

    Args:
        q: ``(B, H, Lq, D)``; k, v: ``(B, H, Lk, D)``; any strides, one of fp16/bf16/fp32, ``D <= 256``.
        q_block_mask: bool ``(B, H, ceil(Lq / 64))``, active query blocks (any strides).
        kv_block_mask: bool ``(B, H, ceil(Lk / 64))``, valid key/value blocks (any strides).
        out: ``(B, H, Lq, D)`` in q's dtype, any strides; rows of inactive blocks are not written.
        scale: softmax scale applied to ``q @ k.T``.
        lse: optional fp32 ``(B, H, Lq)``, receives each computed row's natural log-sum-exp.
        config: launch with this ``{BLOCK_M, BLOCK_N, num_warps, num_stages}`` instead of the
            autotuned (CUDA) or :data:`FIXED_CONFIG` (interpreter, ``SUPERGEN_NO_AUTOTUNE=1``) one.

    Returns:
        ``out``.
    """
    _check(q, k, v, q_block_mask, kv_block_mask, out, lse)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q_list, q_count = _block_list(q_block_mask)
    kv_list, kv_count = _block_list(kv_block_mask)
    interpreting = _interpreting()
    lse_arg = lse if lse is not None else out  # never read: HAS_LSE is a constexpr
    lse_strides = lse.stride() if lse is not None else (0, 0, 0)
    args = dict(
        Q=q, K=k, V=v, Out=out, Lse=lse_arg, QList=q_list, QCount=q_count, KVList=kv_list, KVCount=kv_count,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qm=q.stride(2), stride_qd=q.stride(3),
        stride_kb=k.stride(0), stride_kh=k.stride(1), stride_kn=k.stride(2), stride_kd=k.stride(3),
        stride_vb=v.stride(0), stride_vh=v.stride(1), stride_vn=v.stride(2), stride_vd=v.stride(3),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_om=out.stride(2), stride_od=out.stride(3),
        stride_lb=lse_strides[0], stride_lh=lse_strides[1], stride_lm=lse_strides[2],
        stride_qlb=q_list.stride(0), stride_qlh=q_list.stride(1),
        stride_qcb=q_count.stride(0), stride_qch=q_count.stride(1),
        stride_klb=kv_list.stride(0), stride_klh=kv_list.stride(1),
        stride_kcb=kv_count.stride(0), stride_kch=kv_count.stride(1),
        H=H, Lq=Lq, Lk=Lk, qk_scale=abs(float(scale)) * LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        NEGATE_Q=float(scale) < 0, HAS_LSE=lse is not None,
        UPCAST=interpreting, DOT_PRECISION="ieee" if interpreting or q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    n_q_blocks = triton.cdiv(Lq, MASK_BLOCK)
    if config is None and (
        interpreting or q.device.type != "cuda" or os.environ.get("SUPERGEN_NO_AUTOTUNE", "0") == "1"
    ):
        config = FIXED_CONFIG
    if config is not None:
        cfg = {**FIXED_CONFIG, **config}
        if not _fits(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"], args["BLOCK_D"], q.element_size()):
            cfg["num_stages"] = 1  # fp32 with a large head dim: do not pipeline rather than fail
        if cfg["BLOCK_M"] % MASK_BLOCK or cfg["BLOCK_N"] % MASK_BLOCK:
            raise ValueError(f"`config` blocks must be multiples of {MASK_BLOCK} but are {cfg}.")
        grid = (triton.cdiv(n_q_blocks, cfg["BLOCK_M"] // MASK_BLOCK), B * H)
        _masked_attn_fwd[grid](**args, **cfg)
    else:
        grid = lambda META: (triton.cdiv(n_q_blocks, META["BLOCK_M"] // MASK_BLOCK), B * H)  # noqa: E731
        _masked_attn_fwd_tuned[grid](**args)
    return out
