"""Route a diffusers video transformer's attention through :func:`supergen.ops.masked_attention`.

Two routes, picked per model class by :func:`enable_masked_attention`:

* **Dispatcher models** (Wan, HunyuanVideo, LTX-Video, and any model whose attention processors
  call ``dispatch_attention_fn``): we register one attention *backend* named ``"supergen"`` and point
  this model's processors at it (``processor._attention_backend``), exactly what
  ``ModelMixin.set_attention_backend`` does, minus its side effect of changing the process-global
  default backend. diffusers keeps its own processors (projections, norms, RoPE, I2V branches), and
  one function replaces only the attention math for every such model. The alternative, a processor
  subclass per model, would have to re-implement each model's ``__call__`` and drift with diffusers.
  diffusers 0.42's ``AttentionBackendName`` enum is closed, so :func:`register_backend` adds one
  member at run time (the only unsupported step, kept in one function, idempotent, and tested) and
  registers our function with ``_AttentionBackendRegistry.register``. After that,
  ``with attention_backend("supergen"):`` works as for any built-in backend. It runs under diffusers'
  context parallelism too (``enable_parallelism``: Ulysses, and ring attention, which merges each
  key/value shard's partial output by the log-sum-exp our kernel returns), so a model on it can run
  ``ParallelConfig(sketch_context="ring")`` on any device (plain attention only: no log-sum-exp under a
  model's mask).
* **CogVideoX** calls ``F.scaled_dot_product_attention`` inside its processor and never reaches the
  dispatcher, so it gets :class:`CogVideoXMaskedAttnProcessor`, the same joint text+video attention
  with the SDPA call replaced.

Per-forward block masks come from :func:`attention_masks`, a context manager holding per-call state
(a ``ContextVar``, so threads and tasks do not see each other's masks). Outside it every block is
active and valid, and the result equals stock attention. The region cache uses it to compute only
active query blocks and keep the cached output rows of the others (``outputs``).

Model attention masks: key padding (a bool or 0/-inf mask that drops a suffix of the keys, as
HunyuanVideo's text padding does) is exact as attention over each batch element's key prefix, so it
runs on the kernel. Anything else a 64-token block mask cannot express (general masks, LTX's -10000
bias, causal, dropout) falls back to SDPA *explicitly* (a one-time warning per kind) when no block
mask applies to the call, and raises when one does: silently ignoring either mask would be wrong.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import ops
from .reference import ATTN_MASK_BLOCK

#: Name of the attention backend registered with diffusers' dispatcher.
BACKEND_NAME = "supergen"
#: Models whose processors call ``dispatch_attention_fn``: routed through the backend (other models
#: whose processors dispatch are routed too; these are the ones tested or documented to).
DISPATCH_MODELS = (
    "WanTransformer3DModel",
    "WanVACETransformer3DModel",
    "SkyReelsV2Transformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "HunyuanVideo15Transformer3DModel",
    "LTXVideoTransformer3DModel",
)
#: Models whose processors call SDPA directly: routed through our processor.
PROCESSOR_MODELS = ("CogVideoXTransformer3DModel",)
_ATTR = "_supergen_attention"  # set on an enabled transformer: what to restore on disable


# --------------------------------------------------------------------------------------------------
# Per-call state
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _CallState:
    q_block_mask: torch.Tensor | None = None
    kv_block_mask: torch.Tensor | None = None
    seq_len: int | None = None
    outputs: list | None = None
    calls: int = 0

    def mask_for(self, mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """``mask`` if it describes a sequence of ``length`` tokens, else ``None`` (all active)."""
        if mask is None:
            return None
        if self.seq_len is not None:
            return mask if length == self.seq_len else None
        return mask if mask.shape[-1] == -(-length // ATTN_MASK_BLOCK) else None


_STATE: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("supergen_attention", default=None)
_ALL_ACTIVE = _CallState()  # outside `attention_masks`: never mutated (it has no `outputs`)


@contextlib.contextmanager
def attention_masks(
    q_block_mask: torch.Tensor | None = None,
    kv_block_mask: torch.Tensor | None = None,
    *,
    seq_len: int | None = None,
    outputs: list | None = None,
) -> Iterator[None]:
    """Block masks for every routed attention call made inside the block.

    Args:
        q_block_mask: bool, one entry per 64-token query block (shapes as
            :func:`supergen.ops.masked_attention` accepts: ``(B, H, n)``, ``(B, n)`` or ``(n,)``);
            rows of inactive blocks are not computed. ``None``: all active.
        kv_block_mask: bool per 64-token key/value block; invalid blocks are not attended to.
        seq_len: the masks apply to calls whose query (resp. key) sequence has exactly this many
            tokens, e.g. the video tokens, and not to cross-attention over text. ``None``: to calls
            whose length has as many 64-blocks as the mask has entries.
        outputs: a list that keeps output buffers across forwards: the ``i``-th call the query mask
            applies to writes into ``outputs[i]`` (appended on first use), so rows of inactive query
            blocks keep the values of the last forward that computed them. Without it they are zero.

    The same list must only be reused with forwards of the same shapes (same model, same tile size).
    """
    token = _STATE.set(_CallState(q_block_mask, kv_block_mask, seq_len, outputs))
    try:
        yield
    finally:
        _STATE.reset(token)


# --------------------------------------------------------------------------------------------------
# The attention call both routes share: (B, H, L, D) views in, (B, H, L, D) view out
# --------------------------------------------------------------------------------------------------

_warned: set[str] = set()
_lengths_cache: tuple = (None, -1, None)  # (weakref to the last attn_mask, its version, its lengths)


def _key_lengths(attn_mask: torch.Tensor, B: int, Lk: int) -> list[int] | None:
    """Per-batch valid-key counts if ``attn_mask`` only pads keys at the end, else ``None``.

    Such masks (HunyuanVideo's joint [video; text] mask, text padding in general) are exact as
    attention over a key *prefix*, which needs no mask at all: ``k[b, :, :n_b]`` is a view. Accepted
    forms: bool (True = attend) or additive float with only ``0``/``-inf``, shaped ``(B, Lk)`` or
    ``(B | 1, 1, 1, Lk)`` (one mask for every head and query). Reading the lengths costs one host
    sync, cached for the mask object a model passes to all of its blocks.
    """
    global _lengths_cache
    ref, version, lengths = _lengths_cache
    if ref is not None and ref() is attn_mask and version == attn_mask._version:
        return lengths
    m = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[2] != 1 or m.shape[3] != Lk or m.shape[0] not in (1, B):
        return None
    m = m[:, 0, 0, :].expand(B, Lk)
    if m.dtype == torch.bool:
        keep, exact = m, torch.ones((), dtype=torch.bool, device=m.device)
    elif m.is_floating_point():
        keep, exact = m == 0, ((m == 0) | (m == float("-inf"))).all()
    else:
        return None
    n = keep.sum(-1)
    is_prefix = (keep == (torch.arange(Lk, device=m.device) < n[:, None])).all()
    *lengths, ok = torch.cat([n, (exact & is_prefix).reshape(1)]).tolist()  # the one sync
    lengths = lengths if ok else None
    _lengths_cache = (weakref.ref(attn_mask), attn_mask._version, lengths)
    return lengths


def _unsupported(q, k, attn_mask, dropout_p, is_causal) -> tuple[str | None, list[int] | None]:
    """(why SDPA must do this call, or None; per-batch key lengths of a key-padding mask, or None)."""
    if is_causal:
        return "causal attention", None
    if dropout_p:
        return f"dropout_p={dropout_p}", None
    if k.shape[1] != q.shape[1]:
        return f"grouped-query attention ({q.shape[1]} query heads, {k.shape[1]} key/value heads)", None
    if attn_mask is None:
        return None, None
    lengths = _key_lengths(attn_mask, q.shape[0], k.shape[2])
    if lengths is None or 0 in lengths:  # SDPA's own convention for rows with no key at all
        return f"an attention mask of shape {tuple(attn_mask.shape)} ({attn_mask.dtype}) that is not key padding", None
    return None, lengths


def _batch(mask: torch.Tensor | None, b: int, blocks: int | None = None) -> torch.Tensor | None:
    """Batch element ``b`` of a block mask in any shape ops accepts, cut to ``blocks`` entries."""
    if mask is None:
        return None
    if mask.dim() >= 2 and mask.shape[0] > 1:
        mask = mask[b : b + 1]
    return mask if blocks is None else mask[..., :blocks]


def _output_buffer(state: _CallState, q: torch.Tensor, q_mask: torch.Tensor | None) -> torch.Tensor:
    """Where this call writes: the cached buffer of this call (``outputs``) or a new one.

    Buffers are ``(B, Lq, H, D)``-contiguous, viewed as ``(B, H, Lq, D)``, so both diffusers layouts
    flatten the heads without a copy. Only calls the query mask applies to have cached rows.
    """
    B, H, Lq, D = q.shape
    if state.outputs is not None and q_mask is not None:
        index = state.calls
        state.calls += 1
        if index < len(state.outputs):
            out = state.outputs[index]
            if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
                raise ValueError(
                    f"`outputs[{index}]` holds {tuple(out.shape)} {out.dtype} but masked attention call {index} "
                    f"produces {tuple(q.shape)} {q.dtype}: reuse an `outputs` list only for same-shape forwards."
                )
            return out
    # Uncomputed rows must read as zero unless every query block is known active.
    alloc = torch.empty if q_mask is None else torch.zeros
    out = alloc((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    if state.outputs is not None and q_mask is not None:
        state.outputs.append(out)
    return out


def _attend(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None) -> torch.Tensor:
    """Attention of ``(B, H, L, D)`` tensors (any strides) under the current :func:`attention_masks`.

    Returns ``(B, H, Lq, D)`` (see :func:`_output_buffer` for its memory layout).
    """
    state = _STATE.get() or _ALL_ACTIVE
    q_mask = state.mask_for(state.q_block_mask, q.shape[2])
    kv_mask = state.mask_for(state.kv_block_mask, k.shape[2])
    reason, lengths = _unsupported(q, k, attn_mask, dropout_p, is_causal)
    if reason is not None:
        if q_mask is not None or kv_mask is not None:
            raise ValueError(
                f"supergen masked attention cannot combine block masks with {reason} from the model; "
                f"call the model outside `attention_masks(...)` or without that mask."
            )
        if reason not in _warned:
            _warned.add(reason)
            warnings.warn(
                f"supergen attention: the model passed {reason}, which 64-token block masks cannot "
                f"express; these calls use torch's scaled_dot_product_attention instead.",
                stacklevel=3,
            )
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
        )

    out = _output_buffer(state, q, q_mask)
    Lk = k.shape[2]
    if lengths is None or all(n == Lk for n in lengths):
        return ops.masked_attention(q, k, v, q_mask, kv_mask, out=out, scale=scale)
    for b, n in enumerate(lengths):  # key padding: attend to each batch element's key prefix
        ops.masked_attention(
            q[b : b + 1],
            k[b : b + 1, :, :n],
            v[b : b + 1, :, :n],
            _batch(q_mask, b),
            _batch(kv_mask, b, -(-n // ATTN_MASK_BLOCK)),
            out=out[b : b + 1],
            scale=scale,
        )
    return out


# --------------------------------------------------------------------------------------------------
# Route 1: a diffusers attention backend
# --------------------------------------------------------------------------------------------------


def _supergen_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _parallel_config=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """diffusers backend function: ``(B, L, H, D)`` tensors in, ``(B, Lq, H, D)`` out (and, with
    ``return_lse``, the ``(B, Lq, H)`` fp32 log-sum-exp).

    Under diffusers' context parallelism (``_parallel_config``: Ulysses' all-to-all, ring attention's
    key/value rotation) diffusers' own template runs the sequence-parallel part and calls
    :func:`_context_parallel_op` for each local attention; ring attention merges the partial results
    with the log-sum-exp the kernel returns.
    """
    if _parallel_config is not None:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        return _templated_context_parallel_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
            forward_op=_context_parallel_op, backward_op=_no_backward, _parallel_config=_parallel_config,
        )  # fmt: skip
    if return_lse:
        return _context_parallel_op(None, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, True)
    out = _attend(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
    )
    return out.transpose(1, 2)


def _context_parallel_op(
    ctx,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config=None,
):
    """One local attention of ``(B, L, H, D)`` tensors as diffusers' context-parallel templates call it
    (``forward_op``): the output, and with ``return_lse`` the ``(B, Lq, H)`` fp32 log-sum-exp. Inference
    only: nothing is saved for a backward. Plain attention only: the region cache's block masks describe
    a whole sequence, not a shard of it, and the model masks a block mask cannot express have no kernel
    with a log-sum-exp here."""
    state = _STATE.get() or _ALL_ACTIVE
    if state.q_block_mask is not None or state.kv_block_mask is not None:
        raise ValueError(
            "supergen block masks (`attention_masks`) describe a whole sequence and cannot apply to a shard of "
            "one under context parallelism; call the model outside `attention_masks(...)`."
        )
    if not return_lse:  # Ulysses: each rank attends over whole sequences of its share of the heads
        return _supergen_backend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    given = {"attn_mask": attn_mask is not None, "dropout_p": dropout_p != 0.0, "is_causal": is_causal,
             "enable_gqa": enable_gqa}  # fmt: skip
    unsupported = sorted(name for name, on in given.items() if on)
    if unsupported:
        raise ValueError(
            f"the supergen attention backend returns the log-sum-exp (ring attention, `return_lse`) only for plain "
            f"attention, but the call passes {', '.join(unsupported)}; use Ulysses or a backend that supports them."
        )
    q, k, v = (_waited(x).transpose(1, 2) for x in (query, key, value))
    B, H, Lq, D = q.shape
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    ops.masked_attention(q, k, v, out=out.transpose(1, 2), scale=scale, lse=lse)
    return out, lse.transpose(1, 2)


def _waited(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a plain tensor: diffusers' ring attention hands over slices of an all-gather not yet
    waited on (torch's ``AsyncCollectiveTensor``), whose storage the op cannot read before the wait."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return x.trigger_wait() if isinstance(x, AsyncCollectiveTensor) else x


def _no_backward(*args, **kwargs):
    raise NotImplementedError("the supergen attention backend is for inference: it has no backward pass.")


def register_backend():
    """Register the ``"supergen"`` backend with diffusers' dispatcher (idempotent); returns its name member.

    ``AttentionBackendName`` is a closed ``str`` enum, so the member is added the way ``Enum`` builds
    its own: a ``str`` instance of the class with ``_name_``/``_value_``, entered in the member maps.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = AttentionBackendName._value2member_map_.get(BACKEND_NAME)
    if member is None:
        member = str.__new__(AttentionBackendName, BACKEND_NAME)
        member._name_ = BACKEND_NAME.upper()
        member._value_ = BACKEND_NAME
        member._sort_order_ = len(AttentionBackendName._member_names_)
        AttentionBackendName._member_map_[member._name_] = member
        AttentionBackendName._value2member_map_[BACKEND_NAME] = member
        AttentionBackendName._member_names_.append(member._name_)
    if _AttentionBackendRegistry._backends.get(member) is not _supergen_backend:
        # diffusers >= 0.36 asks whether a backend runs under its context parallelism (it does: Ulysses, and
        # ring with the kernel's log-sum-exp); earlier versions have no context parallelism and no such flag
        flags = inspect.signature(_AttentionBackendRegistry.register).parameters
        cp = {"supports_context_parallel": True} if "supports_context_parallel" in flags else {}
        _AttentionBackendRegistry.register(member, constraints=[], **cp)(_supergen_backend)
    return member


