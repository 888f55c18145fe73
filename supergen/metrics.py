"""Measurements for the report: stage timers, a peak-memory probe and the seam score."""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time

import torch


class PeakMemory:
    """Peak memory since :meth:`reset`: CUDA allocator peak on a GPU, peak RSS (VmHWM) on the CPU.

    On Linux, writing ``5`` to ``/proc/self/clear_refs`` resets the process's peak RSS, so each stage
    gets its own peak; where that is not possible the probe reports the lifetime peak (``resettable``
    is then False, and the report says so).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.resettable = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.resettable = False

    def read(self) -> int:
        """Peak bytes since the last reset."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (since the last VmHWM reset on Linux)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


class StageTimer:
    """Wall-clock seconds and peak memory per named stage (synchronising CUDA at both ends)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}
        self._memory = PeakMemory(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._memory.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), self._memory.read())

    @property
    def peak_resettable(self) -> bool:
        return self._memory.resettable


def seam_score(
    video: torch.Tensor, rows: list[int], cols: list[int], grid: int | None = None, reference: str = "grid"
) -> float | None:
    """How much stronger the jumps across tile edges are than the jumps elsewhere (1.0 = no seam).

    ``video``: ``(..., H, W)`` pixels; ``rows``/``cols``: pixel rows/columns ``e`` on which a tile edge
    lies (the jump measured is between ``e − 1`` and ``e``; 0 and the far border are skipped, since the
    output is not periodic). The score is the summed jump across the edge lines over what reference
    lines of the same direction would sum to (column edges against column-to-column jumps, row edges
    against row-to-row jumps).

    ``grid``: the pixel period on which tile edges can lie (VAE scale × patch). ``None``: the reference
    is every line. Given: the reference is the *other* lines of that grid, the lines where an edge could
    have been but is not. Use it for decoded latents: a VAE decoder leaves its own structure on its
    latent-cell lines whether or not there are tiles (measured on the tiny Wan: a refinement with one
    tile covering the canvas scores 1.31 on the 16-pixel lines against all lines), and only the
    same-grid reference keeps that out of the seam. ``None`` when there is no interior edge or no
    reference line.

    ``reference`` (with ``grid``): ``"grid"`` compares with every other line of the grid; ``"adjacent"``
    only with the grid lines one period either side of each edge, so that where the content is dense
    (objects cluster mid-canvas, where the edges of a 3x3 grid lie) the edge is compared with lines
    crossing the same content, and a layout that happens to put more content on the edge lines does not
    count as a seam.
    """
    if reference not in ("grid", "adjacent"):
        raise ValueError(f"`reference` must be 'grid' or 'adjacent' but is {reference!r}.")
    if reference == "adjacent" and grid is None:
        raise ValueError("`reference='adjacent'` needs `grid`, the period of the lines an edge can lie on.")
    video = video.float()
    H, W = video.shape[-2:]
    dy = (video[..., 1:, :] - video[..., :-1, :]).abs()  # dy[..., e - 1, :] is the jump into row e
    dx = (video[..., :, 1:] - video[..., :, :-1]).abs()
    rows = sorted({r for r in rows if 0 < r < H})
    cols = sorted({c for c in cols if 0 < c < W})
    if not rows and not cols:
        return None
    if grid is not None:
        if grid < 1 or any(e % grid for e in rows + cols):
            raise ValueError(f"`grid` must be a positive period of every edge line but is {grid!r}.")
        if reference == "adjacent":  # each edge's neighbours, counted once per edge they flank
            ref_rows = [n for r in rows for n in (r - grid, r + grid) if 0 < n < H and n not in rows]
            ref_cols = [n for c in cols for n in (c - grid, c + grid) if 0 < n < W and n not in cols]
        else:
            ref_rows = [r for r in range(grid, H, grid) if r not in rows]
            ref_cols = [c for c in range(grid, W, grid) if c not in cols]
        if (rows and not ref_rows) or (cols and not ref_cols):
            return None
        row_line = dy[..., [r - 1 for r in ref_rows], :].sum() / max(1, len(ref_rows))
        col_line = dx[..., [c - 1 for c in ref_cols]].sum() / max(1, len(ref_cols))
    else:
        row_line, col_line = dy.sum() / max(1, H - 1), dx.sum() / max(1, W - 1)
    edges = dy[..., [r - 1 for r in rows], :].sum() + dx[..., [c - 1 for c in cols]].sum()
    expected = len(rows) * row_line + len(cols) * col_line
    if float(expected) == 0.0:
        return 1.0 if float(edges) == 0.0 else float("inf")
    return float(edges / expected)


def psnr(video: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over all frames (``data_range`` 2 for pixels in [-1, 1]);
    ``inf`` for identical videos."""
    if video.shape != reference.shape:
        raise ValueError(f"videos must have one shape but are {tuple(video.shape)} and {tuple(reference.shape)}.")
    mse = float((video.double() - reference.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(video: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004, uniform ``window`` x ``window`` statistics) over all
    frames and channels of ``(..., H, W)`` videos."""
    if video.shape != reference.shape:
        raise ValueError(f"videos must have one shape but are {tuple(video.shape)} and {tuple(reference.shape)}.")
    H, W = video.shape[-2:]
    k = min(window, H, W)
    x = video.double().reshape(-1, 1, H, W)
    y = reference.double().reshape(-1, 1, H, W)

    def local_mean(t):
        return torch.nn.functional.avg_pool2d(t, k, stride=1)

    mx, my = local_mean(x), local_mean(y)
    vx = local_mean(x * x) - mx * mx
    vy = local_mean(y * y) - my * my
    cov = local_mean(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def downsampled_psnr(video: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR of ``video`` area-averaged down to ``reference``'s size, against ``reference``.

    ``video``/``reference``: ``(..., H, W)`` and ``(..., h, w)`` with the same leading dimensions and
    ``H >= h``, ``W >= w``; each output pixel is the mean of the ``video`` pixels it covers (exact block
    means when ``H/h`` and ``W/w`` are integers). Measures how faithfully a high-resolution output keeps
    the low-resolution content it was made from.
    """
    if video.shape[:-2] != reference.shape[:-2]:
        raise ValueError(
            f"videos must share their leading dimensions but are {tuple(video.shape)} and {tuple(reference.shape)}."
        )
    (H, W), (h, w) = video.shape[-2:], reference.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"`video` ({H}x{W}) must be at least as large as `reference` ({h}x{w}).")
    flat = video.double().reshape(-1, 1, H, W)
    small = torch.nn.functional.interpolate(flat, size=(h, w), mode="area").reshape(*video.shape[:-2], h, w)
    return psnr(small, reference, data_range)
