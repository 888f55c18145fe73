"""Stage 1 under tile parallelism: rank 0's sketch shared with its generator state, the other ranks'
heartbeat while they wait, the guidance split over two ranks, and diffusers' context parallelism
over all of them (on request)."""

from __future__ import annotations

import datetime
from functools import partial

import torch

from .group import ParallelContext, _broadcast_from_rank0, _comm_device, _default_generator, _transfer


def share_sketch(ctx: ParallelContext, low: torch.Tensor | None, generator: torch.Generator | None,
                 device: torch.device | str) -> torch.Tensor:  # fmt: skip
    """Stage 1 runs once, on rank 0: its sketch latent ``low`` (``None`` on the other ranks) and the state
    of the random generator it drew from (``generator``, or ``device``'s default one) are broadcast, so
    every rank continues from the same sketch and draws the same re-noising noise. The other ranks wait
    instead of computing the same thing, and no rank can hold a different sketch (kernels that are not
    bitwise reproducible across GPUs or nodes would otherwise let them drift apart). Returns the sketch
    on ``device``; rank 0 counts the payload in ``ctx.stats.sketch_broadcast``."""
    import torch.distributed as dist

    comm = _comm_device(ctx)
    device = torch.device(device)
    data = _broadcast_from_rank0(ctx, low, "sketch")
    rng = generator if generator is not None else _default_generator(device)
    payload = rng.get_state().to(comm)  # the same size on every rank: the same kind of generator
    dist.broadcast(payload, src=0)
    if ctx.rank != 0:
        rng.set_state(payload.cpu())
    else:
        ctx.stats.sketch_broadcast = data.numel() * data.element_size()
    return low if ctx.rank == 0 else data.to(device)


def sketch_waiters_group(ctx: ParallelContext, runners: tuple[int, ...]):
    """The process group of rank 0 and the ranks that wait while ``runners`` run stage 1 (``None``
    where no rank waits). Every rank must call it (creating a group is collective)."""
    import torch.distributed as dist

    waiting = [r for r in range(ctx.world_size) if r not in runners]
    if not waiting:
        return None
    key = ("sketch", *runners)
    if key not in ctx.groups:  # once per generation (a calibration pass reuses it): a group is a communicator
        timeout = datetime.timedelta(seconds=float(ctx.config.timeout))  # not the default group's by default
        ctx.groups[key] = dist.new_group([0, *waiting], timeout=timeout)
    return ctx.groups[key]


class _WrapsForwards:
    """Between :meth:`_wrap` and :meth:`_unwrap`, each of ``self.modules`` calls ``self._call(forward, ...)``
    with its own ``forward`` (restored after, diffusers' hooks included)."""

    def __init__(self, modules):
        self.modules = [m for m in modules if m is not None]
        self._saved: list = []

    def _wrap(self) -> None:
        self._saved = [module.__dict__.get("forward") for module in self.modules]
        for module in self.modules:
            module.forward = partial(self._call, module.forward)

    def _unwrap(self) -> None:
        for module, saved in zip(self.modules, self._saved):
            if saved is None:
                del module.forward
            else:
                module.forward = saved
        self._saved = []


class SketchHeartbeat(_WrapsForwards):
    """Rank 0's progress through stage 1, for the ranks that wait for its sketch (:func:`wait_for_sketch`).

    A sketch of a real model is many minutes of forwards on rank 0 (and rank 1), longer than
    ``ParallelConfig.timeout``: a waiting rank blocked that long in one collective would be failed by
    the process group's timeout. So after each call of the model's transformer rank 0 sends a tiny
    all-reduce (one number) to the waiting ranks' group, and a last one when the sketch is done: the
    timeout then bounds the time between two forwards, not the sketch, and a rank 0 that raises or dies
    still makes the waiting ranks fail within it. Rank 1, computing half of each guidance pair
    (:class:`SketchGuidanceSplit`), is not in the group, so nothing waits for it mid-pair.
    """

    def __init__(self, ctx: ParallelContext, group, modules):
        super().__init__(modules)
        self.ctx, self.group = ctx, group

    def _beat(self, value: int) -> None:
        import torch.distributed as dist

        dist.all_reduce(torch.tensor([value], device=_comm_device(self.ctx)), op=dist.ReduceOp.MAX, group=self.group)

    def _call(self, forward, *args, **kwargs):
        out = forward(*args, **kwargs)
        self._beat(0)
        return out

    def __enter__(self) -> SketchHeartbeat:
        if self.group is not None:
            self._wrap()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._unwrap()
        if self.group is not None and exc_type is None:
            self._beat(1)  # done: the waiting ranks go on to the sketch's broadcast


