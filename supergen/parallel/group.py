"""The process group and this process's place in it: the run's context and byte counts, broadcasts from
rank 0, batched point-to-point transfers, and the start-up checks that every rank agrees."""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..config import ParallelConfig

if TYPE_CHECKING:
    from .vae import VaeBlocks


@dataclass
class ExchangeStats:
    """Bytes this rank sent, per refinement step and by kind (inputs, predictions, guidance branches of split
    tiles, migration, and the tile cache's window sums: the ring all-reduce's share of a rank,
    ``2 (R - 1) / R`` of the vector)."""

    per_step: list[dict] = field(default_factory=list)
    final_gather: int = 0
    sketch_broadcast: int = 0  # rank 0: the sketch latent it broadcast (:func:`share_sketch`)
    sketch_branches: int = 0  # ranks 0 and 1: stage 1's guidance outputs they swapped (:class:`SketchGuidanceSplit`)
    canvas_broadcast: int = 0  # rank 0: the canvas it broadcast when the ranks' differed (:func:`agree_on_canvas`)
    decode_broadcast: int = 0  # rank 0: the refined latent it broadcast to share the decode (:func:`decode_in_blocks`)
    decode_gather: int = 0  # the pixels of this rank's decode block, sent to rank 0
    encode_exchange: int = 0  # this rank's block of the upscale's encode, sent to every other rank

    def add(self, kind: str, nbytes: int) -> None:
        step = self.per_step[-1]
        step[kind] = step.get(kind, 0) + int(nbytes)

    def as_dict(self) -> dict:
        totals = [sum(s.values()) for s in self.per_step]
        return {
            "bytes_sent_per_step": totals,
            "bytes_sent_by_kind": {
                k: sum(s.get(k, 0) for s in self.per_step)
                for k in ("inputs", "predictions", "branches", "migration", "cache_stats")
            },
            "final_gather_bytes": self.final_gather,
            "sketch_broadcast_bytes": self.sketch_broadcast,
            "sketch_branches_bytes": self.sketch_branches,
            "canvas_broadcast_bytes": self.canvas_broadcast,
            "decode_broadcast_bytes": self.decode_broadcast,
            "decode_gather_bytes": self.decode_gather,
            "encode_exchange_bytes": self.encode_exchange,
        }


@dataclass
class ParallelContext:
    """This process's place in the run: ``world_size == 1`` means the plain single-process path."""

    rank: int = 0
    world_size: int = 1
    config: ParallelConfig = field(default_factory=ParallelConfig)
    stats: ExchangeStats = field(default_factory=ExchangeStats)
    computed_tiles: list[list[int]] = field(default_factory=list)  # per step: tiles computed by each rank
    # per step: the forwards each rank ran (a tile's guidance branches count one each, :func:`assign_branches`)
    forwards: list[list[int]] = field(default_factory=list)
    regions: str | None = None  # the region policy the last refinement ran with (``auto`` resolved)
    latents_rebuilt: bool = False  # following regions rebuilt the latents from the scheduler's history
    # a batched guidance forward's halves give its prediction exactly (None: not checked, no split possible)
    guidance_halves: bool | None = None
    # forwards this rank ran outside the steps' tiles: the check of those halves (one batched, two halves)
    probe_forwards: int = 0
    sketch_forwards: int | None = None  # forwards this rank ran (or took part in) when stage 1 was shared
    decode_plan: VaeBlocks | None = None  # how the ranks shared the final decode (:func:`decode_in_blocks`)
    groups: dict = field(default_factory=dict)  # process subgroups made for this run (:func:`sketch_waiters_group`)
    encode_plan: VaeBlocks | None = None  # and the upscale's encode (:func:`encode_in_blocks`)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def check_no_callback(self, callback) -> None:
        """No rank holds the whole canvas during a distributed refinement, so no step callback can see it."""
        if self.distributed and callback is not None:
            raise ValueError(
                f"`callback_on_step_end` is not available with tile parallelism (world size {self.world_size}): "
                "no rank holds the whole canvas during refinement."
            )


def setup(config: ParallelConfig, device: torch.device | str = "cpu") -> ParallelContext:
    """Join (or create) the process group from the launcher's environment; no group for one process."""
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"`parallel` must be a ParallelConfig or None but is {type(config).__name__}.")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an int but is {os.environ['WORLD_SIZE']!r}.") from None
    if world <= 1:
        return ParallelContext(config=config)
    import torch.distributed as dist

    device = torch.device(device)
    backend = config.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"backend 'nccl' needs the pipeline on a CUDA device but it runs on {device}; use 'gloo'.")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(config.timeout)))
        atexit.register(_destroy)
    elif dist.get_world_size() != world:
        raise ValueError(f"the process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}.")
    return ParallelContext(rank=dist.get_rank(), world_size=dist.get_world_size(), config=config)


