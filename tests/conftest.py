"""Test-session setup.

Triton reads TRITON_INTERPRET when a kernel is *defined*, so it must be set before anything imports
``supergen.kernels``: without a GPU, every Triton kernel runs in the interpreter on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
