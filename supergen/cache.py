"""Region-aware tile cache: skip a tile's model forward when its prediction would barely change.

Unit and value. The unit is one whole guided prediction of one tile. The cached value is the
residual ``R = prediction - noisy input``; a skipped tile's prediction is its current input plus the
cached residual under its window. All state lives in **canvas coordinates**, so it follows the content
when the grid shifts (a window reads whatever the tiles of earlier steps left on its cells).

The gate (per tile, per step), in the spirit of EasyCache with the published code's bug fixed:

* always compute the first ``warmup`` steps and the last step;
* ``dx = mean|x_i - x_{i-1}|`` over the window: the input change since the previous step;
* the gain ``k = mean|o_j - o_{j-1}| / mean|x_j - x_{j-1}|`` is measured **only** when the window's
  cells were really computed at two consecutive steps ``j-1, j``; through a run of skips the last
  valid ``k`` is held (the published code recomputed it from the frozen reused output, which pins it
  at 1.0 and lets runs of 15 skips through). No valid ``k`` yet → compute;
* the predicted relative change ``k * dx / mean|o_last|`` accumulates over a run of skips; the tile is
  skipped while the accumulation stays under its threshold and it has skipped fewer than
  ``max_skips`` steps in a row; a compute resets the accumulation.

Region awareness. Each cell keeps a running mean of the relative output change measured at real
computes. A tile's threshold is ``threshold * clip(global_mean / tile_mean, 1/region_range,
region_range)``: tiles whose predictions move more than the canvas average get a *lower* threshold
(computed more often), static tiles a higher one. (The published rule raises the threshold of the most
variable tiles; we take the direction that spends compute where the content moves.)

Holders and window sums. The state is kept flat per cell and every decision is taken from per-tile
float64 *sums* over window cells divided by the window's size: one process holds every cell, a rank of
a tile-parallel run holds its region and the ranks add their sums with one small all-reduce
(:class:`CellWindows`), so both take the same decisions with the same code.

Budget mode. Instead of a threshold, compute a fixed fraction of the tiles each step: those with the
largest predicted change (forced computes first). Speed becomes predictable, and across ranks the work
can be balanced.

Step Rehash (Streamlined Inference) is the comparison policy: whole refinement steps are either
computed (key steps) or reuse the last key step's canvas residual (:class:`StepRehash`), following an
offline key-step schedule (:func:`step_rehash_schedule`) from a step-by-step similarity map that a
calibration run measures (:func:`step_similarity`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("off", "gate", "budget", "rehash")


@dataclass(frozen=True)
class CacheConfig:
    """Tile-cache policy.

    Attributes:
        mode: ``off``, ``gate`` (threshold), ``budget`` (fraction of tiles computed per step) or
            ``rehash`` (Step Rehash key steps; whole steps are computed or reused).
        threshold: gate threshold on the accumulated predicted relative change (``gate``).
        budget: fraction of tiles computed per step, in (0, 1] (``budget``).
        rehash_gamma: similarity threshold of Step Rehash, in (0, 1] (``rehash``).
        rehash_similarity: the ``(k, k)`` step-similarity map of Step Rehash (:func:`step_similarity`)
            for ``k`` refinement steps; ``None``: ``SuperGen`` measures it first with a calibration run
            (cache off, same model, sizes and prompt, seed ``rehash_seed``), timed as its own stage.
        rehash_seed: seed of the calibration run.
        warmup: refinement steps always computed at the start.
        max_skips: most consecutive skips of one region.
        region_aware: adapt per-tile thresholds to how much each region's prediction moves.
        region_range: per-tile thresholds stay within ``threshold / range .. threshold * range``.
    """

    mode: str = "off"
    threshold: float = 0.1
    budget: float = 0.5
    rehash_gamma: float = 0.9
    # A tensor field: excluded from ==/repr (elementwise == has no truth value; a map is not a label).
    rehash_similarity: torch.Tensor | None = field(default=None, compare=False, repr=False)
    rehash_seed: int = 0
    warmup: int = 3
    max_skips: int = 3
    region_aware: bool = True
    region_range: float = 2.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES} but is {self.mode!r}.")
        if not (isinstance(self.threshold, int | float) and self.threshold > 0):
            raise ValueError(f"`threshold` must be a number > 0 but is {self.threshold!r}.")
        if not (isinstance(self.budget, int | float) and 0 < self.budget <= 1):
            raise ValueError(f"`budget` must be in (0, 1] but is {self.budget!r}.")
        if not (isinstance(self.rehash_gamma, int | float) and 0 < self.rehash_gamma <= 1):
            raise ValueError(f"`rehash_gamma` must be in (0, 1] but is {self.rehash_gamma!r}.")
        sim = self.rehash_similarity
        if sim is not None:
            if not isinstance(sim, torch.Tensor):
                raise TypeError(f"`rehash_similarity` must be a torch.Tensor or None but is {type(sim).__name__}.")
            if sim.dim() != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
                raise ValueError(f"`rehash_similarity` must be a square (k, k) map but has shape {tuple(sim.shape)}.")
            if not bool(torch.isfinite(sim).all()):
                raise ValueError("`rehash_similarity` must be finite.")
        for name in ("warmup", "max_skips", "rehash_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"`{name}` must be an int >= 0 but is {value!r}.")
        if not (isinstance(self.region_range, int | float) and self.region_range >= 1):
            raise ValueError(f"`region_range` must be a number >= 1 but is {self.region_range!r}.")

    @classmethod
    def parse(cls, spec: str, threshold: float | None = None) -> CacheConfig:
        """From the CLI form ``off | gate | budget:F | rehash:G``."""
        name, _, arg = spec.partition(":")
        kwargs = {} if threshold is None else {"threshold": threshold}
        try:
            if name == "budget" and arg:
                return cls(mode="budget", budget=float(arg), **kwargs)
            if name == "rehash" and arg:
                return cls(mode="rehash", rehash_gamma=float(arg), **kwargs)
            if name in ("off", "gate") and not arg:
                return cls(mode=name, **kwargs)
        except ValueError as e:
            if "could not convert" not in str(e):
                raise
        raise ValueError(f"`--cache` must be off, gate, budget:F or rehash:G but is {spec!r}.")


@dataclass
class CacheStats:
    """What the cache did, for the report."""

    computed: int = 0
    skipped: int = 0
    per_step: list[list[bool]] = field(default_factory=list)  # per step, per tile: computed?
    estimated_saving: float = 0.0  # fraction of tile forwards the gate expected to skip

    def as_dict(self) -> dict:
        total = self.computed + self.skipped
        return {
            "computed_tile_steps": self.computed,
            "skipped_tile_steps": self.skipped,
            "compute_saved": self.skipped / total if total else 0.0,
            "hit_map": [[int(not c) for c in step] for step in self.per_step],
        }


def cell_abs_sum(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, K)`` → ``(K,)`` float64 sum of ``|t|`` over batch, channels and frames, per cell."""
    return t.detach().abs().sum(dim=(0, 1, 2), dtype=torch.float64)