# --------------------------------------------------------------------------------------------------
# Route 2: CogVideoX's processor
# --------------------------------------------------------------------------------------------------


class CogVideoXMaskedAttnProcessor:
    """CogVideoX joint text+video self-attention with the attention itself done by supergen.

    Same inputs and outputs as diffusers' ``CogVideoXAttnProcessor2_0``: text tokens are prepended
    to the video tokens, RoPE (if given) rotates only the video part, and the result is split back
    into ``(video, text)``. The joint sequence is ``text_len + video_len`` tokens long, so a
    :func:`attention_masks` mask for it must cover the text tokens too.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from diffusers.models.embeddings import apply_rotary_emb

        n_text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, L, _ = joint.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, L, B)
            attention_mask = attention_mask.view(B, attn.heads, -1, attention_mask.shape[-1])

        # (B, L, H*D) projections viewed as (B, H, L, D).
        q, k, v = (
            proj(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # in place: q, k are fresh projections, no copy needed
            q[:, :, n_text:] = apply_rotary_emb(q[:, :, n_text:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, n_text:] = apply_rotary_emb(k[:, :, n_text:], image_rotary_emb)

        out = _attend(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3)  # free: _attend's buffer is (B, L, H, D)-contiguous
        out = attn.to_out[1](attn.to_out[0](out))
        text, video = out.split([n_text, L - n_text], dim=1)
        return video, text


# --------------------------------------------------------------------------------------------------
# Public switch
# --------------------------------------------------------------------------------------------------


def _attention_modules(transformer) -> dict:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return {
        name: m
        for name, m in transformer.named_modules()
        if isinstance(m, (Attention, AttentionModuleMixin)) and getattr(m, "processor", None) is not None
    }


def _route(transformer) -> tuple[str, dict]:
    """(route, the attention modules it replaces) for ``transformer``, or a TypeError saying why not."""
    name = type(transformer).__name__
    modules = _attention_modules(transformer)
    if not modules:
        raise TypeError(f"`{name}` has no diffusers attention modules to route.")
    if name in PROCESSOR_MODELS:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        odd = {type(m.processor).__name__ for m in modules.values()} - {
            CogVideoXAttnProcessor2_0.__name__,
            CogVideoXMaskedAttnProcessor.__name__,
        }
        if odd:
            raise TypeError(
                f"`{name}` uses attention processors {sorted(odd)}; supergen replaces only "
                f"CogVideoXAttnProcessor2_0 (unfuse QKV projections first)."
            )
        return "processor", modules
    # Only processors that dispatch are routed. The rest attend over text alone (HunyuanVideo's
    # token refiner) and stay on SDPA: no video tokens, so nothing to mask or cache there.
    dispatching = {n: m for n, m in modules.items() if hasattr(m.processor, "_attention_backend")}
    if dispatching:
        return "backend", dispatching
    raise TypeError(
        f"`{name}` is not supported by supergen attention: supported are {DISPATCH_MODELS + PROCESSOR_MODELS} "
        f"and models whose attention processors use diffusers' attention dispatcher."
    )


def enable_masked_attention(transformer):
    """Route every attention of ``transformer`` through :func:`supergen.ops.masked_attention`.

    Idempotent; affects this model only (diffusers' global default backend is left alone). With no
    :func:`attention_masks` in force the model's output equals its stock output. Returns the model.
    """
    if getattr(transformer, _ATTR, None) is not None:
        return transformer
    route, modules = _route(transformer)
    if route == "backend":
        member = register_backend()
        saved = {name: m.processor._attention_backend for name, m in modules.items()}
        for m in modules.values():
            m.processor._attention_backend = member
    else:
        saved = {name: m.processor for name, m in modules.items()}
        processor = CogVideoXMaskedAttnProcessor()
        for m in modules.values():
            m.set_processor(processor)
    setattr(transformer, _ATTR, (route, saved))
    return transformer


def disable_masked_attention(transformer):
    """Restore the attention ``transformer`` had before :func:`enable_masked_attention`; returns it."""
    state = getattr(transformer, _ATTR, None)
    if state is None:
        return transformer
    route, saved = state
    modules = _attention_modules(transformer)
    for name, previous in saved.items():
        if route == "backend":
            modules[name].processor._attention_backend = previous
        else:
            modules[name].set_processor(previous)
    setattr(transformer, _ATTR, None)
    return transformer


def is_enabled(transformer) -> bool:
    """Whether :func:`enable_masked_attention` is in effect on ``transformer``."""
    return getattr(transformer, _ATTR, None) is not None


__all__ = [
    "BACKEND_NAME",
    "CogVideoXMaskedAttnProcessor",
    "attention_masks",
    "disable_masked_attention",
    "enable_masked_attention",
    "is_enabled",
    "register_backend",
]
