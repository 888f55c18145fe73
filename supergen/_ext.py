"""Build and load ``supergen._C``, the C++ CPU kernels of ``halo_gather`` and ``blend_scatter``.

Why compile on first use: an extension built at install time in an isolated build environment links
against *that* torch, and a different runtime torch then fails to load it or, worse, misbehaves
through an ABI mismatch. So the sources ship as package data (``supergen._csrc``) and are compiled
against the running torch the first time the CPU backend is needed, with ninja, into a cache:
``$SUPERGEN_CACHE`` or ``~/.cache/supergen``. The build directory's name holds the Python and torch
versions and a hash of the sources and flags, so an upgrade or an edit builds afresh and a stale
binary is never loaded. The first build takes about a minute on two cores (the kernels include only
ATen's core headers to keep it so); later processes reuse the binary.

:func:`load` raises :class:`ImportError` saying why when there is no compiler or the build fails;
``supergen.ops`` records that reason, falls back to the reference and ``supergen info`` prints it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import os
import re
import sys
import threading
from pathlib import Path

import torch
from torch.utils import cpp_extension

from .reference import GATHER_MODES, RAMPS

_SOURCES = ("halo_gather.cpp", "blend_scatter.cpp", "bindings.cpp")
_HEADERS = ("ops.h",)
# -ffp-contract=off: blend_scatter forms products and sums separately, as the reference does, so it
# stays bit-identical to it even when the compiler may emit fused multiply-adds. -fopenmp: ATen's
# at::parallel_for is an OpenMP region compiled into the caller from ATen's header, as in libtorch.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
_LDFLAGS = ("-fopenmp",)

_COMPLAINT = re.compile(r"error|not found|no such file", re.IGNORECASE)

_lock = threading.Lock()
_ops: CppOps | None = None


class CppOps:
    """The compiled kernels, called the way ``supergen.ops`` calls a backend (``out`` passed in)."""

    def __init__(self, lib):
        self._lib = lib

    def halo_gather(self, canvas, origins, tile_hw, halo, mode, out, col_multiple: int = 1) -> None:
        """canvas ``(B, C, T, H, W)``, origins ``(N, 2)`` int64 → out ``(N*B, C, T, h+2halo, w+2halo)``.
        ``col_multiple`` (the Triton backend's word hint) is accepted and unused: these kernels copy cells."""
        self._lib.halo_gather(canvas, origins, tile_hw[0], tile_hw[1], halo, GATHER_MODES[mode], out)

    def blend_scatter(self, tiles, origins, canvas_hw, overlap_hw, ramp, wrap, out, col_multiple: int = 1) -> None:
        """tiles ``(N*B, C, T, h, w)``, origins ``(N, 2)`` int64 → out ``(B, C, T, H, W)``; ``col_multiple``
        as for :meth:`halo_gather`."""
        H, W = canvas_hw
        self._lib.blend_scatter(tiles, origins, H, W, overlap_hw[0], overlap_hw[1], RAMPS[ramp], wrap, out)


def cache_dir() -> Path:
    """Root of the build cache: ``$SUPERGEN_CACHE`` or ``~/.cache/supergen``."""
    return Path(os.environ.get("SUPERGEN_CACHE") or Path.home() / ".cache" / "supergen")


def _build_name(src: Path) -> str:
    digest = hashlib.sha256(repr((_CFLAGS, _LDFLAGS)).encode())
    for name in _SOURCES + _HEADERS:
        digest.update((src / name).read_bytes())
    torch_tag = re.sub(r"\W", "_", torch.__version__)
    return f"supergen_C_py{sys.version_info[0]}{sys.version_info[1]}_torch{torch_tag}_{digest.hexdigest()[:12]}"


def _build(src: Path):
    name = _build_name(src)
    build_dir = cache_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's own guard is a lock *file*, left behind forever (and waited on forever) if a build is
    # killed. An flock dies with its process, so under it any leftover lock file is stale.
    with open(build_dir / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            verbose=False,
            with_cuda=False,
        )


def _reason(error: Exception) -> str:
    """The complaint of a failed build (its distinct error lines), not its whole log."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # Echoed compiler commands (they all name an output, "-o") mention errors only by accident.
    found = [line[:300] for line in lines if _COMPLAINT.search(line) and " -o " not in line]
    return " | ".join(list(dict.fromkeys(found))[:3]) or lines[-1][:300]


def load() -> CppOps:
    """Compile (once, cached) and load the extension; raise ImportError saying why if it cannot."""
    global _ops
    with _lock:
        if _ops is None:
            src = Path(str(importlib.resources.files("supergen._csrc")))
            try:
                _ops = CppOps(_build(src))
            except Exception as e:  # no compiler, no ninja, a compile error: all mean "not available"
                raise ImportError(
                    f"supergen._C could not be built in {cache_dir()}: {type(e).__name__}: {_reason(e)}"
                ) from e
        return _ops
