"""What every benchmark result records: the device, versions, git SHA, the command, a timestamp;
and an atomic JSON writer (a temporary name, then rename: nothing half-written is left behind)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """Human-readable name of the device that ran the benchmark."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_slug(device: str) -> str:
    """File-name tag for the device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_sha(short: bool = True) -> str:
    """The commit of the files being run: ``$SUPERGEN_GIT_SHA`` if set (a copy of the tree run elsewhere,
    e.g. shipped to a GPU machine, names its commit this way: its own .git, if any, may describe another
    commit than the files), else git's HEAD, else ``"unknown"``."""
    sha = os.environ.get("SUPERGEN_GIT_SHA")
    if sha:
        return sha
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(command, capture_output=True, text=True, cwd=RESULTS.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: str) -> dict:
    def version(mod: str) -> str:
        try:
            return __import__(mod).__version__
        except ImportError:
            return "not installed"

    sha = git_sha(short=True)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": sha,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def timed_runs(fn, device: str, runs: int) -> tuple[list[float], object]:
    """Wall seconds of each of ``runs`` calls of ``fn`` (a CUDA device synchronised before and after each)
    and the last call's result."""
    seconds, out = [], None
    for _ in range(runs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds, out


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
