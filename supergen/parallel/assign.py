"""Rebalancing: which rank computes which tile (longest first, own tiles first, fewest bytes moved),
which rank runs a split tile's second guidance branch, and which idle slots compute skipped tiles."""

from __future__ import annotations

import math

import torch


def fill_idle_slots(
    compute: torch.Tensor, priority: torch.Tensor | None, home_rank, world_size: int, rebalance: bool = True,
    branches: int = 1,
) -> torch.Tensor:  # fmt: skip
    """``compute`` plus the skipped tiles that ranks would otherwise idle for: ``(N,)`` bool.

    A step lasts as long as its busiest rank's forwards: ``ceil(C / R)`` tiles for ``C`` computed tiles
    with rebalancing (:func:`assign_tiles` reaches it for equal costs), the largest home count without;
    with ``branches=2`` (guidance split across ranks, :func:`assign_branches`) ``ceil(2 C / R)`` branch
    forwards. Every rank can compute that many at no cost in time, so skipped tiles are added, highest
    ``priority`` (the cache's predicted change) first, until the ranks' slots are full (at most all
    ``N``): first only tiles whose home rank still has room for the whole tile (they move no bytes),
    then, with rebalancing, any tile (the assignment sends it to a rank with room). Deterministic, like
    the decision it extends, so every rank gets the same set. One rank: ``compute`` unchanged.
    """
    compute = compute.clone()
    N, R, k = compute.numel(), world_size, branches if rebalance else 1
    C = int(compute.sum())
    if priority is None or R <= 1 or C == 0 or C == N:
        return compute
    home = [int(r) for r in home_rank]
    load = [0] * R
    for n in compute.nonzero().flatten().tolist():
        load[home[n]] += k
    slots = math.ceil(k * C / R) if rebalance else max(load)  # in forwards
    target = min(N, slots * R // k)  # every rank's slots full (without rebalancing, as far as its own tiles go)
    order = sorted((n for n in range(N) if not compute[n]), key=lambda n: (-float(priority[n]), n))
    for n in order:  # 1. tiles whose home rank has room: no bytes move
        if C < target and load[home[n]] + k <= slots:
            compute[n], C = True, C + 1
            load[home[n]] += k
    if rebalance:  # 2. what is left goes where the assignment finds room
        for n in order:
            if C < target and not compute[n]:
                compute[n], C = True, C + 1
    return compute


def assign_tiles(costs, home_rank, move_cells, world_size: int) -> torch.Tensor:
    """``(N,)`` rank computing each tile (``-1`` for tiles of cost 0: skipped, computed by nobody).

    Longest processing time first, with two preferences: a rank keeps its own tiles (costliest first;
    among equal costs the ones dearest to move elsewhere, ``move_cells[n][q] - move_cells[n][home]``)
    while its load stays within its fair share ``sum(costs) / world``; every other tile goes to a
    least-loaded rank, costliest first, and among tiles of equal cost and equally loaded ranks the
    pair that moves the fewest cells (``move_cells[n][r]``) goes first, then the lowest tile and rank.
    Deterministic: every rank computes the same answer.
    """
    costs = [float(c) for c in costs]
    home = [int(r) for r in home_rank]
    N, R = len(costs), world_size
    share = sum(costs) / R
    load = [0.0] * R
    computer = [-1] * N

    def dearness(n: int) -> int:  # cells it moves beyond staying home, if it had to go anywhere
        others = [int(move_cells[n][q]) for q in range(R) if q != home[n]]
        return (min(others) if others else 0) - int(move_cells[n][home[n]])

    keep = sorted((n for n in range(N) if costs[n] > 0), key=lambda n: (-costs[n], -dearness(n), n))
    for n in keep:  # 1. keep own tiles up to the fair share
        r = home[n]
        if load[r] + costs[n] <= share * (1 + 1e-9):
            computer[n] = r
            load[r] += costs[n]
    rest = [n for n in keep if computer[n] < 0]
    while rest:  # 2. LPT for the rest: costliest first, each to a least-loaded rank, cheapest move first
        top = max(costs[n] for n in rest)
        low = min(load)
        ranks = [q for q in range(R) if load[q] == low]
        _, n, r = min((int(move_cells[n][q]), n, q) for n in rest if costs[n] == top for q in ranks)
        computer[n] = r
        load[r] += costs[n]
        rest.remove(n)
    return torch.tensor(computer, dtype=torch.int64)


def assign_branches(computer: torch.Tensor, move_cells, world_size: int) -> torch.Tensor:
    """``(N,)`` rank running the second guidance branch of each tile (``-1``: its computer runs both).

    With classifier-free guidance a tile is two forwards (conditional, unconditional) whose outputs
    combine elementwise, so they may run on two ranks (xDiT's "CFG parallel"). Whole tiles leave
    ``2 ceil(C / R)`` forwards on the busiest rank (4 tiles on 8 ranks: 2, and 4 ranks idle); split
    branches reach ``ceil(2 C / R)`` (1). Each rank above that (in rank order) hands the second branch
    of one of its tiles to a rank with room, choosing the tile and helper whose window moves the fewest
    cells (``move_cells[n][q]``: a helper owning part of the window needs less of it), then the
    least-loaded helper, the first tile, the lowest rank, until it is at ``ceil(2 C / R)``; nothing is
    split where it would not shorten the step. A split tile costs its window's input on the helper and
    one tile of branch output sent back to the computer, which combines the two (the adapter's own
    arithmetic, so the result is the single-process one). Deterministic: every rank computes the same
    answer.
    """
    R = world_size
    comp = [int(r) for r in computer]
    helper = [-1] * len(comp)
    C = sum(r >= 0 for r in comp)
    if R <= 1 or C == 0:
        return torch.tensor(helper, dtype=torch.int64)
    slots = math.ceil(2 * C / R)
    load = [0] * R
    for r in comp:
        if r >= 0:
            load[r] += 2
    for r in range(R):
        while load[r] > slots:  # from assign_tiles (at most ceil(C/R) tiles a rank) this always ends there
            pairs = [(int(move_cells[n][q]), load[q], n, q) for n in range(len(comp)) if comp[n] == r and helper[n] < 0
                     for q in range(R) if q != r and load[q] < slots]  # fmt: skip
            if not pairs:  # an unbalanced ``computer``: every tile of r already split
                break
            _, _, n, q = min(pairs)
            helper[n] = q
            load[r] -= 1
            load[q] += 1
    return torch.tensor(helper, dtype=torch.int64)


def forwards_per_rank(computer: torch.Tensor, helper: torch.Tensor | None, world_size: int,
                      branches: int = 1) -> list[int]:  # fmt: skip
    """Forwards each rank runs: ``branches`` per tile it computes whole, one per branch of a split tile."""
    load = [0] * world_size
    for n, r in enumerate(computer.tolist()):
        if r >= 0:
            split = helper is not None and int(helper[n]) >= 0
            load[r] += 1 if split else branches
            if split:
                load[int(helper[n])] += 1
    return load
