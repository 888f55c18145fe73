"""TileGrid: where the native-size tiles of a canvas lie at each refinement step.

Geometry, per spatial axis of ``size`` cells cut into tiles of ``tile`` cells overlapping by
``overlap``:

* **Count.** ``n = ceil((size - overlap) / (tile - overlap))`` tiles (clamp) or
  ``ceil(size / (tile - overlap))`` (torus, where the last tile also overlaps the first). One tile
  when ``tile == size``.
* **Placement.** Origins are spread evenly (rounded to the model's patch multiple): the torus at
  ``k * size / n``, clamp from 0 to ``size - tile``. When the sizes divide evenly, neighbours overlap
  by exactly ``overlap`` and the blend ramps sum to one without normalisation.
* **Shifting.** Each axis moves by its own step ``s`` — a multiple of the patch that divides the tile,
  the smallest whose period ``tile / s`` fits in ``shift_period`` — so over one period the tile edges
  visit every multiple of ``s`` inside a tile: every row/column band of ``s`` cells is crossed by an
  edge, and (for evenly divided canvases) each cell lies on an edge at most once. The published
  method's single 16-step cycle of 5 rows on a 90-row tile never crosses a 10-row band; a per-axis
  period is the fix. An axis with a single tile does not shift (its edge is the canvas border).
* **Clamp + shift.** Windows stay inside the canvas: a shifted window that would wrap is replaced by
  the two border windows covering the same cells (one more tile on that axis at such steps); the
  blend normalisation absorbs the extra overlap at the borders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import BOUNDARIES, TilingConfig, as_pair


@dataclass(frozen=True)
class AxisPlan:
    """The tiling of one spatial axis."""

    size: int
    tile: int
    overlap: int
    origins: tuple[int, ...]  # unshifted origins
    step: int  # shift step in cells (0 = this axis never shifts)
    period: int  # shift events per full cycle (1 when it never shifts)


def _round_to(value: float, multiple: int) -> int:
    return int(round(value / multiple)) * multiple


def _shift_step(tile: int, multiple: int, max_period: int) -> tuple[int, int]:
    """Smallest step (a multiple of ``multiple`` dividing ``tile``) whose period fits ``max_period``."""
    for step in range(multiple, tile + 1, multiple):
        if tile % step == 0 and tile // step <= max_period:
            return step, tile // step
    return tile, 1  # unreachable: step == tile always qualifies


def plan_axis(
    name: str, size: int, tile: int, overlap: int, multiple: int, boundary: str, shift: bool, shift_period: int
) -> AxisPlan:
    """Plan one axis; raises ``ValueError`` naming ``name`` on impossible geometry."""
    if size % multiple:
        raise ValueError(f"canvas {name} {size} must be a multiple of the model's patch {multiple}.")
    tile = min(tile, size)  # a canvas smaller than a tile gets one tile equal to the canvas
    if tile % multiple:
        raise ValueError(f"tile {name} {tile} must be a multiple of the model's patch {multiple}.")
    if tile == size:
        return AxisPlan(size, tile, 0, (0,), 0, 1)
    if 2 * overlap > tile:
        raise ValueError(f"overlap {overlap} on {name} must be at most half the tile size {tile}.")
    if overlap % multiple:
        raise ValueError(f"overlap {overlap} on {name} must be a multiple of the model's patch {multiple}.")
    stride = tile - overlap
    if boundary == "torus":
        n = math.ceil(size / stride)
        origins = tuple(_round_to(k * size / n, multiple) % size for k in range(n))
    else:
        n = math.ceil((size - overlap) / stride)
        span = size - tile
        origins = tuple(min(_round_to(k * span / (n - 1), multiple), span) for k in range(n))
    step, period = _shift_step(tile, multiple, shift_period) if shift else (0, 1)
    return AxisPlan(size, tile, overlap, origins, step, period)


class TileGrid:
    """Tile windows of a ``(T, H, W)`` latent canvas, per refinement step.

    Args:
        canvas: ``(T, H, W)`` latent size of the canvas (T is never tiled).
        tiling: a :class:`TilingConfig`; its ``tile`` (or ``native_tile`` when it is ``None``) is the
            tile size ``(h, w)`` in latent cells.
        multiple: the model's spatial patch ``(py, px)`` (or one int): sizes, origins and shifts are
            multiples of it so tokens align with canvas cells.
        native_tile: the model's native latent size, used when ``tiling.tile`` is ``None``.
    """

    def __init__(
        self,
        canvas: tuple[int, int, int],
        tiling: TilingConfig | None = None,
        multiple: int | tuple[int, int] = 1,
        native_tile: tuple[int, int] | None = None,
    ):
        tiling = tiling if tiling is not None else TilingConfig()
        if not isinstance(tiling, TilingConfig):
            raise TypeError(f"`tiling` must be a TilingConfig but is {type(tiling).__name__}.")
        try:
            T, H, W = (int(c) for c in canvas)
        except (TypeError, ValueError):
            raise ValueError(f"`canvas` must be (T, H, W) but is {canvas!r}.") from None
        if min(T, H, W) < 1:
            raise ValueError(f"`canvas` sizes must be >= 1 but are {(T, H, W)}.")
        py, px = as_pair("multiple", multiple, 1)
        tile = tiling.tile if tiling.tile is not None else as_pair("native_tile", native_tile, 1, allow_none=True)
        if tile is None:
            raise ValueError("`tiling.tile` is None, so `native_tile` (the model's latent size) is required.")
        if tiling.boundary not in BOUNDARIES:
            raise ValueError(f"`boundary` must be one of {BOUNDARIES} but is {tiling.boundary!r}.")
        oh, ow = tiling.overlap
        self.config = tiling
        self.canvas = (T, H, W)
        self.multiple = (py, px)
        self.rows = plan_axis("height", H, tile[0], oh, py, tiling.boundary, tiling.shift, tiling.shift_period)
        self.cols = plan_axis("width", W, tile[1], ow, px, tiling.boundary, tiling.shift, tiling.shift_period)

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def tile(self) -> tuple[int, int]:
        return self.rows.tile, self.cols.tile

    @property
    def overlap(self) -> tuple[int, int]:
        return self.rows.overlap, self.cols.overlap

    @property
    def wrap(self) -> bool:
        return self.config.boundary == "torus"

    @property
    def num_tiles(self) -> int:
        """Tiles of the unshifted grid (a shifted clamp grid may have one more per axis)."""
        return len(self.rows.origins) * len(self.cols.origins)

    @property
    def period(self) -> int:
        """Refinement steps after which the grid returns to its starting place."""
        return math.lcm(self.rows.period, self.cols.period) * self.config.shift_every

    def offset(self, step: int) -> tuple[int, int]:
        """The grid's ``(row, col)`` shift at refinement ``step``."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"`step` must be an int >= 0 but is {step!r}.")
        events = step // self.config.shift_every
        return ((events % self.rows.period) * self.rows.step, (events % self.cols.period) * self.cols.step)

    def _axis_origins(self, axis: AxisPlan, shift: int) -> list[int]:
        shifted = [(o + shift) % axis.size for o in axis.origins]
        if self.wrap:
            return shifted
        # Clamp: a window that would wrap is replaced by the two border windows that cover what it
        # covered, so coverage holds at every step (the tile count may grow by one on this axis).
        last = axis.size - axis.tile
        kept = {o if o <= last else last for o in shifted}
        if any(o > last for o in shifted):
            kept.add(0)
        return sorted(kept)

    def at_step(self, step: int) -> torch.Tensor:
        """``(N, 2)`` int64 ``(row, col)`` origins of every tile at refinement ``step``, row-major."""
        dy, dx = self.offset(step)
        ys = self._axis_origins(self.rows, dy)
        xs = self._axis_origins(self.cols, dx)
        return torch.tensor([(y, x) for y in ys for x in xs], dtype=torch.int64)

    # -- maps (for tests, metrics and reports; the ops never materialise these) --------------------

    def coverage(self, step: int) -> torch.Tensor:
        """``(H, W)`` int count of tiles covering each canvas cell at ``step``."""
        _, H, W = self.canvas
        h, w = self.tile
        cover = torch.zeros((H, W), dtype=torch.int64)
        for oy, ox in self.at_step(step).tolist():
            rows = torch.arange(oy, oy + h) % H
            cols = torch.arange(ox, ox + w) % W
            cover[rows[:, None], cols[None, :]] += 1
        return cover

    def weight_sum(self, step: int, ramp: str | None = None) -> torch.Tensor:
        """``(H, W)`` float64 sum of the un-normalised blend weights of all tiles at ``step``."""
        from .reference import blend_ramp

        _, H, W = self.canvas
        h, w = self.tile
        ramp = ramp or self.config.ramp
        weight = blend_ramp(h, self.overlap[0], ramp).double()[:, None] * blend_ramp(w, self.overlap[1], ramp).double()
        total = torch.zeros((H, W), dtype=torch.float64)
        for oy, ox in self.at_step(step).tolist():
            rows = torch.arange(oy, oy + h) % H
            cols = torch.arange(ox, ox + w) % W
            total[rows[:, None], cols[None, :]] += weight
        return total

    def edges(self, step: int) -> tuple[list[int], list[int]]:
        """Canvas rows and columns on which a tile edge lies at ``step`` (a cell whose upper/left
        neighbour belongs to another tile). The canvas border itself is not an edge unless wrapped."""
        _, H, W = self.canvas
        origins = self.at_step(step)
        rows, cols = set(), set()
        for axis, size, coords, out in ((self.rows, H, origins[:, 0], rows), (self.cols, W, origins[:, 1], cols)):
            if axis.tile == size:
                continue
            for o in set(coords.tolist()):
                for e in (o, (o + axis.tile) % size):
                    if self.wrap or 0 < e < size:
                        out.add(e % size)
        return sorted(rows), sorted(cols)

    def __repr__(self) -> str:
        return (
            f"TileGrid(canvas={self.canvas}, tile={self.tile}, tiles={len(self.rows.origins)}x"
            f"{len(self.cols.origins)}, overlap={self.overlap}, boundary={self.config.boundary!r}, "
            f"shift_steps=({self.rows.step}, {self.cols.step}), periods=({self.rows.period}, {self.cols.period}))"
        )