def wait_for_sketch(ctx: ParallelContext, group) -> None:
    """On a rank that waits for stage 1: follow rank 0's :class:`SketchHeartbeat` until it says done."""
    import torch.distributed as dist

    while True:
        beat = torch.zeros(1, dtype=torch.int64, device=_comm_device(ctx))
        dist.all_reduce(beat, op=dist.ReduceOp.MAX, group=group)
        if int(beat):
            return


class _SketchPair(_WrapsForwards):
    """Two ranks computing stage 1 together (ranks 0 and 1, or this rank and ``peer``): the model's forwards
    are wrapped while inside, and each counts the forwards it computed and the bytes it sent; the higher
    rank of the two is ``second``; ``_learned`` maps an input signature to the output it learnt (shape,
    dtype, device, container)."""

    def __init__(self, ctx: ParallelContext, modules, peer: int | None = None):
        if peer is None and (ctx.rank not in (0, 1) or ctx.world_size < 2):
            raise ValueError(f"the sketch's guidance splits between ranks 0 and 1, not rank {ctx.rank}.")
        if peer is not None and not (0 <= peer < ctx.world_size and peer != ctx.rank):
            raise ValueError(f"rank {ctx.rank} cannot pair with rank {peer} of {ctx.world_size}.")
        super().__init__(modules)
        self.ctx, self.peer = ctx, 1 - ctx.rank if peer is None else peer
        self.second = ctx.rank > self.peer
        self.enabled = True
        self.forwards = 0  # forwards this rank computed
        self.sent = 0  # bytes this rank sent
        self._learned: dict = {}  # input signature -> (shape, dtype, device, rebuild)

    def __enter__(self):
        self._wrap()
        return self

    def __exit__(self, *exc) -> None:
        self._unwrap()