@dataclass
class CellWindows:
    """The tile windows of one step on the cells a holder keeps.

    A *holder* keeps the cache state of a set of canvas cells, flat (maps ``(K,)``, tensors
    ``(B, C, T, K)``): in one process the whole canvas (row-major, ``K = H * W``), under tile parallelism
    a rank's region (:mod:`supergen.parallel`). Window statistics are sums over the held cells of each
    window; ``reduce`` adds them up over all holders (``None``: this holder keeps every cell).

    Attributes:
        cells: per tile, the positions (in the holder's cell tensors) of the window cells it holds, in
            window row-major order.
        canvas: ``(N, h * w)`` canvas cell of every window cell (the same on every holder).
        reduce: sums a float64 tensor over all holders, the same result on each.
    """

    cells: list[torch.Tensor]
    canvas: torch.Tensor
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_tiles(self) -> int:
        return self.canvas.shape[0]

    @property
    def size(self) -> int:
        return self.canvas.shape[1]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.reduce is None else self.reduce(t)


# Columns of the per-tile window sums (TileCache._window_sums); the last row holds the canvas-wide sums.
_NEVER, _NO_GAIN, _DX, _O_ABS, _ACC, _GAIN, _OVER_SKIPS, _MOTION, _SEEN, _NOT_PREVIOUS, _DO = range(11)
WINDOW_SUM_COLUMNS = _DO + 1


