"""The ``supergen`` command line: ``supergen info`` (and, as stages land, ``generate``/``bench``).

Exit codes: 0 success, 2 bad input (the message names the value and what is valid), 1 other errors.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

OPS = ("halo_gather", "blend_scatter", "masked_attention")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    """Versions, devices and which backend each op uses (builds/loads the optional backends)."""
    import torch

    from . import __version__, ops

    lines = [f"supergen {__version__}", f"python   {platform.python_version()} ({platform.machine()})"]
    for dist in ("torch", "triton", "diffusers", "transformers"):
        lines.append(f"{dist:<12} {_version(dist)}")
    cuda = torch.cuda.is_available()
    lines.append(
        f"cuda         {torch.version.cuda or 'none'} ({torch.cuda.get_device_name(0) if cuda else 'no device'})"
    )
    lines.append("backends:")
    for name, state in ops.availability(load=True).items():
        label = "supergen._C (C++ CPU extension)" if name == "cpp" else name
        lines.append(f"  {label:<34} {state}")
    lines.append("op dispatch:")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for op in OPS:
        lines.append(f"  {op:<18} " + ", ".join(f"{d} -> {ops.selected_backend(op, d)}" for d in devices))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supergen", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and the backend each op uses")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info_text())
            return 0
    except ValueError as e:
        print(f"supergen: error: {e}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
