"""Where cells live and what moves, counted without a process group: home tiles and regions
(:class:`Layout`), window cells, the bytes an exchange or a migration sends (shared by the runtime and
``bench/parallel.py``), and the choice of region policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from ..config import ParallelConfig
from .assign import assign_branches, assign_tiles, fill_idle_slots


def _axis_delta(centres: torch.Tensor, size: int, wrap: bool) -> torch.Tensor:
    """(N, size) signed distance from every cell centre of an axis to each tile centre."""
    cells = torch.arange(size, dtype=torch.float64) + 0.5
    delta = cells[None, :] - centres[:, None]
    return torch.remainder(delta + size / 2, size) - size / 2 if wrap else delta


def home_tiles(origins: torch.Tensor, tile_hw, canvas_hw, wrap: bool) -> torch.Tensor:
    """``(H, W)`` index of each cell's home tile: of the tiles covering it, the one whose centre is
    nearest (max of the per-axis distances in tile units; ties to the lower index). Overlaps split in
    the middle, so each side of an overlap needs half of it as halo."""
    h, w = tile_hw
    H, W = canvas_hw
    origins = origins.to("cpu", torch.float64)
    dy = _axis_delta(origins[:, 0] + h / 2, H, wrap)
    dx = _axis_delta(origins[:, 1] + w / 2, W, wrap)
    inside = (dy.abs() < h / 2)[:, :, None] & (dx.abs() < w / 2)[:, None, :]
    dist = torch.maximum((dy.abs() / h)[:, :, None], (dx.abs() / w)[:, None, :])
    dist = torch.where(inside, dist, torch.inf)
    home = dist.argmin(dim=0)
    if bool(torch.isinf(dist.gather(0, home[None])).any()):
        raise ValueError("the tile windows do not cover the canvas; every cell needs a tile.")
    return home


def window_cells(origins: torch.Tensor, tile_hw, canvas_hw, wrap: bool) -> torch.Tensor:
    """``(N, h * w)`` flat canvas index (``row * W + col``) of every window cell, window row-major."""
    h, w = tile_hw
    H, W = canvas_hw
    rows = origins[:, 0:1].to(torch.int64) + torch.arange(h)
    cols = origins[:, 1:2].to(torch.int64) + torch.arange(w)
    if wrap:
        rows, cols = rows % H, cols % W
    return (rows[:, :, None] * W + cols[:, None, :]).reshape(origins.shape[0], h * w)


def _owned_counts(owner: torch.Tensor, windows: torch.Tensor, world_size: int) -> torch.Tensor:
    """``(N, world)`` cells of each window owned by each rank."""
    N = windows.shape[0]
    pairs = owner[windows] + world_size * torch.arange(N)[:, None]  # (tile, owner) as one index
    return torch.bincount(pairs.flatten(), minlength=N * world_size).view(N, world_size)


def fixed_owner(grid, world_size: int, steps: int, rebalance: bool = True) -> torch.Tensor:
    """``(H * W,)`` owner of each cell for regions that stay fixed over a run of ``steps`` grid placements.

    Candidates, each a balanced partition: runs of the first step's home tiles in row-major order (the
    regions ``follow`` starts from) and in column-major order, bands of rows, bands of columns, and
    blocks of ``r x c`` with ``r * c == world_size``. Chosen: the one under which the busiest rank sends
    the fewest cells (:func:`exchange_bytes` with every tile computed and assigned as the run assigns
    them, ``rebalance``), summed over the steps; ties to the earlier candidate. Deterministic, so every
    rank picks the same."""
    _, H, W = grid.canvas
    R = world_size
    first = grid.at_step(0)
    N = first.shape[0]
    home = home_tiles(first, grid.tile, (H, W), grid.wrap).flatten()
    rows = torch.arange(H).repeat_interleave(W)
    cols = torch.arange(W).repeat(H)
    nx = len(set(first[:, 1].tolist()))  # the first step's tiles are row-major over a full product grid
    n = torch.arange(N)
    column_major = (n % nx) * (N // nx) + n // nx
    candidates = [home_ranks(N, R)[home], (column_major * R // N)[home], rows * R // H, cols * R // W]
    candidates += [(rows * r // H) * (R // r) + cols * (R // r) // W for r in range(2, R) if R % r == 0]
    placements = [grid.at_step(i) for i in range(steps)]
    best, best_cost = None, None
    for owner in candidates:
        cost = 0
        for origins in placements:
            layout = Layout.with_owner(origins, grid.tile, (H, W), grid.wrap, R, owner)
            cost += int(sum(exchange_bytes(layout, computers(layout, None, rebalance), 1).values()).max())
        if best_cost is None or cost < best_cost:
            best, best_cost = owner, cost
    return best


def home_ranks(num_tiles: int, world_size: int, rotation: int = 0) -> torch.Tensor:
    """``(N,)`` home rank of each tile: contiguous runs of the row-major order started at ``rotation``,
    balanced by count (sizes differ by at most one; with more ranks than tiles some ranks own none)."""
    position = (torch.arange(num_tiles) - rotation) % num_tiles
    return position * world_size // num_tiles


@dataclass
class Layout:
    """Where everything lies at one refinement step (identical on every rank)."""

    origins: torch.Tensor  # (N, 2)
    tile_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    world_size: int
    home_rank: torch.Tensor  # (N,) rank owning each tile
    owner: torch.Tensor  # (H * W,) rank owning each cell
    windows: torch.Tensor  # (N, h * w) flat canvas cells of each window
    rotation: int

    @classmethod
    def at_step(cls, grid, step: int, world_size: int, previous: Layout | None = None,
                regions: str = "follow") -> Layout:  # fmt: skip
        return cls.build(grid.at_step(step), grid.tile, grid.canvas[1:], grid.wrap, world_size, previous, regions)

    @classmethod
    def build(cls, origins, tile_hw, canvas_hw, wrap, world_size, previous: Layout | None = None,
              regions: str = "follow") -> Layout:  # fmt: skip
        """The layout of a step whose tiles lie at ``origins``. Without ``previous`` (the first step), or
        with ``regions="follow"``, regions are runs of home tiles (they follow the grid); with
        ``regions="fixed"`` the cells keep ``previous``'s owners and each tile's home rank is the one
        owning most of its window (ties to the lower rank)."""
        tile_hw, canvas_hw = tuple(tile_hw), tuple(canvas_hw)
        if regions not in ("fixed", "follow"):
            raise ValueError(f"`regions` must be 'fixed' or 'follow' but is {regions!r}.")
        if regions == "fixed" and previous is not None:
            return cls.with_owner(origins, tile_hw, canvas_hw, wrap, world_size, previous.owner, previous.rotation)
        home = home_tiles(origins, tile_hw, canvas_hw, wrap).flatten()
        windows = window_cells(origins, tile_hw, canvas_hw, wrap)
        N = origins.shape[0]
        # Regions may wrap only on the torus; there, the runs of home tiles are rotated, or each tile
        # inherits the rank owning most of its window before (where that is as balanced: when an axis's
        # shift wraps round, the row-major order of the same windows changes, which no rotation undoes),
        # whichever moves fewest cells.
        candidates = [(home_ranks(N, world_size, 0), 0)]
        if wrap and previous is not None and world_size > 1:
            candidates += [(home_ranks(N, world_size, rotation), rotation) for rotation in range(1, N)]
            inherited = _owned_counts(previous.owner, windows, world_size).argmax(dim=1)
            balanced = torch.bincount(candidates[0][0], minlength=world_size).sort().values
            if torch.equal(torch.bincount(inherited, minlength=world_size).sort().values, balanced):
                candidates.append((inherited, previous.rotation))
        best = None
        for ranks, rotation in candidates:
            owner = ranks[home]
            moved = 0 if previous is None else int((owner != previous.owner).sum())
            if best is None or moved < best[0]:
                best = (moved, rotation, ranks, owner)
        _, rotation, ranks, owner = best
        return cls(origins, tile_hw, canvas_hw, world_size, ranks, owner, windows, rotation)

    @classmethod
    def with_owner(cls, origins, tile_hw, canvas_hw, wrap, world_size, owner, rotation: int = 0) -> Layout:
        """The layout of tiles at ``origins`` over cells owned as ``owner`` says: each tile's home rank is
        the one owning most of its window (ties to the lower rank)."""
        tile_hw, canvas_hw = tuple(tile_hw), tuple(canvas_hw)
        windows = window_cells(origins, tile_hw, canvas_hw, wrap)
        ranks = _owned_counts(owner, windows, world_size).argmax(dim=1)  # the first maximum
        return cls(origins, tile_hw, canvas_hw, world_size, ranks, owner, windows, rotation)

    @classmethod
    def first(cls, grid, world_size: int, steps: int, regions: str, rebalance: bool = True,
              owner: torch.Tensor | None = None) -> Layout:  # fmt: skip
        """The first step's layout of a run of ``steps`` under ``regions`` (``fixed`` or ``follow``);
        ``owner``: fixed regions already chosen by :func:`fixed_owner`."""
        if regions == "fixed":
            return cls.fixed(grid, world_size, steps, rebalance, owner)
        return cls.at_step(grid, 0, world_size)

    @classmethod
    def fixed(cls, grid, world_size: int, steps: int, rebalance: bool = True,
              owner: torch.Tensor | None = None) -> Layout:  # fmt: skip
        """The first step's layout with fixed regions (``owner``, else :func:`fixed_owner` over the
        run's ``steps``)."""
        owner = fixed_owner(grid, world_size, steps, rebalance) if owner is None else owner
        return cls.with_owner(grid.at_step(0), grid.tile, grid.canvas[1:], grid.wrap, world_size, owner)

    @property
    def num_tiles(self) -> int:
        return self.origins.shape[0]

    def cells(self, rank: int) -> torch.Tensor:
        """Sorted flat canvas cells owned by ``rank``."""
        return (self.owner == rank).nonzero().flatten()

    def local_index(self, rank: int) -> torch.Tensor:
        """``(H * W,)`` position of each cell in ``rank``'s region tensor (``-1`` where not owned)."""
        index = torch.full_like(self.owner, -1)
        cells = self.cells(rank)
        index[cells] = torch.arange(cells.numel())
        return index

    @cached_property
    def move_cells(self) -> list[list[int]]:
        """``[n][r]``: cells that would travel (halo in + predictions out) if rank ``r`` computed tile ``n``;
        computed once per layout (the tile assignment and the guidance split both read it)."""
        owners = self.owner[self.windows]  # (N, h * w)
        foreign = (owners[:, :, None] != torch.arange(self.world_size)).sum(dim=1)
        return (2 * foreign).tolist()

    def needs(self, computer: torch.Tensor, helper: torch.Tensor | None = None) -> torch.Tensor:
        """``(world, H * W)`` bool: the window cells each rank's computed tiles read (the tiles whose
        second guidance branch it runs, ``helper``, too)."""
        need = torch.zeros((self.world_size, self.owner.numel()), dtype=torch.bool)
        for assigned in (computer,) if helper is None else (computer, helper):
            for n, r in enumerate(assigned.tolist()):
                if r >= 0:
                    need[r, self.windows[n]] = True
        return need

    def input_cells(self, computer: torch.Tensor, sender: int, receiver: int, need=None) -> torch.Tensor:
        """Sorted cells ``sender`` owns that ``receiver``'s computed tiles read (the input halo)."""
        need = self.needs(computer) if need is None else need
        return (need[receiver] & (self.owner == sender)).nonzero().flatten()

    def output_positions(self, tile: int, rank: int) -> torch.Tensor:
        """Window-local positions of ``tile``'s cells that ``rank`` owns (window row-major)."""
        return (self.owner[self.windows[tile]] == rank).nonzero().flatten()