class TileCache:
    """Per-step decisions and canvas-coordinate state of the tile cache for one generation.

    Use, once per refinement step ``i`` of ``num_steps`` (``x`` is the canvas latent ``(B, C, T, H, W)``
    the tiles are cut from, ``origins`` the step's tile origins)::

        compute = cache.plan(i, num_steps, x, origins, tile_hw)       # (N,) bool
        pred[compute] = model(tiles[compute]);  pred[~compute] = cache.reuse(x, origins[~compute], tile_hw)
        cache.record(i, x, origins, tile_hw, compute, pred)           # pred: (N * B, C, T, h, w)

    These canvas methods hold every cell. Underneath, the state is flat per cell and every decision is
    made from per-tile *sums* over window cells (float64) divided by the window's size, so that the
    same code serves a holder of only some cells (a rank's region, :mod:`supergen.parallel`): there the
    sums of all ranks are added by one small all-reduce and every rank takes the same decision
    (:meth:`start_cells`, :meth:`plan_cells`, :meth:`reuse_cells`, :meth:`record_cells`,
    :meth:`set_input_change`).
    """

    def __init__(self, config: CacheConfig):
        if not isinstance(config, CacheConfig):
            raise TypeError(f"`config` must be a CacheConfig but is {type(config).__name__}.")
        self.config = config
        self.stats = CacheStats()
        self._x_prev: torch.Tensor | None = None  # canvas input of the previous step (canvas methods)
        self._dx: torch.Tensor | None = None  # (K,) float64 sum |x_i - x_{i-1}| per cell; None: no previous
        self._residual: torch.Tensor | None = None  # prediction - input at each cell's last compute
        self._last_o: torch.Tensor | None = None  # prediction at the last compute (for k), in its own dtype
        self._last_o_typed = False  # whether _last_o has taken the predictions' dtype
        self._o_abs: torch.Tensor | None = None  # (K,) float64 mean |prediction| at the last compute
        self._last_compute: torch.Tensor | None = None  # (K,) step of the last compute, -inf never
        self._gain: torch.Tensor | None = None  # (K,) last valid k, NaN = none yet
        self._acc: torch.Tensor | None = None  # (K,) accumulated predicted change since compute
        self._skips: torch.Tensor | None = None  # (K,) consecutive skips
        self._motion: torch.Tensor | None = None  # (K,) running mean of measured relative change
        self._motion_n: torch.Tensor | None = None
        self._per_cell = 1  # B * C * T: elements behind one cell
        self._denoiser: int | None = None  # the model predicting (Wan 2.2: which expert), :meth:`set_denoiser`
        self._warm_from = 0  # the step the current denoiser took over at: warm-up counts from there

    # -- state -------------------------------------------------------------------------------------

    #: Every per-cell tensor (last dimension: the held cells), for a region that changes hands.
    CELL_STATE = ("_dx", "_residual", "_last_o", "_o_abs", "_last_compute", "_gain", "_acc", "_skips", "_motion",
                  "_motion_n")  # fmt: skip

    def _allocate(self, x: torch.Tensor, map_shape, prediction_dtype: torch.dtype | None = None) -> None:
        maps = dict(device=x.device, dtype=torch.float32)
        self._per_cell = x.shape[0] * x.shape[1] * x.shape[2]
        self._residual = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        # A bf16 model's predictions are bf16: held so, they take half the memory (and half the bytes when
        # a region changes hands) for the same values. Unknown until the first compute on the canvas path.
        self._last_o = torch.zeros(x.shape, dtype=prediction_dtype or x.dtype, device=x.device)
        self._last_o_typed = prediction_dtype is not None
        self._o_abs = torch.zeros(map_shape, device=x.device, dtype=torch.float64)
        self._last_compute = torch.full(map_shape, -math.inf, **maps)
        self._gain = torch.full(map_shape, math.nan, **maps)
        self._acc = torch.zeros(map_shape, **maps)
        self._skips = torch.zeros(map_shape, **maps)
        self._motion = torch.zeros(map_shape, **maps)
        self._motion_n = torch.zeros(map_shape, **maps)

    def start_cells(self, x: torch.Tensor, prediction_dtype: torch.dtype | None = None) -> None:
        """Hold the cells of ``x`` ``(B, C, T, K)`` (a rank's region) instead of a whole canvas; the
        predictions will come in ``prediction_dtype`` (default: the first computed ones')."""
        self._allocate(x, (x.shape[-1],), prediction_dtype)

    def cell_state(self) -> dict[str, torch.Tensor]:
        """The per-cell tensors by attribute name (those allocated), for moving cells between holders."""
        return {k: getattr(self, k) for k in self.CELL_STATE if getattr(self, k) is not None}

    def set_denoiser(self, step: int, index: int) -> None:
        """The denoiser predicting at ``step`` (:meth:`supergen.adapters.base.ModelAdapter.denoiser_index`).
        Where it changes (Wan 2.2's low-noise expert taking over) the held residuals and gains describe
        another model: from ``step`` every tile is computed for ``warmup`` steps again, and gains are
        measured only between two computes of the new one. Every holder calls it with the same values."""
        if self._denoiser is not None and index != self._denoiser:
            self._warm_from = step
            if self._last_compute is not None:
                self._last_compute.fill_(-math.inf)  # no compute of the old model counts as the previous one
                self._gain.fill_(math.nan)
        self._denoiser = index

    def set_input_change(self, dx: torch.Tensor | None) -> None:
        """``(K,)`` float64 :func:`cell_abs_sum` of ``x_i - x_{i-1}``: the input change the next step's gate reads."""
        self._dx = dx

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        """A canvas map ``(H, W)`` / tensor ``(B, C, T, H, W)`` as its flat cells (a view); flat ones as they are."""
        return t.flatten(-2) if t.dim() in (2, 5) else t

    # -- window statistics -------------------------------------------------------------------------

    def _window_sums(self, step: int, windows: CellWindows, outputs: dict | None = None) -> torch.Tensor:
        """``(N + 1, 11)`` float64: per tile the sums over its window cells (columns ``_NEVER`` .. ``_DO``),
        over all holders; the last row the canvas-wide ``_MOTION`` / ``_SEEN`` sums. ``_DO`` (with
        ``outputs``, tile → prediction at the held cells) is the sum of ``|o - o_last|`` over the window."""
        f = self._flat
        last, gain, motion = f(self._last_compute), f(self._gain), f(self._motion)
        seen = f(self._motion_n) > 0
        dx = self._dx if self._dx is not None else torch.zeros_like(f(self._o_abs))
        per_cell = torch.stack(
            [
                torch.isinf(last).double(),
                torch.isnan(gain).double(),
                dx,
                f(self._o_abs),
                f(self._acc).double(),
                torch.nan_to_num(gain, nan=0.0).double(),
                (f(self._skips) >= self.config.max_skips).double(),
                torch.where(seen, motion, 0.0).double(),
                seen.double(),
                (last != float(step - 1)).double(),
            ]
        )  # (10, K)
        sums = torch.zeros((windows.num_tiles + 1, WINDOW_SUM_COLUMNS), dtype=torch.float64, device=per_cell.device)
        last_o, wide = f(self._last_o), self._residual.dtype  # the difference in the latents' dtype
        for n, cells in enumerate(windows.cells):
            if cells.numel():
                sums[n, :_DO] = per_cell[:, cells].sum(dim=1)
                if outputs is not None and n in outputs:
                    sums[n, _DO] = cell_abs_sum(outputs[n].to(wide) - last_o[..., cells].to(wide)).sum()
        sums[-1, _MOTION : _SEEN + 1] = per_cell[_MOTION : _SEEN + 1].sum(dim=1)
        return windows.sum(sums).cpu()

    def _change(self, sums: torch.Tensor, windows: CellWindows) -> torch.Tensor:
        """(N,) float64 accumulated predicted relative change of each tile if skipped now; ``inf`` = must compute."""
        s, size = sums[:-1], windows.size
        if self._dx is None:
            return torch.full((windows.num_tiles,), math.inf, dtype=torch.float64)
        dx = s[:, _DX] / (size * self._per_cell)
        o_abs = (s[:, _O_ABS] / size).clamp_min(1e-8)
        change = s[:, _ACC] / size + s[:, _GAIN] / size * dx / o_abs
        # a cell never computed, or no gain measured yet: compute
        return torch.where((s[:, _NEVER] > 0) | (s[:, _NO_GAIN] > 0), math.inf, change)

    def _thresholds(self, sums: torch.Tensor, windows: CellWindows) -> torch.Tensor:
        """(N,) float64 per-tile thresholds (region-aware scaling of ``config.threshold``)."""
        base = torch.full((windows.num_tiles,), float(self.config.threshold), dtype=torch.float64)
        seen_total = float(sums[-1, _SEEN])
        if not self.config.region_aware or seen_total == 0:
            return base
        global_mean = float(sums[-1, _MOTION]) / seen_total
        rng = float(self.config.region_range)
        if global_mean <= 0:
            return base
        seen = sums[:-1, _SEEN]
        tile_mean = (sums[:-1, _MOTION] / seen.clamp_min(1)).clamp_min(1e-12)
        scale = (global_mean / tile_mean).clamp(1 / rng, rng)
        return torch.where(seen > 0, base * scale, base)

    # -- decisions and updates on held cells --------------------------------------------------------

    def decides(self, step: int, num_steps: int) -> bool:
        """Whether :meth:`plan_cells` decides at ``step`` (else every tile is computed: warm-up, from the
        start or from a change of denoiser, and the last step)."""
        cfg = self.config
        return cfg.mode in ("gate", "budget") and cfg.warmup <= step - self._warm_from and step < num_steps - 1

    def plan_cells(self, step: int, num_steps: int, windows: CellWindows, with_priority: bool = False):
        """(N,) bool: which tiles to compute at ``step`` (of ``num_steps`` refinement steps); every holder
        must call it (its window sums are reduced over all holders) and gets the same answer.

        ``with_priority``: also return the (N,) float64 order in which skipped tiles would be computed
        next (the predicted change, ``inf`` for tiles that must be computed), e.g. to fill idle ranks
        (:func:`supergen.parallel.fill_idle_slots`); ``None`` on steps where every tile is computed."""
        N = windows.num_tiles
        cfg = self.config
        if not self.decides(step, num_steps):
            compute = torch.ones(N, dtype=torch.bool)
            return (compute, None) if with_priority else compute
        sums = self._window_sums(step, windows)
        change = self._change(sums, windows)
        forced = torch.isinf(change) | (sums[:-1, _OVER_SKIPS] > 0)
        priority = torch.where(forced, math.inf, change)
        if cfg.mode == "gate":
            compute = forced | (change >= self._thresholds(sums, windows))
        else:  # budget: the forced tiles first, then the largest predicted changes, up to ceil(budget * N)
            quota = max(math.ceil(cfg.budget * N), int(forced.sum()))
            compute = torch.zeros(N, dtype=torch.bool)
            compute[torch.argsort(priority, descending=True, stable=True)[:quota]] = True
        return (compute, priority) if with_priority else compute

    def reuse_cells(self, x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The reused prediction ``x + R`` at held ``cells`` of ``x`` ``(B, C, T, K)``."""
        return x[..., cells] + self._flat(self._residual)[..., cells]

    def record_cells(self, step: int, x: torch.Tensor, windows: CellWindows, compute: torch.Tensor,
                     outputs: dict) -> None:  # fmt: skip
        """Update the held cells after ``step``: ``x`` ``(B, C, T, K)`` is the input, ``outputs[n]`` the
        prediction of computed tile ``n`` at its held cells ``(B, C, T, len(windows.cells[n]))``.

        Tiles are applied in tile order (where windows overlap, the later tile's prediction is what the
        shared cells keep). Whether a tile was computed at two consecutive steps, and its output change,
        are judged on the state at the start of the step: every window cell computed at ``step - 1``.
        A cell's skip run grows by one per step however many skipped windows share it. (Judging a tile
        on cells an earlier tile of the same step had already stamped left every tile that overlaps an
        earlier one without a gain, and counting a skip per window ended shared cells' runs early: on
        uneven torus grids, where neighbours overlap, the gate never skipped.)
        """
        f = self._flat
        if outputs and not self._last_o_typed:  # nothing computed yet: every held value is 0 in any dtype
            self._last_o = torch.zeros_like(self._last_o, dtype=next(iter(outputs.values())).dtype)
            self._last_o_typed = True
        sums = self._window_sums(step, windows, outputs)
        change = self._change(sums, windows) if self.config.mode != "off" else None
        per_window = windows.size * self._per_cell
        residual, last_o, o_abs = f(self._residual), f(self._last_o), f(self._o_abs)
        last, gain, acc, skips = f(self._last_compute), f(self._gain), f(self._acc), f(self._skips)
        motion, motion_n = f(self._motion), f(self._motion_n)
        skips_before = skips.clone()
        for n, cells in enumerate(windows.cells):
            if not bool(compute[n]):
                acc[cells] = float(change[n]) if change is not None else 0.0
                skips[cells] = skips_before[cells] + 1  # once per step, however many windows share a cell
                continue
            consecutive = self._dx is not None and sums[n, _NOT_PREVIOUS] == 0
            if not cells.numel():
                continue
            o = outputs[n]
            if consecutive:
                # k from two real computes at consecutive steps, never from a reused output
                dx = float(sums[n, _DX]) / per_window
                do = float(sums[n, _DO]) / per_window
                if dx > 0:
                    gain[cells] = do / dx
                rel = do / max(float(sums[n, _O_ABS]) / windows.size, 1e-8)
                n_prev = motion_n[cells]
                motion[cells] = (motion[cells] * n_prev + rel) / (n_prev + 1)
                motion_n[cells] = n_prev + 1
            last_o[..., cells] = o
            residual[..., cells] = o - x[..., cells]
            o_abs[cells] = cell_abs_sum(o) / self._per_cell
            last[cells] = float(step)
            acc[cells] = 0.0
            skips[cells] = 0.0
        self.stats.computed += int(compute.sum())
        self.stats.skipped += int((~compute).sum())
        self.stats.per_step.append([bool(v) for v in compute])

    # -- the canvas methods (one holder keeps every cell) --------------------------------------------

    @staticmethod
    def _canvas_cells(origins: torch.Tensor, tile_hw, canvas_hw, device) -> CellWindows:
        """Every cell of every (torus-wrapped) window of a canvas whose cells are all held, row-major."""
        h, w = tile_hw
        H, W = canvas_hw
        rows = (origins[:, 0:1].to(torch.int64) + torch.arange(h)) % H
        cols = (origins[:, 1:2].to(torch.int64) + torch.arange(w)) % W
        canvas = (rows[:, :, None] * W + cols[:, None, :]).reshape(origins.shape[0], h * w)
        return CellWindows(list(canvas.to(device)), canvas)

    def _canvas_windows(self, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> CellWindows:
        """The windows on canvas ``x`` (state allocated on first use), and its input change since the
        previous recorded step."""
        if self._residual is None:
            self._allocate(x, x.shape[-2:])
        self._dx = None if self._x_prev is None else cell_abs_sum(self._flat(x) - self._flat(self._x_prev))
        return self._canvas_cells(origins, tile_hw, x.shape[-2:], x.device)

    def predicted_change(self, step: int, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """(N,) accumulated predicted relative change of each tile if skipped now; ``inf`` = must compute."""
        windows = self._canvas_windows(x, origins, tile_hw)
        return self._change(self._window_sums(step, windows), windows).float()

    def thresholds(self, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """(N,) per-tile thresholds (region-aware scaling of ``config.threshold``)."""
        if self._motion is None:
            return torch.full((origins.shape[0],), float(self.config.threshold))
        windows = self._canvas_cells(origins, tile_hw, self._motion.shape, self._motion.device)
        return self._thresholds(self._window_sums(0, windows), windows).float()

    def plan(self, step: int, num_steps: int, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """(N,) bool: which tiles to compute at ``step`` (of ``num_steps`` refinement steps)."""
        return self.plan_cells(step, num_steps, self._canvas_windows(x, origins, tile_hw))

    def reuse(self, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """Predictions of skipped tiles: input under the window plus the cached residual, tile-major."""
        h, w = tile_hw
        if self._residual is None:
            self._allocate(x, x.shape[-2:])
        windows = self._canvas_cells(origins, tile_hw, x.shape[-2:], x.device)
        flat = self._flat(x)
        parts = [self.reuse_cells(flat, cells).unflatten(-1, (h, w)) for cells in windows.cells]
        return torch.cat(parts) if parts else x.new_empty((0, *x.shape[1:3], h, w))

    def record(
        self, step: int, x: torch.Tensor, origins: torch.Tensor, tile_hw, compute: torch.Tensor, pred: torch.Tensor
    ) -> None:
        """Update the canvas-coordinate state after ``step`` with the tiles' predictions (tile-major)."""
        windows = self._canvas_windows(x, origins, tile_hw)
        B = x.shape[0]
        outputs = {n: pred[n * B : (n + 1) * B].flatten(-2) for n in range(windows.num_tiles) if bool(compute[n])}
        self.record_cells(step, self._flat(x), windows, compute, outputs)
        self._x_prev = x.clone()


