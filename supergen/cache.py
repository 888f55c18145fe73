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


def _window(canvas_map: torch.Tensor, oy: int, ox: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of a (torus-wrapped) window on a map of shape (..., H, W)."""
    H, W = canvas_map.shape[-2:]
    rows = torch.arange(oy, oy + h, device=canvas_map.device) % H
    cols = torch.arange(ox, ox + w, device=canvas_map.device) % W
    return rows[:, None], cols[None, :]


class TileCache:
    """Per-step decisions and canvas-coordinate state of the tile cache for one generation.

    Use, once per refinement step ``i`` of ``num_steps`` (``x`` is the canvas latent ``(B, C, T, H, W)``
    the tiles are cut from, ``origins`` the step's tile origins)::

        compute = cache.plan(i, num_steps, x, origins, tile_hw)       # (N,) bool
        pred[compute] = model(tiles[compute]);  pred[~compute] = cache.reuse(x, origins[~compute], tile_hw)
        cache.record(i, x, origins, tile_hw, compute, pred)           # pred: (N * B, C, T, h, w)
    """

    def __init__(self, config: CacheConfig):
        if not isinstance(config, CacheConfig):
            raise TypeError(f"`config` must be a CacheConfig but is {type(config).__name__}.")
        self.config = config
        self.stats = CacheStats()
        self._x_prev: torch.Tensor | None = None  # canvas input of the previous step
        self._residual: torch.Tensor | None = None  # prediction - input at each cell's last compute
        self._o_abs: torch.Tensor | None = None  # (H, W) mean |prediction| at the last compute
        self._last_compute: torch.Tensor | None = None  # (H, W) step of the last compute, -inf never
        self._gain: torch.Tensor | None = None  # (H, W) last valid k, NaN = none yet
        self._acc: torch.Tensor | None = None  # (H, W) accumulated predicted change since compute
        self._skips: torch.Tensor | None = None  # (H, W) consecutive skips
        self._motion: torch.Tensor | None = None  # (H, W) running mean of measured relative change
        self._motion_n: torch.Tensor | None = None
        self._last_o: torch.Tensor | None = None  # prediction at the last compute (for k)
        self._last_x: torch.Tensor | None = None  # input at the last compute (for k)

    # -- state -------------------------------------------------------------------------------------

    def _allocate(self, x: torch.Tensor) -> None:
        H, W = x.shape[-2:]
        maps = dict(device=x.device, dtype=torch.float32)
        self._residual = torch.zeros_like(x)
        self._last_o = torch.zeros_like(x)
        self._last_x = torch.zeros_like(x)
        self._o_abs = torch.zeros((H, W), **maps)
        self._last_compute = torch.full((H, W), -math.inf, **maps)
        self._gain = torch.full((H, W), math.nan, **maps)
        self._acc = torch.zeros((H, W), **maps)
        self._skips = torch.zeros((H, W), **maps)
        self._motion = torch.zeros((H, W), **maps)
        self._motion_n = torch.zeros((H, W), **maps)

    @staticmethod
    def _cell_mean_abs(t: torch.Tensor) -> torch.Tensor:
        """(B, C, T, h, w) → (h, w) mean absolute value over batch, channels and frames."""
        return t.abs().float().mean(dim=(0, 1, 2))

    # -- decisions ---------------------------------------------------------------------------------

    def predicted_change(self, step: int, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """(N,) accumulated predicted relative change of each tile if skipped now; ``inf`` = must compute."""
        h, w = tile_hw
        N = origins.shape[0]
        out = torch.full((N,), math.inf)
        if self._x_prev is None:
            return out
        for n, (oy, ox) in enumerate(origins.tolist()):
            r, c = _window(self._acc, oy, ox, h, w)
            last = self._last_compute[r, c]
            gain = self._gain[r, c]
            if bool(torch.isinf(last).any()) or bool(torch.isnan(gain).any()):
                continue  # a cell never computed, or no gain measured yet: compute
            dx = float((x[..., r, c] - self._x_prev[..., r, c]).abs().float().mean())
            o_abs = max(float(self._o_abs[r, c].mean()), 1e-8)
            out[n] = float(self._acc[r, c].mean()) + float(gain.mean()) * dx / o_abs
        return out

    def thresholds(self, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """(N,) per-tile thresholds (region-aware scaling of ``config.threshold``)."""
        h, w = tile_hw
        base = torch.full((origins.shape[0],), float(self.config.threshold))
        if not self.config.region_aware or self._motion is None or not bool((self._motion_n > 0).any()):
            return base
        seen = self._motion_n > 0
        global_mean = float(self._motion[seen].mean())
        rng = float(self.config.region_range)
        for n, (oy, ox) in enumerate(origins.tolist()):
            r, c = _window(self._motion, oy, ox, h, w)
            cells = seen[r, c]
            if not bool(cells.any()) or global_mean <= 0:
                continue
            tile_mean = max(float(self._motion[r, c][cells].mean()), 1e-12)
            base[n] *= min(max(global_mean / tile_mean, 1 / rng), rng)
        return base

    def plan(self, step: int, num_steps: int, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """(N,) bool: which tiles to compute at ``step`` (of ``num_steps`` refinement steps)."""
        N = origins.shape[0]
        cfg = self.config
        if self._residual is None:
            self._allocate(x)
        if cfg.mode in ("off", "rehash") or step < cfg.warmup or step == num_steps - 1:
            return torch.ones(N, dtype=torch.bool)
        change = self.predicted_change(step, x, origins, tile_hw)
        h, w = tile_hw
        over_skips = torch.tensor(
            [
                bool((self._skips[_window(self._skips, oy, ox, h, w)] >= cfg.max_skips).any())
                for oy, ox in origins.tolist()
            ]
        )
        forced = torch.isinf(change) | over_skips
        if cfg.mode == "gate":
            return forced | (change >= self.thresholds(origins, tile_hw))
        # budget: the forced tiles first, then the largest predicted changes, up to ceil(budget * N)
        quota = max(math.ceil(cfg.budget * N), int(forced.sum()))
        order = torch.argsort(torch.where(forced, math.inf, change), descending=True, stable=True)
        compute = torch.zeros(N, dtype=torch.bool)
        compute[order[:quota]] = True
        return compute

    # -- state updates -----------------------------------------------------------------------------

    def reuse(self, x: torch.Tensor, origins: torch.Tensor, tile_hw) -> torch.Tensor:
        """Predictions of skipped tiles: input under the window plus the cached residual, tile-major."""
        h, w = tile_hw
        parts = []
        for oy, ox in origins.tolist():
            r, c = _window(self._acc, oy, ox, h, w)
            parts.append(x[..., r, c] + self._residual[..., r, c])
        return torch.cat(parts) if parts else x.new_empty((0, *x.shape[1:3], h, w))

    def record(
        self, step: int, x: torch.Tensor, origins: torch.Tensor, tile_hw, compute: torch.Tensor, pred: torch.Tensor
    ) -> None:
        """Update the canvas-coordinate state after ``step`` with the tiles' predictions (tile-major)."""
        if self._residual is None:
            self._allocate(x)
        h, w = tile_hw
        B = x.shape[0]
        change = self.predicted_change(step, x, origins, tile_hw) if self.config.mode != "off" else None
        for n, (oy, ox) in enumerate(origins.tolist()):
            r, c = _window(self._acc, oy, ox, h, w)
            if not bool(compute[n]):
                self._acc[r, c] = float(change[n]) if change is not None else 0.0
                self._skips[r, c] += 1
                continue
            o = pred[n * B : (n + 1) * B]
            xin = x[..., r, c]
            consecutive = bool((self._last_compute[r, c] == step - 1).all())
            if consecutive:
                # k from two real computes at consecutive steps, never from a reused output
                dx = float((xin - self._last_x[..., r, c]).abs().float().mean())
                do = float((o - self._last_o[..., r, c]).abs().float().mean())
                if dx > 0:
                    self._gain[r, c] = do / dx
                o_prev_abs = max(float(self._last_o[..., r, c].abs().float().mean()), 1e-8)
                rel = do / o_prev_abs
                n_prev = self._motion_n[r, c]
                self._motion[r, c] = (self._motion[r, c] * n_prev + rel) / (n_prev + 1)
                self._motion_n[r, c] = n_prev + 1
            self._last_o[..., r, c] = o
            self._last_x[..., r, c] = xin
            self._residual[..., r, c] = o - xin
            self._o_abs[r, c] = self._cell_mean_abs(o)
            self._last_compute[r, c] = float(step)
            self._acc[r, c] = 0.0
            self._skips[r, c] = 0.0
        self._x_prev = x.clone()
        self.stats.computed += int(compute.sum())
        self.stats.skipped += int((~compute).sum())
        self.stats.per_step.append([bool(v) for v in compute])


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


def check_model_caches(transformer) -> None:
    """Refuse diffusers caches that keep state on the hook instead of per cache context.

    FirstBlockCache, TaylorSeer, MagCache and SeaCache keep per-context state, so naming one context
    per tile makes them per-tile caches. PyramidAttentionBroadcast and FasterCache keep one state per
    hook: across tiles they silently mix different tiles' activations (or crash), so we refuse them.
    """
    stateful_per_hook = {"pyramid_attention_broadcast": "PyramidAttentionBroadcast", "faster_cache": "FasterCache"}
    found = set()
    for module in transformer.modules():
        hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", None) or {}
        for hook_name in hooks:
            found.update(label for prefix, label in stateful_per_hook.items() if hook_name.startswith(prefix))
    if found:
        raise ValueError(
            f"{' and '.join(sorted(found))} cannot be used with tiled refinement: they keep one state per hook, "
            "so tiles would reuse each other's activations. Use FirstBlockCache, TaylorSeer, MagCache or "
            "SeaCache (per-context state; supergen names one context per tile), or supergen's tile cache."
        )