class SketchGuidanceSplit(_SketchPair):
    """Stage 1's two guidance forwards per step on two ranks, the stock pipeline unchanged.

    Ranks 0 and 1 both run the stock pipeline with this context around it. Where a pipeline runs
    classifier-free guidance as two calls of its transformer per step (Wan, HunyuanVideo's true CFG:
    the conditional call, then the unconditional one, on the same latent input; the adapter says so,
    ``ModelAdapter.sketch_guidance_pairs``), rank 0 computes the first call of each pair and rank 1 the
    second, at the same time: at the first call rank 1 returns at once an empty output, at the second
    the two ranks swap their outputs (one native-size output each, in the model's dtype), rank 1
    filling that empty output in place before the pipeline reads it. Both ranks then hold both outputs,
    computed by the stock forward from the pipeline's own arguments, and combine them with the
    pipeline's own arithmetic: the same latent as one process, for half the forwards per rank.

    Safeguards: each pair's second call must have the first's latent input and timestep (else this is
    not a guidance pair: the first pair of each input shape runs whole on both ranks, and a mismatch
    there turns the split off; a later mismatch, after an empty output went out, raises on both ranks,
    which see the same calls); the first pair of each input shape also learns the output's shape, dtype
    and container, which the later empty outputs take (and the computed ones are checked against).

    With ``peer``, the pair is this rank and ``peer`` (the lower one computing the first calls): under
    ``sketch_context`` each rank of one half of the ranks pairs with its counterpart in the other half,
    each half running its calls with context parallelism (:class:`SketchContextParallel`).
    """

    def __init__(self, ctx: ParallelContext, modules, peer: int | None = None):
        super().__init__(ctx, modules, peer)
        self._first = None  # (hidden_states, timestep, signature, split, output) of a pair's first call

    @staticmethod
    def _inputs(args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
        timestep = kwargs["timestep"] if "timestep" in kwargs else (args[1] if len(args) > 1 else None)
        return hidden, timestep

    @staticmethod
    def _output(out):
        """The output tensor of a transformer's return value and how to rebuild one around another
        tensor: ``(tensor,)`` (``return_dict=False``) or a one-field diffusers output."""
        if isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], torch.Tensor):
            return out[0], lambda t: (t,)
        keys = list(out.keys()) if hasattr(out, "keys") else []
        if len(keys) == 1 and isinstance(out[keys[0]], torch.Tensor):
            kind, key = type(out), keys[0]
            return out[key], lambda t: kind(**{key: t})
        return None, None

    @staticmethod
    def _same(a, b) -> bool:
        if a is b:
            return True
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return False
        return a == b

    def _call(self, forward, *args, **kwargs):
        if not self.enabled:
            self.forwards += 1
            return forward(*args, **kwargs)
        hidden, timestep = self._inputs(args, kwargs)
        if self._first is None:  # the first call of a pair
            signature = None
            if isinstance(hidden, torch.Tensor):
                signature = (tuple(hidden.shape), hidden.dtype, hidden.device)
            split = signature in self._learned
            if split and self.second:  # the second rank computes the second call instead
                shape, dtype, device, rebuild = self._learned[signature]
                empty = torch.empty(shape, dtype=dtype, device=device)  # filled at the second call
                self._first = (hidden, timestep, signature, True, empty)
                return rebuild(empty)
            out = forward(*args, **kwargs)
            self.forwards += 1
            self._first = (hidden, timestep, signature, split, out)
            return out
        first_hidden, first_timestep, signature, split, first_out = self._first
        self._first = None
        paired = signature is not None and self._same(hidden, first_hidden) and self._same(timestep, first_timestep)
        if not split:  # a pair run whole on both ranks: learn its output, or stop splitting
            out = forward(*args, **kwargs)
            self.forwards += 1
            (a, rebuild), (b, _) = self._output(first_out), self._output(out)
            if not paired or a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                self.enabled = False  # not (conditional, unconditional) pairs of one step: no split
            else:
                self._learned[signature] = (tuple(a.shape), a.dtype, a.device, rebuild)
            return out
        if not paired:
            raise RuntimeError(
                "split stage-1 guidance: the pipeline's transformer calls are not (conditional, unconditional) "
                "pairs on one latent input; run with ParallelConfig(split_guidance=False)."
            )
        shape, dtype, device, rebuild = self._learned[signature]
        if not self.second:  # this rank computed the first call; the second rank computed this one
            mine = self._output(first_out)[0]
            theirs = torch.empty(shape, dtype=dtype, device=device)
            self.sent += _transfer(self.ctx, {self.peer: [mine]}, {self.peer: [theirs]}, None)
            return rebuild(theirs)
        out = forward(*args, **kwargs)
        self.forwards += 1
        mine = self._output(out)[0]
        if mine is None or tuple(mine.shape) != shape or mine.dtype != dtype:
            raise RuntimeError(
                f"split stage-1 guidance: the second call's output {getattr(mine, 'shape', None)} "
                f"{getattr(mine, 'dtype', None)} differs from the first's {shape} {dtype}."
            )
        self.sent += _transfer(self.ctx, {self.peer: [mine]}, {self.peer: [first_out]}, None)
        return out


def _has_foreign_hooks(module) -> bool:
    """Whether ``module`` or a submodule carries diffusers hooks other than supergen's rotary one (a cache
    such as FirstBlockCache keeps state across calls, which splitting a call in two would change)."""
    from ..adapters.base import _ROPE_HOOK
    from ..cache import hook_names

    return any(name != _ROPE_HOOK for m in module.modules() for name in hook_names(m))