def exchange_bytes(layout: Layout, computer: torch.Tensor, cell_bytes: int, next_layout: Layout | None = None,
                   state_tensors: int = 1, cache_cell_bytes: int = 0, cache_reductions: int = 0,
                   halo_cell_bytes: int | None = None, prediction_cell_bytes: int | None = None,
                   helper: torch.Tensor | None = None,
                   branch_cell_bytes: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """``(world,)`` bytes each rank sends in one step, by kind: ``inputs`` (halo cells its tiles' other
    computers read), ``predictions`` (its tiles' predictions for cells other ranks own), ``branches``
    (with ``helper``, :func:`assign_branches`: the second guidance branch of a split tile, its whole
    window, from the helper to the computer, ``branch_cell_bytes`` a cell: the model's output dtype,
    default the predictions'), with
    ``next_layout`` ``migration`` (``state_tensors`` region-shaped tensors plus ``cache_cell_bytes`` of
    tile-cache state per cell changing owner, :func:`tile_cache_cell_bytes`) and ``cache_stats``
    (``cache_reductions`` all-reduces of the tile cache's window sums, :func:`window_sums_bytes`).
    ``cell_bytes`` is one cell of one latent-shaped tensor (``B * C * T * element size``);
    ``halo_cell_bytes``/``prediction_cell_bytes`` (default ``cell_bytes``) the same in the dtypes the
    halos and predictions travel in (:func:`_halo_dtype`, the model's dtype). The runtime moves exactly
    these (bench/parallel.py counts with this function; tests compare it with what the ranks sent)."""
    R = layout.world_size
    need = layout.needs(computer, helper)
    inputs = torch.zeros(R, dtype=torch.int64)
    predictions = torch.zeros(R, dtype=torch.int64)
    branches = torch.zeros(R, dtype=torch.int64)
    migration = torch.zeros(R, dtype=torch.int64)
    for q in range(R):
        owned = layout.owner == q
        inputs[q] = sum(int((need[r] & owned).sum()) for r in range(R) if r != q)
    for n, r in enumerate(computer.tolist()):
        if r >= 0:
            predictions[r] += int((layout.owner[layout.windows[n]] != r).sum())
    if helper is not None:
        for n, q in enumerate(helper.tolist()):
            if q >= 0:
                branches[q] += layout.windows[n].numel()
    if next_layout is not None:
        moved = layout.owner != next_layout.owner
        migration = torch.bincount(layout.owner[moved], minlength=R) * (state_tensors * cell_bytes + cache_cell_bytes)
    stats = torch.full((R,), cache_reductions * window_sums_bytes(layout.num_tiles, R), dtype=torch.int64)
    halo = cell_bytes if halo_cell_bytes is None else halo_cell_bytes
    prediction = cell_bytes if prediction_cell_bytes is None else prediction_cell_bytes
    branch = prediction if branch_cell_bytes is None else branch_cell_bytes
    return {"inputs": inputs * halo, "predictions": predictions * prediction, "branches": branches * branch,
            "migration": migration, "cache_stats": stats}  # fmt: skip


def _ring_share(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` (reduce-scatter + all-gather)."""
    return round(2 * (world - 1) / world * nbytes)


def window_sums_bytes(num_tiles: int, world: int) -> int:
    """Bytes a rank sends per all-reduce of the tile cache's ``(N + 1) x 11`` float64 window sums."""
    from ..cache import WINDOW_SUM_COLUMNS

    return _ring_share((num_tiles + 1) * WINDOW_SUM_COLUMNS * 8, world)


def tile_cache_cell_bytes(cache, like: torch.Tensor, prediction_dtype: torch.dtype | None = None) -> int:
    """Bytes of a :class:`supergen.cache.TileCache`'s region state per cell, for cells of ``like``
    ``(B, C, T, K)`` and predictions in ``prediction_dtype`` (default ``like``'s; what migrates with each
    cell changing owner): measured on a one-cell holder."""
    probe = type(cache)(cache.config)
    probe.start_cells(like[..., :1], prediction_dtype)
    probe.set_input_change(torch.zeros(1, dtype=torch.float64, device=like.device))
    return sum(t.numel() * t.element_size() for t in probe.cell_state().values())


# The share of tiles the gate is assumed to compute when choosing regions (it learns its skips only as
# the run goes; the budget policy's share is its budget).
GATE_SHARE = 0.5


SKIP_DRAWS = 2  # simulated skip patterns per step when choosing regions with the tile cache


def random_skips(layout: Layout, step: int, steps: int, cache, draw: int, fill_idle: bool = True,
                 rebalance: bool = True, branches: int = 1) -> torch.Tensor | None:  # fmt: skip
    """``(N,)`` bool: a seeded random skip pattern of the tile cache ``cache`` at ``step`` (``None`` where it
    computes every tile): its budget's share of the tiles (:data:`GATE_SHARE` for the gate), anywhere,
    then the idle slots filled as the run fills them (:func:`fill_idle_slots`). Used to count the region
    policies before the loop, when the real skips are not known; the same on every rank."""
    if cache is None or not cache.decides(step, steps):
        return None
    N = layout.num_tiles
    share = cache.config.budget if cache.config.mode == "budget" else GATE_SHARE
    g = torch.Generator().manual_seed(draw * 1_000_003 + step)
    compute = torch.zeros(N, dtype=torch.bool)
    compute[torch.randperm(N, generator=g)[: math.ceil(share * N)]] = True
    if fill_idle:
        priority = torch.rand(N, generator=g)
        compute = fill_idle_slots(compute, priority, layout.home_rank, layout.world_size, rebalance, branches)
    return compute


def count_regions(grid, world_size: int, steps: int, regions: str, cell_bytes: int, state_cell_bytes: int,
                  halo_cell_bytes: int, prediction_cell_bytes: int, rebalance: bool = True,
                  owner: torch.Tensor | None = None, latents_migrate: bool = True, cache=None,
                  fill_idle: bool = True, split: bool = False,
                  branch_cell_bytes: int | None = None) -> int:  # fmt: skip
    """Bytes the busiest rank sends over a run of ``steps`` under ``regions`` (``state_cell_bytes``: what
    migrates with a cell besides its latent, for ``follow``, and the latent too unless
    ``latents_migrate`` is false, :func:`probe_scheduler`; ``owner``: fixed regions already
    chosen). Every tile computed; with a tile ``cache``, the sum over :data:`SKIP_DRAWS` of its
    :func:`random_skips` patterns (rebalancing moves computed tiles, which costs bytes); ``split``:
    guidance branches split across ranks where that shortens a step (:func:`assign_branches`), a split
    tile's branch output ``branch_cell_bytes`` a cell (default ``prediction_cell_bytes``)."""
    split = split and rebalance
    total = 0
    for draw in range(SKIP_DRAWS if cache is not None else 1):
        layout = Layout.first(grid, world_size, steps, regions, rebalance, owner)
        for i in range(steps):
            nxt = Layout.at_step(grid, i + 1, world_size, previous=layout, regions=regions) if i + 1 < steps else None
            compute = random_skips(layout, i, steps, cache, draw, fill_idle, rebalance, 2 if split else 1)
            computer = computers(layout, compute, rebalance)
            helper = branch_helpers(layout, computer) if split else None
            sent = exchange_bytes(layout, computer, cell_bytes, nxt, state_tensors=int(latents_migrate),
                                  cache_cell_bytes=state_cell_bytes, halo_cell_bytes=halo_cell_bytes,
                                  prediction_cell_bytes=prediction_cell_bytes, helper=helper,
                                  branch_cell_bytes=branch_cell_bytes)  # fmt: skip
            total += int(sum(sent.values()).max())
            layout = nxt
    return total


def choose_regions(config: ParallelConfig, grid, world_size: int, steps: int, cell_bytes: int, state_cell_bytes: int,
                   halo_cell_bytes: int, prediction_cell_bytes: int, latents_migrate: bool = True,
                   cache=None, split: bool = False, owner: torch.Tensor | None = None,
                   branch_cell_bytes: int | None = None) -> tuple[str, torch.Tensor | None]:  # fmt: skip
    """``(regions, owner)``: ``config.regions``, or for ``auto`` the policy under which the busiest rank
    sends fewer bytes over the run (:func:`count_regions`: every tile computed, or with the tile
    ``cache`` its simulated skips; ties to ``fixed``); ``owner`` is the fixed regions :func:`fixed_owner`
    chose on the way (``None`` when not chosen here), for the run to start from instead of choosing
    them again (or, given, the candidate fixed regions). Deterministic."""
    if config.regions != "auto":
        return config.regions, None
    sizes = (cell_bytes, state_cell_bytes, halo_cell_bytes, prediction_cell_bytes, config.rebalance)
    owner = fixed_owner(grid, world_size, steps, config.rebalance) if owner is None else owner
    skips = {"cache": cache, "fill_idle": config.fill_idle, "split": split, "branch_cell_bytes": branch_cell_bytes}
    fixed = count_regions(grid, world_size, steps, "fixed", *sizes, owner=owner, **skips)
    follow = count_regions(grid, world_size, steps, "follow", *sizes, latents_migrate=latents_migrate, **skips)
    return ("fixed", owner) if fixed <= follow else ("follow", None)


def computers(layout: Layout, compute: torch.Tensor | None, rebalance: bool) -> torch.Tensor:
    """``(N,)`` rank computing each tile this step (``-1``: skipped). ``compute``: ``(N,)`` bool from the
    cache (``None`` = every tile); skipped tiles cost nothing, computed tiles one forward each."""
    N = layout.num_tiles
    costs = [1.0] * N if compute is None else [1.0 if bool(c) else 0.0 for c in compute]
    if not rebalance:
        return torch.where(torch.tensor(costs) > 0, layout.home_rank, -1)
    return assign_tiles(costs, layout.home_rank, layout.move_cells, layout.world_size)


def branch_helpers(layout: Layout, computer: torch.Tensor) -> torch.Tensor:
    """:func:`assign_branches` for this step's ``computer`` (``(N,)``; ``-1``: not split)."""
    return assign_branches(computer, layout.move_cells, layout.world_size)