def step_rehash_schedule(similarity: torch.Tensor, gamma: float) -> list[bool]:
    """Step Rehash key steps from a ``(S, S)`` step-by-step similarity map.

    Step 0 is a key step ``j``; each following step ``i`` reuses ``j``'s prediction while
    ``similarity[i, j] >= gamma``, otherwise ``i`` becomes the new key step. The last step is always a
    key step. Returns, per step, whether it is computed.
    """
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] == 0:
        raise ValueError(f"`similarity` must be a non-empty square (S, S) map but has shape {tuple(similarity.shape)}.")
    if not 0 < gamma <= 1:
        raise ValueError(f"`gamma` must be in (0, 1] but is {gamma!r}.")
    S = similarity.shape[0]
    key, compute = 0, [True]
    for i in range(1, S):
        reuse = float(similarity[i, key]) >= gamma and i != S - 1
        compute.append(not reuse)
        if not reuse:
            key = i
    return compute


def step_similarity(residuals: list[torch.Tensor]) -> torch.Tensor:
    """``(S, S)`` map of cosine similarities between the flattened canvas residuals of ``S`` steps.

    What is compared is what Step Rehash reuses: the canvas residual ``prediction - input`` (see
    :class:`StepRehash`), so ``similarity[i, j] >= gamma`` bounds the angle between the residual that
    step ``i`` would compute and the one it is given. Cosine rather than a distance because it is
    scale-free: one ``gamma`` means the same at every noise level and for any model's output scale.
    Flattened over the whole canvas (batch, channels, frames, cells) because a whole step is reused.
    Accumulated in float64 so that the map does not depend on summation order at the 1e-7 level where
    ``gamma`` close to 1 would flip decisions.
    """
    if not residuals:
        raise ValueError("`residuals` must hold at least one step.")
    flat = torch.stack([r.detach().reshape(-1).to("cpu", torch.float64) for r in residuals])
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).clamp(-1.0, 1.0).float()