def _flatten(value, prefix: str = "") -> dict:
    """Nested dicts as ``{"a.b": leaf}``, so that a mismatch names the leaf that differs."""
    if not isinstance(value, dict):
        return {prefix: value}
    out = {}
    for k, v in value.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _comm_device(ctx: ParallelContext) -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator ``torch.randn(..., generator=None, device=device)`` draws from."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _broadcast_layout(ctx: ParallelContext, t: torch.Tensor | None, what: str) -> tuple[tuple, torch.dtype]:
    """The shape and dtype of rank 0's tensor ``t`` (``None`` on the others) on every rank (8 numbers)."""
    import torch.distributed as dist

    meta = torch.zeros(8, dtype=torch.int64, device=_comm_device(ctx))
    if ctx.rank == 0:
        if t.dim() > 6 or t.dtype not in _DTYPES:
            raise ValueError(f"cannot share a {what} of shape {tuple(t.shape)} and dtype {t.dtype}.")
        meta[0], meta[1] = t.dim(), _DTYPES.index(t.dtype)
        meta[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(meta, src=0)
    ndim, code = int(meta[0]), int(meta[1])
    return tuple(int(s) for s in meta[2 : 2 + ndim]), _DTYPES[code]


def _broadcast_from_rank0(ctx: ParallelContext, t: torch.Tensor | None, what: str, layout=None) -> torch.Tensor:
    """Rank 0's tensor ``t`` (``None`` on the others) on every rank, on the backend's device: its shape and
    dtype first (unless every rank has them already: ``layout``), then the data."""
    import torch.distributed as dist

    comm = _comm_device(ctx)
    shape, dtype = layout if layout is not None else _broadcast_layout(ctx, t, what)
    data = t.to(comm).contiguous() if ctx.rank == 0 else torch.empty(shape, dtype=dtype, device=comm)
    dist.broadcast(data, src=0)
    return data


def agree_on_canvas(ctx: ParallelContext, latents: torch.Tensor) -> torch.Tensor:
    """The re-noised canvas each rank built from the shared sketch, made the same on every rank.

    Where the upscale's encode is not shared in blocks (:func:`encode_in_blocks`: a canvas of one VAE tile,
    an unknown VAE tiling), every rank runs it, which gives every rank the same canvas only where its
    kernels are bitwise reproducible. The ranks compare a checksum (sum and sum of
    squares in float64, two numbers each); if any rank's differs from rank 0's, rank 0 broadcasts its
    canvas to all (once, counted in ``ctx.stats.canvas_broadcast``) and the run goes on from it."""
    import torch.distributed as dist

    comm = _comm_device(ctx)
    mine = torch.zeros(2, dtype=torch.float64, device=latents.device)
    for frame in latents.detach().unbind(2):  # one latent frame in float64 at a time, not the canvas
        f = frame.double()
        mine += torch.stack([f.sum(), (f * f).sum()])
    mine = mine.to(comm)
    sums = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(sums, mine)
    if all(torch.equal(s, sums[0]) for s in sums[1:]):
        return latents
    data = latents.to(comm).contiguous()
    dist.broadcast(data, src=0)
    if ctx.rank == 0:
        ctx.stats.canvas_broadcast = data.numel() * data.element_size()
        return latents
    return data.to(latents.device)


def check_same_config(ctx: ParallelContext, settings: dict) -> None:
    """Raise ``ValueError`` on every rank unless every rank passes the same ``settings``.

    The ranks exchange a SHA-256 of the canonical JSON of ``settings`` (32 numbers each, before any
    generation work); only when the hashes differ are the settings themselves gathered, to name the
    differing keys and each rank's value.
    """
    if not ctx.distributed:
        return
    import torch.distributed as dist

    text = json.dumps(settings, sort_keys=True, default=repr)
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int32, device=_comm_device(ctx))
    hashes = [torch.empty_like(digest) for _ in range(ctx.world_size)]
    dist.all_gather(hashes, digest)
    if all(torch.equal(h, hashes[0]) for h in hashes):
        return
    everyone: list[dict] = [None] * ctx.world_size  # type: ignore[list-item]
    dist.all_gather_object(everyone, _flatten(json.loads(text)))
    keys = sorted({k for s in everyone for k in s})
    differing = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in everyone}) > 1]
    detail = "; ".join(
        f"{k}: " + ", ".join(f"rank {r}={s.get(k)!r}" for r, s in enumerate(everyone)) for k in differing
    )
    raise ValueError(f"the ranks were started with different settings ({detail}); every rank must get the same ones.")


def _transfer(ctx: ParallelContext, sends: dict, recvs: dict, kind: str | None) -> int:
    """One batch of point-to-point transfers: ``sends[peer]`` / ``recvs[peer]`` are lists of tensors
    (received in place). Tensors to one peer are packed per dtype into one message, in list order, on
    the backend's device. Returns the bytes sent and, with ``kind``, adds them to this step's stats."""
    import torch.distributed as dist

    device = _comm_device(ctx)
    ops, unpack, sent = [], [], 0
    for peer in sorted(set(sends) | set(recvs)):
        for tag, (_dtype, out) in enumerate(_by_dtype(sends.get(peer, []))):
            buf = torch.cat([t.reshape(-1).to(device) for t in out])
            if buf.numel():
                ops.append(dist.P2POp(dist.isend, buf, peer, tag=tag))
                sent += buf.numel() * buf.element_size()
        for tag, (dtype, into) in enumerate(_by_dtype(recvs.get(peer, []))):
            total = sum(t.numel() for t in into)
            if total:
                buf = torch.empty(total, dtype=dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, peer, tag=tag))
                unpack.append((buf, into))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for buf, into in unpack:
        offset = 0
        for t in into:
            t.copy_(buf[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
    if kind is not None:
        ctx.stats.add(kind, sent)
    return sent


def _by_dtype(tensors: list) -> list:
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return sorted(groups.items(), key=lambda kv: str(kv[0]))