class SketchBatchSplit(_SketchPair):
    """Stage 1's batched guidance on two ranks, the stock pipeline unchanged, where the result is the
    same bit for bit.

    CogVideoX and LTX-Video run classifier-free guidance as one transformer call on a batch of both
    branches (``[uncond; cond]``; ``ModelAdapter.sketch_guidance_batched``). Ranks 0 and 1 both run
    the stock pipeline with this context around it: rank 0 computes the first half of each call's
    batch, rank 1 the second (every tensor argument whose first dimension is the call's batch is cut
    in two), and the two swap their halves, so both return the whole output. That equals the batched
    call only where the model's kernels give a sample the same bits in a batch of one as in a batch of
    two, which depends on the kernels (GPU matrix products may pick another algorithm for another
    size): so the first call of each input size runs whole on both ranks *and* in halves, and the split
    goes on only if both ranks' halves equal their slices of the whole call exactly; otherwise every
    call stays whole (the one-process result either way). Models with diffusers hooks (a cache such
    as FirstBlockCache keeps state across calls) are never split. ``forwards`` counts half-batch
    forwards (a whole call is two).
    """

    def __init__(self, ctx: ParallelContext, modules):
        super().__init__(ctx, modules)
        self.enabled = not any(_has_foreign_hooks(m) for m in self.modules)  # the same on both ranks

    def _half(self, args, kwargs, n: int):
        """This rank's half of a call's arguments: tensors whose first dimension is the batch ``n``."""
        lo, hi = (0, n // 2) if not self.second else (n // 2, n)

        def cut(v):
            return v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

        return [cut(a) for a in args], {k: cut(v) for k, v in kwargs.items()}

    def _agree(self, ok: bool) -> bool:
        """Both ranks' verdicts combined (both must hold)."""
        device = _comm_device(self.ctx)
        mine, theirs = torch.tensor([int(ok)], device=device), torch.zeros(1, dtype=torch.int64, device=device)
        _transfer(self.ctx, {self.peer: [mine]}, {self.peer: [theirs]}, None)
        return bool(ok) and bool(int(theirs))

    def _call(self, forward, *args, **kwargs):
        hidden, _ = SketchGuidanceSplit._inputs(args, kwargs)
        n = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else 0
        if not self.enabled or n < 2 or n % 2:
            self.forwards += 2
            return forward(*args, **kwargs)
        signature = (tuple(hidden.shape), hidden.dtype, hidden.device)
        if signature not in self._learned:  # whole, and in halves: does this model split exactly?
            out = forward(*args, **kwargs)
            whole, rebuild = SketchGuidanceSplit._output(out)
            half_args, half_kwargs = self._half(args, kwargs, n)
            half, _ = SketchGuidanceSplit._output(forward(*half_args, **half_kwargs))
            self.forwards += 3
            lo = 0 if not self.second else n // 2
            exact = whole is not None and half is not None and half.shape[0] == n // 2
            exact = exact and half.dtype == whole.dtype and torch.equal(half, whole[lo : lo + n // 2])
            if self._agree(exact):
                self._learned[signature] = (tuple(whole.shape), whole.dtype, whole.device, rebuild)
            else:
                self.enabled = False
            return out
        shape, dtype, device, rebuild = self._learned[signature]
        half_args, half_kwargs = self._half(args, kwargs, n)
        mine, _ = SketchGuidanceSplit._output(forward(*half_args, **half_kwargs))
        self.forwards += 1
        half = shape[0] // 2
        if mine is None or tuple(mine.shape) != (half, *shape[1:]) or mine.dtype != dtype:
            raise RuntimeError(
                f"split stage-1 guidance: a half-batch output {getattr(mine, 'shape', None)} "
                f"{getattr(mine, 'dtype', None)} is not half of the whole call's {shape} {dtype}."
            )
        full = torch.empty(shape, dtype=dtype, device=device)
        ours, theirs = (full[:half], full[half:]) if not self.second else (full[half:], full[:half])
        ours.copy_(mine)
        self.sent += _transfer(self.ctx, {self.peer: [ours]}, {self.peer: [theirs]}, None)  # contiguous halves
        return rebuild(full)


# Transformers whose context-parallel plan diffusers' Ulysses attention cannot run (up to diffusers 0.42.1): a
# per-head attention mask keeps all heads while the all-to-all leaves each rank a share of them.
_ULYSSES_MASK_HEADS = {"LTXVideoTransformer3DModel": "huggingface/diffusers#14316"}


# Transformers that pass an attention mask to the attention diffusers' context parallelism splits (LTX-Video's
# cross-attention): supergen's kernel returns no log-sum-exp under a mask, so ring cannot run on it.
_MASKED_CONTEXT_ATTENTION = frozenset({"LTXVideoTransformer3DModel"})


def sketch_context_split(ctx: ParallelContext, pairs: bool) -> tuple[int, int]:
    """``(groups, degree)`` of stage 1 under ``ParallelConfig.sketch_context``. Where the pipeline guides
    with two calls per step (``pairs``) and ``split_guidance`` is on, an even number of ranks splits in
    two halves, each computing one call of every pair with context parallelism over its half (CFG
    parallelism times Ulysses or ring, as xDiT composes them: the halves swap one output per step, with
    no transfer inside the layers, and each call's sequence is split half as many ways): ``(2, R / 2)``;
    at 2 ranks that is the guidance split alone. Otherwise one group over all ranks: ``(1, R)``."""
    R = ctx.world_size
    if pairs and ctx.config.split_guidance and R % 2 == 0:
        return 2, R // 2
    return 1, R


def check_sketch_context(ctx: ParallelContext, modules, token_counts: dict, degree: int | None = None) -> None:
    """Before any model work: whether stage 1 can run with diffusers' context parallelism of ``degree``
    ranks (default: all; :func:`sketch_context_split`; 1: none, nothing to check) for
    ``ParallelConfig.sketch_context``. ``token_counts`` maps each size the sketch's transformer sees (a
    name for the message) to its token count; raises ``ValueError`` naming what does not fit."""
    import diffusers
    from packaging.version import Version

    kind, world = ctx.config.sketch_context, ctx.world_size if degree is None else degree
    if world == 1:
        return
    for module in (m for m in modules if m is not None):
        name = type(module).__name__
        if not hasattr(module, "enable_parallelism"):
            raise ValueError(
                f"sketch_context={kind!r} needs diffusers' context parallelism (`enable_parallelism`), which "
                f"diffusers {diffusers.__version__}'s {name} lacks; upgrade diffusers or leave `sketch_context` unset."
            )
        if getattr(module, "_cp_plan", None) is None:
            raise ValueError(
                f"sketch_context={kind!r}: {name} has no context-parallel plan (`_cp_plan`; diffusers gives one to "
                "Wan and LTX-Video); leave `sketch_context` unset to run the sketch on rank 0."
            )
        if getattr(module, "_parallel_config", None) is not None:
            raise ValueError(f"sketch_context={kind!r}: {name} already has diffusers parallelism enabled.")
        backend = _attention_backend(module)
        if kind == "ring" and backend == "native":
            raise ValueError(
                f"sketch_context='ring' needs an attention backend that returns the log-sum-exp, and {name}'s is "
                "'native'; set one first (`transformer.set_attention_backend('_native_flash')` on a GPU, or supergen's "
                "kernel: `supergen.attention.enable_masked_attention(transformer)`), or use 'ulysses'."
            )
        if kind == "ring" and backend == "supergen" and name in _MASKED_CONTEXT_ATTENTION:
            raise ValueError(
                f"sketch_context='ring' on supergen's attention kernel: {name} passes an attention mask to the "
                "attention diffusers splits, and the kernel returns the log-sum-exp for plain attention only; set a "
                "backend that takes a mask (e.g. `transformer.set_attention_backend('_native_cudnn')` on a GPU), or "
                "leave `sketch_context` unset."
            )
        if kind == "ulysses" and name in _ULYSSES_MASK_HEADS and Version(diffusers.__version__) <= Version("0.42.1"):
            raise ValueError(
                f"sketch_context='ulysses': diffusers {diffusers.__version__}'s Ulysses attention does not split the "
                f"head axis of the cross-attention mask {name} passes ({_ULYSSES_MASK_HEADS[name]}), so its forward "
                "fails; use 'ring', or leave `sketch_context` unset."
            )
        heads = getattr(module.config, "num_attention_heads", None)
        if kind == "ulysses" and heads is not None and heads % world:
            raise ValueError(
                f"sketch_context='ulysses' splits the attention heads over the {world} ranks, but {name} has "
                f"{heads}; use 'ring', or a number of ranks per sequence dividing {heads} (the world size, or half "
                "of it where the ranks split guidance in halves)."
            )
    for what, tokens in token_counts.items():
        if tokens % world:
            raise ValueError(
                f"sketch_context={kind!r} splits the tokens over the {world} ranks, but the {what} has {tokens} "
                f"tokens; use a sketch size or world size whose token count divides evenly."
            )
    if accelerator_count() == 0:
        raise ValueError(
            f"sketch_context={kind!r} needs an accelerator per rank (diffusers places rank r on device r % count), "
            "and this machine has none; leave `sketch_context` unset to run the sketch on rank 0."
        )


def accelerator_count() -> int:
    """Accelerators on this machine as diffusers' context parallelism counts them (``torch.accelerator``,
    torch >= 2.6; 0 without it)."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.device_count() if accelerator is not None else 0


class SketchContextParallel(_WrapsForwards):
    """Stage 1 on every rank, each forward of the transformer(s) split along its token sequence over the
    ranks of its group with diffusers' context parallelism (``ParallelConfig.sketch_context``: Ulysses or
    ring attention of degree ``world_size / groups``; ``groups`` = 2: the halves of the ranks, each
    computing one call of every guidance pair, :func:`sketch_context_split`), the stock pipeline unchanged.

    Inside, the modules carry diffusers' context-parallel hooks (``enable_parallelism`` with the model's
    own ``_cp_plan``: inputs split along the sequence, outputs gathered, so every rank's pipeline sees
    whole tensors); on exit they are removed and the attention processors given back their previous
    parallel config, so that stage 2's tile forwards, each on one rank, run the model as before. The
    device mesh (``(groups, ring, ulysses)``) is made once per process group and kept (making one is
    collective). ``forwards`` counts the calls this rank took part in, each a ``1 / degree`` share of a
    forward's tokens.
    """

    def __init__(self, ctx: ParallelContext, modules, groups: int = 1):
        if groups < 1 or ctx.world_size % groups or ctx.world_size // groups < 2:
            raise ValueError(f"{ctx.world_size} ranks do not split in {groups} groups of 2 or more.")
        super().__init__(modules)
        self.ctx, self.forwards, self.groups = ctx, 0, groups
        self.degree = ctx.world_size // groups
        self._processors: list = []

    def _mesh(self):
        key = ("sketch_context", self.ctx.config.sketch_context, self.groups)
        if key not in self.ctx.groups:
            from torch.distributed.device_mesh import init_device_mesh

            ring_ulysses = (1, self.degree) if self.ctx.config.sketch_context == "ulysses" else (self.degree, 1)
            device_type = _comm_device(self.ctx).type
            self.ctx.groups[key] = init_device_mesh(
                device_type, (self.groups, *ring_ulysses), mesh_dim_names=("cfg", "ring", "ulysses")
            )
        return self.ctx.groups[key]

    def _call(self, forward, *args, **kwargs):
        self.forwards += 1
        return forward(*args, **kwargs)

    def __enter__(self) -> SketchContextParallel:
        from diffusers import ContextParallelConfig

        mesh, degree = self._mesh(), {f"{self.ctx.config.sketch_context}_degree": self.degree}
        try:
            for module in self.modules:
                self._processors += [(p, p._parallel_config) for p in _attention_processors(module)]
                module.enable_parallelism(config=ContextParallelConfig(**degree, mesh=mesh))
        except BaseException:
            self.__exit__(None, None, None)  # a module enabled before the failure goes back to how it was
            raise
        self._wrap()
        return self

    def __exit__(self, *exc) -> None:
        from diffusers.hooks.context_parallel import remove_context_parallel

        self._unwrap()
        for module in self.modules:
            if module._parallel_config is not None:
                remove_context_parallel(module, module._cp_plan)
                module._parallel_config = None
        for processor, previous in self._processors:
            processor._parallel_config = previous
        self._processors = []


def _attention_backend(module) -> str | None:
    """The name of the attention backend ``module``'s first dispatching processor uses (``None``: none)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for processor in _attention_processors(module):
        if hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend or _AttentionBackendRegistry.get_active_backend()[0]
            return getattr(backend, "value", str(backend))
    return None


def _attention_processors(module) -> list:
    """The attention processors of ``module`` that carry a diffusers parallel config."""
    out = []
    for m in module.modules():
        processor = getattr(m, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config") and processor not in out:
            out.append(processor)
    return out