class StepRehash:
    """Step Rehash in the refine loop: each step is computed whole (a key step) or not at all.

    ``schedule[i]`` says whether step ``i`` is a key step (:func:`step_rehash_schedule`). On a key step
    every tile is computed and the fused canvas residual ``R = prediction - input`` is kept; on any
    other step no tile is gathered or computed, and the canvas prediction is ``input + R``.

    Why the residual and not the key step's prediction itself: the input keeps changing between the
    key step and the reusing step (the scheduler moves the canvas every step), and the residual form
    carries that change into the prediction, as the tile cache does with its per-tile residuals
    (EasyCache's measured observation on Wan/HunyuanVideo: the input-to-output transformation changes
    more slowly than the output). It also keeps both cache policies on one definition of "reuse", so
    the benchmark compares policies, not reuse forms.

    ``keep_residuals=True`` (calibration) also keeps every step's residual for :meth:`similarity`.
    """

    def __init__(self, schedule: list[bool], keep_residuals: bool = False):
        if not schedule or not bool(schedule[-1]):
            raise ValueError("`schedule` must be non-empty and compute its last step.")
        self.schedule = [bool(v) for v in schedule]
        self.stats = CacheStats()
        self.keep_residuals = keep_residuals
        self.residuals: list[torch.Tensor] = []
        self._residual: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: CacheConfig, num_steps: int) -> StepRehash:
        """The key-step schedule of ``config``'s similarity map and gamma for ``num_steps`` steps."""
        sim = config.rehash_similarity
        if sim is None:
            raise ValueError("`rehash_similarity` is None: calibrate it first (SuperGen does).")
        if tuple(sim.shape) != (num_steps, num_steps):
            raise ValueError(
                f"`rehash_similarity` must be ({num_steps}, {num_steps}) for {num_steps} refinement steps but has "
                f"shape {tuple(sim.shape)}."
            )
        return cls(step_rehash_schedule(sim, config.rehash_gamma))

    @classmethod
    def calibration(cls, num_steps: int) -> StepRehash:
        """Compute every step and keep every residual (the run that measures the similarity map)."""
        return cls([True] * num_steps, keep_residuals=True)

    def computes(self, step: int) -> bool:
        return self.schedule[step]

    def reuse(self, x: torch.Tensor) -> torch.Tensor:
        """The canvas prediction of a non-key step: its input plus the last key step's residual."""
        if self._residual is None:
            raise RuntimeError("Step Rehash has no key step to reuse yet (step 0 is always a key step).")
        return x + self._residual.to(x.dtype)

    def record(self, step: int, x: torch.Tensor, prediction: torch.Tensor, num_tiles: int) -> None:
        """After ``step``: keep a key step's canvas residual; count tile-steps computed or skipped."""
        computed = self.schedule[step]
        if computed:
            self._residual = prediction - x
            if self.keep_residuals:
                self.residuals.append(self._residual.detach().to("cpu", torch.float32, copy=True))
            self.stats.computed += num_tiles
        else:
            self.stats.skipped += num_tiles
        self.stats.per_step.append([computed] * num_tiles)

    def similarity(self) -> torch.Tensor:
        """The ``(S, S)`` similarity map of the kept residuals (:func:`step_similarity`)."""
        if len(self.residuals) != len(self.schedule):
            raise RuntimeError("the similarity map needs a calibration run over every step.")
        return step_similarity(self.residuals)


def hook_names(module) -> list[str]:
    """The names of the diffusers hooks registered on ``module`` itself (its ``HookRegistry``)."""
    return list(getattr(getattr(module, "_diffusers_hook", None), "hooks", None) or {})


def check_model_caches(transformer) -> None:
    """Refuse diffusers caches that keep state on the hook instead of per cache context.

    FirstBlockCache, TaylorSeer, MagCache and SeaCache keep per-context state, so naming one context
    per tile makes them per-tile caches. PyramidAttentionBroadcast and FasterCache keep one state per
    hook: across tiles they silently mix different tiles' activations (or crash), so we refuse them.
    """
    stateful_per_hook = {"pyramid_attention_broadcast": "PyramidAttentionBroadcast", "faster_cache": "FasterCache"}
    found = set()
    for module in transformer.modules():
        for hook_name in hook_names(module):
            found.update(label for prefix, label in stateful_per_hook.items() if hook_name.startswith(prefix))
    if found:
        raise ValueError(
            f"{' and '.join(sorted(found))} cannot be used with tiled refinement: they keep one state per hook, "
            "so tiles would reuse each other's activations. Use FirstBlockCache, TaylorSeer, MagCache or "
            "SeaCache (per-context state; supergen names one context per tile), or supergen's tile cache."
        )
